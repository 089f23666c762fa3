"""infcl.compat against the originals: open_clip's `ClipLoss` and inf_cl's pure-torch ring loss.

Single-process tests run here; the distributed ones run in one spawn of `WORLD` gloo ranks that
executes every case once (`dist_results`) and reports per case and rank, so the spawn is paid
once. Each case returns '' or what went wrong; the tests below assert on those reports.
The tolerance rule is helpers.py's: against the original in float64,
`err(infcl) <= 2 * err(original in the same dtype) + FLOOR[dtype]`.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import FLOOR, assert_close_to_naive, rel_err, within
from torch import Tensor

from infcl import naive_loss
from infcl.compat import ClipLoss, SigLipLoss, cal_flash_loss, cal_inf_loss, cal_ring_loss

WORLD = 3
B, D = 5, 19  # rows per rank; D not a power of two
TIMEOUT_S = 180.0


def open_clip_loss_module() -> Any:
    """open_clip's `loss.py`, as installed, or a skip when open_clip is not installed.

    The file needs only torch, so it is loaded on its own: importing the `open_clip` package
    imports torchvision, which does not load beside the CPU build of torch that CI installs
    ('operator torchvision::nms does not exist'). Should the file ever need the package, the
    package is imported instead.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip (open_clip_torch) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    file_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError:
        return importlib.import_module("open_clip.loss")
    return module


def features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def clip_run(loss_fn: Callable[..., Any], img: Tensor, txt: Tensor, log_scale: float, **kw: Any):
    """Loss and the gradients of image, text and the log-scale parameter (the scale is its exp)."""
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    ls = torch.tensor(log_scale, dtype=torch.float64 if img.dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    loss = loss_fn(img, txt, ls.exp(), **kw)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, ls.grad


def compare(names: tuple[str, ...], got, same, truth, dtype: torch.dtype) -> str:
    """'' when every `got` meets the tolerance rule against `truth`, else what failed."""
    out = []
    for name, x, x_same, x64 in zip(names, got, same, truth, strict=True):
        ok, e, e_ref, bound = within(x, x_same, x64.double(), floor=FLOOR[dtype])
        if not ok:
            out.append(f"{name} ({dtype}): err {e:.3g} > bound {bound:.3g} (original {e_ref:.3g})")
    return "; ".join(out)


CLIP_NAMES = ("loss", "d image", "d text", "d logit_scale")


# ---- single process --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "log_scale"), [(37, math.log(1 / 0.07)), (64, math.log(100.0)), (1, 0.0)])
def test_clip_loss_matches_open_clip(dtype: torch.dtype, n: int, log_scale: float) -> None:
    open_clip_loss = open_clip_loss_module()
    img, txt = features(n, D, seed=n), features(n, D, seed=n + 1)
    truth = clip_run(open_clip_loss.ClipLoss(), img, txt, log_scale)
    same = clip_run(open_clip_loss.ClipLoss(), img.to(dtype), txt.to(dtype), log_scale)
    got = clip_run(ClipLoss(), img.to(dtype), txt.to(dtype), log_scale)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert not compare(CLIP_NAMES, got, same, truth, dtype), compare(CLIP_NAMES, got, same, truth, dtype)


def test_clip_loss_output_dict_and_ignored_arguments() -> None:
    open_clip_loss = open_clip_loss_module()
    img, txt = features(9, D, 0), features(9, D, 1)
    want = open_clip_loss.ClipLoss(cache_labels=True)(img, txt, 20.0, output_dict=True)
    got = ClipLoss(local_loss=True, cache_labels=True)(img, txt, 20.0, output_dict=True)
    assert got.keys() == want.keys() == {"contrastive_loss"}
    torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"])


def test_clip_loss_logit_bias_warns_once_and_cancels() -> None:
    open_clip_loss = open_clip_loss_module()
    img, txt = features(11, D, 2), features(11, D, 3)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    want = open_clip_loss.ClipLoss()(img, txt, 14.0, logit_bias=bias)
    loss_fn = ClipLoss()
    with pytest.warns(UserWarning, match="cancels in the softmax"):
        got = loss_fn(img, txt, 14.0, logit_bias=bias)
    torch.testing.assert_close(got, want)
    got.backward()
    assert bias.grad is not None and float(bias.grad) == 0.0  # in the graph (DDP sees it used)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(img, txt, 14.0, logit_bias=-10.0)
    with pytest.raises(ValueError, match="scalar"):
        loss_fn(img, txt, 14.0, logit_bias=torch.zeros(11))


def test_clip_loss_takes_a_one_element_scale() -> None:
    """open_clip's models may hand a `[1]` logit scale; its gradient keeps that shape."""
    open_clip_loss = open_clip_loss_module()
    img, txt = features(7, D, 8), features(7, D, 9)
    scale = torch.full((1,), 11.0, dtype=torch.float64, requires_grad=True)
    got = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(got, open_clip_loss.ClipLoss()(img, txt, scale.detach()))
    got.backward()
    assert scale.grad.shape == (1,)


@pytest.mark.parametrize(
    "bias", [math.nan, math.inf, torch.tensor(math.nan), torch.tensor(math.inf)],
    ids=["nan", "inf", "nan-tensor", "inf-tensor"],
)
def test_clip_loss_non_finite_bias_gives_nan(bias: Any) -> None:
    """open_clip adds the bias to every logit: inf - inf in the softmax is NaN there."""
    img = features(5, D, 0).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(ClipLoss()(img, img, 3.0, logit_bias=bias))


def test_clip_loss_float64_bias_keeps_the_loss_float32() -> None:
    img = features(5, D, 0).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ClipLoss()(img, img, 3.0, logit_bias=torch.tensor(1.0, dtype=torch.float64))
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    ("bias", "error"),
    [("1.0", TypeError), ([1.0], TypeError), (True, TypeError),
     (torch.tensor(1), ValueError), (torch.zeros(2), ValueError)],
    ids=["str", "list", "bool", "int-tensor", "two-elements"],
)
def test_clip_loss_rejects_a_bad_bias(bias: Any, error: type[Exception]) -> None:
    img = features(5, D, 0)
    with pytest.raises(error, match="logit_bias"):
        ClipLoss()(img, img, 3.0, logit_bias=bias)


@pytest.mark.parametrize("fn", [cal_inf_loss, cal_ring_loss, cal_flash_loss])
@pytest.mark.parametrize(
    ("labels", "error", "pattern"),
    [(torch.zeros(6), TypeError, "integer"), (torch.zeros(6, dtype=torch.bool), TypeError, "integer"),
     ([0] * 6, TypeError, "list"), (torch.tensor([0, 1, 2, 3, 4, -100]), ValueError, "-100"),
     (torch.tensor([0, 1, 2, 3, 4, 6]), ValueError, r"\[0, 6\)")],
    ids=["float", "bool", "list", "minus-100", "too-big"],
)
def test_cal_losses_reject_bad_labels(fn, labels, error, pattern) -> None:
    """No silent truncation of float labels, and -100 is a label out of range for all three
    (inf_cl has no ignore_index)."""
    q = features(6, D, 1)
    with pytest.raises(error, match=pattern):
        fn(q, q, labels, 2.0)


def siglip_run(loss_fn: Any, img: Tensor, txt: Tensor, log_scale: float, bias: float):
    """Loss and the gradients of image, text, the log-scale and the bias."""
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    acc = torch.float64 if img.dtype == torch.float64 else torch.float32
    ls = torch.tensor(log_scale, dtype=acc, requires_grad=True)
    b = torch.tensor(bias, dtype=acc, requires_grad=True)
    loss = loss_fn(img, txt, ls.exp(), b)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, ls.grad, b.grad


SIGLIP_NAMES = (*CLIP_NAMES, "d logit_bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "log_scale", "bias"), [(37, math.log(10.0), -10.0), (5, math.log(100.0), 3.0)])
def test_siglip_loss_matches_open_clip(dtype: torch.dtype, n: int, log_scale: float, bias: float) -> None:
    open_clip_loss = open_clip_loss_module()
    img, txt = features(n, D, seed=n), features(n, D, seed=n + 1)
    truth = siglip_run(open_clip_loss.SigLipLoss(), img, txt, log_scale, bias)
    same = siglip_run(open_clip_loss.SigLipLoss(), img.to(dtype), txt.to(dtype), log_scale, bias)
    got = siglip_run(SigLipLoss(), img.to(dtype), txt.to(dtype), log_scale, bias)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    err = compare(SIGLIP_NAMES, got, same, truth, dtype)
    assert not err, err


def test_siglip_loss_output_dict_one_element_scale_and_no_bias() -> None:
    open_clip_loss = open_clip_loss_module()
    img, txt = features(9, D, 0), features(9, D, 1)
    scale = torch.full((1,), 10.0, dtype=torch.float64)
    want = open_clip_loss.SigLipLoss(dist_impl="shift")(img, txt, scale, None, output_dict=True)
    got = SigLipLoss(dist_impl="shift")(img, txt, scale, None, output_dict=True)
    assert got.keys() == want.keys() == {"contrastive_loss"}
    torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"])
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="SigLipLoss was built with world_size=2"):
        SigLipLoss(world_size=2, rank=0)(img, txt, scale, None)


def test_clip_loss_rejects_what_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="Horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(world_size=2, rank=1, local_loss=True)
    img = features(4, D, 0)
    with pytest.raises(ValueError, match="no initialised process group"):
        ClipLoss(world_size=2, rank=0, gather_with_grad=True)(img, img, 1.0)


def _inf_cl_style(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn(q, k, labels, scale) called the way helpers.assert_close_to_naive calls a loss."""

    def call(q: Tensor, k: Tensor, s: Any, labels: Tensor | None = None, **kw: Any) -> Tensor:
        return fn(q, k, labels, s, head_dim=256)

    call.__name__ = fn.__name__
    return call


@pytest.mark.parametrize("fn", [cal_inf_loss, cal_ring_loss])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cal_loss_without_process_group(fn: Callable[..., Tensor], dtype: torch.dtype) -> None:
    """inf_cl's defect 1: a learnable scale crashed in backward without a process group."""
    q, k = features(13, D, 4), features(13, D, 5)
    scale = torch.tensor(30.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    labels = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    assert_close_to_naive(_inf_cl_style(fn), q, k, scale, dtype=dtype, labels=labels)
    assert_close_to_naive(_inf_cl_style(fn), q, k, scale, dtype=dtype, labels=None)
    q_few = q[:4].clone()  # labels=None: row i's positive is key i, so M < N works too
    want = naive_loss(q_few, k, 2.0, labels=torch.arange(4))
    torch.testing.assert_close(fn(q_few, k, scale=2.0), want)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        fn(q, k, torch.full((13,), 13), 2.0)


def test_cal_flash_loss_is_per_row() -> None:
    q, k = features(10, D, 6), features(12, D, 7)
    labels = torch.randint(0, 12, (10,), generator=torch.Generator().manual_seed(1))
    got = cal_flash_loss(q, k, labels, 15.0, head_dim=64)
    torch.testing.assert_close(got, naive_loss(q, k, 15.0, labels=labels, reduction="none"))
    torch.testing.assert_close(cal_flash_loss(q, k), naive_loss(q, k, 1.0, labels=torch.arange(10), reduction="none"))


# ---- across ranks: one spawn runs every case -------------------------------------------------


def _local_clip(open_clip_loss: Any, rank: int, dtype: torch.dtype, local_loss: bool) -> str:
    """ClipLoss(gather_with_grad=True) on this rank's shard, infcl against open_clip."""
    img_all, txt_all = features(WORLD * B, D, 10), features(WORLD * B, D, 11)
    img, txt = img_all[rank * B:(rank + 1) * B], txt_all[rank * B:(rank + 1) * B]
    kw = {"local_loss": local_loss, "gather_with_grad": True, "rank": rank, "world_size": WORLD}
    log_scale = math.log(1 / 0.07)
    truth = clip_run(open_clip_loss.ClipLoss(**kw), img, txt, log_scale)
    same = clip_run(open_clip_loss.ClipLoss(**kw), img.to(dtype), txt.to(dtype), log_scale)
    got = clip_run(ClipLoss(**kw), img.to(dtype), txt.to(dtype), log_scale)
    # The value and the feature gradients are open_clip's on every rank. The scale's gradient is
    # this rank's share of the total, split otherwise than open_clip's: equal once DDP averages.
    err = compare(CLIP_NAMES[:3], got[:3], same[:3], truth[:3], dtype)
    dls = torch.stack([got[3].double(), same[3].double(), truth[3].double()])
    dist.all_reduce(dls)
    dls /= WORLD
    return "; ".join(e for e in (err, compare(CLIP_NAMES[3:], dls[:1], dls[1:2], dls[2:], dtype)) if e)


def _clip_mismatch(rank: int) -> str:
    img = features(B, D, 0)
    try:
        ClipLoss(world_size=2, rank=0, gather_with_grad=True)(img, img, 1.0)
    except ValueError as e:
        return "" if "default process group of 3 ranks" in str(e) else f"wrong message: {e}"
    return "no error for world_size=2 in a group of 3"


def _ring_vs_inf_cl(inf_cl: Any, rank: int, ours: Callable[..., Tensor], with_labels: bool) -> str:
    """ours against inf_cl.cal_ring_loss, float32, logits below 30 (inf_cl overflows past ~88)."""
    n, d = 6, 24  # inf_cl needs D to be a multiple of its head_dim (8 here)
    q = features(WORLD * n, d, 20, torch.float32)[rank * n:(rank + 1) * n]
    k = features(WORLD * n, d, 21, torch.float32)[rank * n:(rank + 1) * n]
    gen = torch.Generator().manual_seed(100 + rank)
    labels = torch.randint(0, n, (n,), generator=gen) if with_labels else None

    def run(fn: Callable[..., Tensor], **kw: Any):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        ls = torch.tensor(math.log(30.0), requires_grad=True)
        loss = fn(qq, kk, labels, ls.exp(), **kw)
        loss.backward()
        return loss.detach(), qq.grad, kk.grad, ls.grad

    want = run(inf_cl.cal_ring_loss, head_dim=8)
    got = run(ours)
    errors = []
    for name, x, y in zip(("loss", "dq", "dk"), got[:3], want[:3], strict=True):
        if not rel_err(x, y.double()) <= 10 * FLOOR[torch.float32]:
            errors.append(f"{name}: err {rel_err(x, y.double()):.3g}")
    # inf_cl all-reduces the scale's gradient, so every rank holds the sum of the shares: W times
    # what DDP's averaging of infcl's shares gives (defect 2). The sum of infcl's shares is it.
    total = got[3].clone()
    dist.all_reduce(total)
    if not rel_err(total, want[3].double()) <= 10 * FLOOR[torch.float32]:
        errors.append(f"sum of dscale shares {float(total)} vs inf_cl's {float(want[3])}")
    return "; ".join(errors)


def _unequal_shards(rank: int) -> str:
    """Local labels on unequal shards: cal_inf_loss against naive with the labels made global."""
    ms, ns = (2, 5, 3), (4, 3, 6)
    q_all, k_all = features(sum(ms), D, 30), features(sum(ns), D, 31)
    local = torch.randint(0, 3, (sum(ms),), generator=torch.Generator().manual_seed(3))
    row0, col0 = sum(ms[:rank]), sum(ns[:rank])
    owner = torch.repeat_interleave(torch.arange(WORLD), torch.tensor(ms))
    glob = local + torch.tensor([sum(ns[:r]) for r in range(WORLD)])[owner]
    s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    q_all.requires_grad_()
    k_all.requires_grad_()
    per = naive_loss(q_all, k_all, s, labels=glob, reduction="none")
    want = [per[sum(ms[:r]):sum(ms[:r + 1])].mean() for r in range(WORLD)]
    sum(want).backward()

    q = q_all.detach()[row0:row0 + ms[rank]].clone().requires_grad_()
    k = k_all.detach()[col0:col0 + ns[rank]].clone().requires_grad_()
    s_mine = s.detach().clone().requires_grad_()
    loss = cal_inf_loss(q, k, local[row0:row0 + ms[rank]], s_mine, head_dim=7)
    loss.backward()
    ds = s_mine.grad.clone()
    dist.all_reduce(ds)
    pairs = [
        ("loss", loss, want[rank]), ("dq", q.grad, q_all.grad[row0:row0 + ms[rank]]),
        ("dk", k.grad, k_all.grad[col0:col0 + ns[rank]]), ("sum of dscale", ds, s.grad),
    ]
    return "; ".join(f"{name}: err {rel_err(x, y):.3g}" for name, x, y in pairs
                     if not rel_err(x.detach(), y.detach()) <= 1e-10)


def _siglip_dist(open_clip_loss: Any, rank: int, dist_impl: str) -> str:
    """SigLipLoss on this rank's shard, infcl against open_clip's neighbour exchange."""
    img_all, txt_all = features(WORLD * B, D, 70), features(WORLD * B, D, 71)
    img, txt = img_all[rank * B:(rank + 1) * B], txt_all[rank * B:(rank + 1) * B]
    kw = {"rank": rank, "world_size": WORLD, "dist_impl": dist_impl}
    want = siglip_run(open_clip_loss.SigLipLoss(**kw), img, txt, math.log(10.0), -5.0)
    got = siglip_run(SigLipLoss(**kw), img, txt, math.log(10.0), -5.0)
    return compare(SIGLIP_NAMES, got, want, want, torch.float64)


def _bad_label_on_one_rank(rank: int) -> str:
    """Rank 0's label is outside its keys: every rank raises (none waits in a collective)."""
    q, k = features(B, D, 80 + rank), features(B, D, 90 + rank)
    labels = torch.arange(B)
    if rank == 0:
        labels[1] = B + 4
    try:
        cal_ring_loss(q, k, labels, 3.0)
    except ValueError as e:
        want = "must lie in" if rank == 0 else "rejected on rank(s) [0]"
        return "" if want in str(e) else f"wrong message: {e}"
    return "no error"


def _local_in_group(rank: int) -> str:
    """ClipLoss() (world_size=1, open_clip's default) inside a process group: this rank's batch
    alone, as open_clip computes it, with no collective (only rank 0 calls it)."""
    if rank != 0:
        return ""
    img, txt = features(B, D, 60), features(B, D, 61)
    got = ClipLoss()(img, txt, 7.0)
    want = naive_loss(img, txt, 7.0, symmetric=True)
    return "" if torch.allclose(got, want, rtol=1e-12, atol=1e-12) else f"{got} vs {want}"


def _flash_in_group(rank: int) -> str:
    """cal_flash_loss ignores the process group, as inf_cl's does: local rows against local keys."""
    q, k = features(4, D, 40 + rank), features(6, D, 50 + rank)
    got = cal_flash_loss(q, k, None, 9.0)
    want = naive_loss(q, k, 9.0, labels=torch.arange(4), reduction="none")
    return "" if torch.allclose(got, want, rtol=1e-12, atol=1e-12) else f"{got} vs {want}"


def _cases(rank: int) -> dict[str, str]:
    out: dict[str, str] = {}

    def case(name: str, fn: Callable[[], str]) -> None:
        try:
            out[name] = fn()
        except Exception:  # report it; a peer stuck in a collective times out on its own
            out[name] = traceback.format_exc()

    try:
        open_clip_loss = open_clip_loss_module()
    except pytest.skip.Exception as e:
        out["open_clip"] = f"skip: {e}"
    else:
        for dtype in (torch.float64, torch.float32):
            for local in (True, False):
                case(f"open_clip local_loss={local} {dtype}",
                     lambda d=dtype, lo=local: _local_clip(open_clip_loss, rank, d, lo))
        for impl in ("bidir", "shift"):
            case(f"siglip {impl}", lambda i=impl: _siglip_dist(open_clip_loss, rank, i))
    case("mismatch", lambda: _clip_mismatch(rank))
    try:
        import inf_cl
    except ImportError as e:
        out["inf_cl"] = f"skip: {e}"
    else:
        for name, ours in (("cal_ring_loss", cal_ring_loss), ("cal_inf_loss", cal_inf_loss)):
            for with_labels in (True, False):
                case(f"inf_cl {name} labels={with_labels}",
                     lambda o=ours, w=with_labels: _ring_vs_inf_cl(inf_cl, rank, o, w))
    case("unequal shards", lambda: _unequal_shards(rank))
    case("flash in group", lambda: _flash_in_group(rank))
    case("local in group", lambda: _local_in_group(rank))
    case("bad label on one rank", lambda: _bad_label_on_one_rank(rank))
    return out


def _rank_main(rank: int, init_file: str, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        results.put((rank, _cases(rank)))
    except BaseException:  # noqa: B036  (the parent reports it)
        results.put((rank, {"rank crashed": traceback.format_exc()}))


@pytest.fixture(scope="module")
def dist_results() -> dict[str, list[str]]:
    """Every case's report on every rank: {case: [report of rank 0, 1, ...]}."""
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="infcl-compat-pg-")
    os.close(fd)
    os.unlink(init_file)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, init_file, results), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    per_rank: dict[int, dict[str, str]] = {}
    try:
        while len(per_rank) < WORLD:
            rank, out = results.get(timeout=TIMEOUT_S)
            per_rank[rank] = out
    except queue.Empty:
        pytest.fail(f"distributed compat cases: no answer within {TIMEOUT_S} s")
    finally:
        for p in procs:  # nothing worth a clean exit; tearing gloo down costs seconds
            p.kill()
        for p in procs:
            p.join(timeout=10)
    names = sorted({name for out in per_rank.values() for name in out})
    return {name: [per_rank[r].get(name, "missing") for r in range(WORLD)] for name in names}


def _check(dist_results: dict[str, list[str]], prefix: str) -> None:
    crashed = dist_results.get("rank crashed")
    assert crashed is None, "\n".join(crashed)
    cases = {k: v for k, v in dist_results.items() if k.startswith(prefix)}
    assert cases, f"no case {prefix!r} ran: {sorted(dist_results)}"
    bad = {f"{name} rank {r}": e for name, errs in cases.items() for r, e in enumerate(errs) if e}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


@pytest.mark.dist
def test_dist_clip_loss_matches_open_clip(dist_results: dict[str, list[str]]) -> None:
    """open_clip's local_loss=True, gather_with_grad=True on 3 gloo ranks (and local_loss=False).

    Per rank: the loss and the feature gradients; the scale's gradient averaged over the ranks.
    """
    open_clip_loss_module()
    _check(dist_results, "open_clip")
    _check(dist_results, "mismatch")


@pytest.mark.dist
def test_dist_cal_losses_match_inf_cl(dist_results: dict[str, list[str]]) -> None:
    """inf_cl's cal_ring_loss on 3 gloo ranks: values, dq, dk and the (fixed) scale gradient."""
    pytest.importorskip("inf_cl")
    _check(dist_results, "inf_cl")


@pytest.mark.dist
def test_dist_cal_loss_unequal_shards_and_flash(dist_results: dict[str, list[str]]) -> None:
    _check(dist_results, "unequal shards")
    _check(dist_results, "flash in group")


@pytest.mark.dist
def test_dist_siglip_loss_matches_open_clip(dist_results: dict[str, list[str]]) -> None:
    """open_clip's SigLipLoss on 3 gloo ranks (bidir and shift exchanges): value and every
    gradient per rank, float64."""
    open_clip_loss_module()
    _check(dist_results, "siglip")


@pytest.mark.dist
def test_dist_bad_label_on_one_rank_fails_every_rank(dist_results: dict[str, list[str]]) -> None:
    _check(dist_results, "bad label on one rank")


@pytest.mark.dist
def test_dist_clip_loss_world_size_one_is_local(dist_results: dict[str, list[str]]) -> None:
    _check(dist_results, "local in group")
