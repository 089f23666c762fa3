"""The sigmoid (SigLIP) family: the spec itself, and every fast path against it in float64.

Each quantity (loss, dq, dk, dscale, dbias) meets helpers.py's rule against naive in float64:
`err(impl) <= 2 * err(naive in the same dtype) + FLOOR[dtype]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import FLOOR, OpLog, aligned, poisoned_memory, runs_tf32, tma_everywhere, within
from hypothesis import example, given, settings
from hypothesis import strategies as st

import infcl
from infcl.kernels import configs
from infcl.kernels.logits import matmul_precision

INTERPRET = configs.INTERPRET
LOSSES = [infcl.chunked_sigmoid_loss, infcl.inf_sigmoid_loss, infcl.ring_sigmoid_loss]
NAMES = ("loss", "dq", "dk", "dscale", "dbias")


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    n: int
    d: int
    labels: tuple[int, ...] | None = None
    reduction: str = "mean"
    scale: float = 10.0
    bias: float = -10.0
    unit: bool = True
    seed: int = 0

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.m, self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(self.n, self.d, generator=gen, dtype=torch.float64)
        if self.unit:
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return q, k


SMALL = st.integers(1, 40)


@st.composite
def cases(draw: st.DrawFn, rows: st.SearchStrategy[int] = SMALL) -> Case:
    m = draw(rows)
    with_labels = draw(st.booleans())
    n = draw(rows) if with_labels else m
    labels = tuple(draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))) if with_labels else None
    return Case(
        m=m, n=n, d=draw(st.integers(1, 70)), labels=labels,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        scale=draw(st.sampled_from([1.0, 10.0, 100.0]) | st.floats(0.1, 100.0)),
        bias=draw(st.sampled_from([0.0, -10.0, 5.0]) | st.floats(-20.0, 20.0)),
        unit=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


def run(fn, q, k, scale, bias, cot, **kw):
    """Loss and the gradients of q, k, scale and bias (tensors that require grad)."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    s = scale.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    loss = fn(q, k, s, b, **kw)
    loss.backward(torch.ones_like(loss) if cot is None else cot.to(loss))
    return loss.detach(), q.grad, k.grad, s.grad, b.grad


def check(fn, c: Case, dtype: torch.dtype, device: str = "cpu", **kw: Any) -> None:
    q, k = (x.to(dtype).to(device) for x in c.inputs())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    labels = None if c.labels is None else torch.tensor(c.labels, device=device)
    gen = torch.Generator().manual_seed(c.seed)
    cot = torch.randn(c.m, generator=gen, dtype=torch.float64) if c.reduction == "none" else None
    spec = {"labels": labels, "reduction": c.reduction}

    def params(dt):
        return (torch.tensor(c.scale, dtype=dt, device=device),
                torch.tensor(c.bias, dtype=dt, device=device))

    truth = run(infcl.naive_sigmoid_loss, q.double(), k.double(), *params(torch.float64), cot, **spec)
    # TF32 on a GPU is measured against naive with cuBLAS TF32, under the TF32 floor
    tf32 = runs_tf32(dtype, device, kw.get("precision"))
    with matmul_precision("tf32" if tf32 else "ieee"):
        ref = run(infcl.naive_sigmoid_loss, q, k, *params(acc), cot, **spec)
    with poisoned_memory():
        got = run(fn, q, k, *params(acc), cot, **spec, **kw)
    assert got[0].dtype == acc and got[1].dtype == got[2].dtype == dtype
    # As for the softmax kernels: a recomputed logit may differ by an ulp between the stages.
    s_max = abs(c.scale) * float((q.double() @ k.double().T).abs().max()) + abs(c.bias)
    floor = FLOOR["tf32" if tf32 else dtype]
    floor += 8 * torch.finfo(torch.float32).eps * s_max if dtype != torch.float64 else 0
    lines, failed = [], []
    for name, x, x_ref, x64 in zip(NAMES, got, ref, truth, strict=True):
        ok, e, e_ref, bound = within(x.cpu(), x_ref.cpu(), x64.cpu().double(), floor=floor)
        lines.append(f"{name}: err {e:.3g}, naive err {e_ref:.3g}, bound {bound:.3g}")
        if not ok or not torch.isfinite(x).all():
            failed.append(name)
    assert not failed, f"{fn.__name__} off the spec in {failed}:\n" + "\n".join(lines)


# ---- the spec ------------------------------------------------------------------------------


@given(c=cases())
@settings(max_examples=30)
def test_naive_is_the_formula(c):
    q, k = c.inputs()
    labels = None if c.labels is None else torch.tensor(c.labels)
    logits = c.scale * q @ k.T + c.bias
    y = torch.arange(c.m) if labels is None else labels
    z = -torch.ones_like(logits)
    z[torch.arange(c.m), y] = 1.0
    per = -F.logsigmoid(z * logits).sum(1)
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / c.m}[c.reduction]
    got = infcl.naive_sigmoid_loss(q, k, c.scale, c.bias, labels=labels, reduction=c.reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_naive_gradcheck():
    c = Case(m=5, n=7, d=3, labels=(0, 6, 2, 2, 1), reduction="sum", scale=3.0, bias=-1.0)
    q, k = (x.requires_grad_() for x in c.inputs())
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(c.labels)
    assert torch.autograd.gradcheck(
        lambda q, k, s, b: infcl.naive_sigmoid_loss(q, k, s, b, labels=labels, reduction="sum"),
        (q, k, s, b),
    )


def test_naive_matches_open_clip_siglip():
    from test_compat import open_clip_loss_module

    open_clip_loss = open_clip_loss_module()
    q, k = Case(m=11, n=11, d=19, seed=3).inputs()
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    want = open_clip_loss.SigLipLoss()(q, k, s, b)
    torch.testing.assert_close(infcl.naive_sigmoid_loss(q, k, s, b), want)


# ---- every fast path against the spec ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
@given(c=cases(), chunk_size=st.sampled_from([None, 1, 3, 7]))
@settings(max_examples=15)
@example(c=Case(m=37, n=37, d=33, scale=100.0, bias=-10.0, seed=1), chunk_size=5)
@example(c=Case(m=1, n=1, d=1, reduction="none"), chunk_size=None)
@example(c=Case(m=31, n=40, d=20, labels=tuple([3] * 30 + [39]), reduction="sum"), chunk_size=4)
def test_matches_naive(fn, dtype, c, chunk_size):
    kw = {"chunk_size": chunk_size} if fn is not infcl.inf_sigmoid_loss else {}
    check(fn, c, dtype, **kw)


@pytest.mark.parametrize("fn", [infcl.naive_sigmoid_loss, *LOSSES], ids=lambda f: f.__name__)
def test_stable_at_huge_logits(fn):
    """Scale 100 on rows of norm about 10: logits near 1e4, where exp overflows; the loss is
    finite and equals the float64 spec."""
    c = Case(m=9, n=9, d=100, scale=100.0, bias=3.0, unit=False, seed=4)
    q, k = c.inputs()
    want = infcl.naive_sigmoid_loss(q, k, 100.0, 3.0)
    got = fn(q.float(), k.float(), 100.0, 3.0)
    assert torch.isfinite(got)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))


@pytest.mark.parametrize("fn", [infcl.naive_sigmoid_loss, *LOSSES], ids=lambda f: f.__name__)
def test_nan_in_nan_out(fn):
    q, k = (x.float() for x in Case(m=6, n=6, d=4).inputs())
    q[2, 1] = math.nan
    assert torch.isnan(fn(q, k, 10.0, -10.0))
    assert torch.isnan(fn(q.abs(), k, 10.0, math.nan))


BAD = [
    ({"bias": "0"}, TypeError, "bias"),
    ({"bias": True}, TypeError, "bias"),
    ({"bias": torch.zeros(1)}, ValueError, "bias"),
    ({"bias": torch.tensor(1)}, TypeError, "bias"),
    ({"labels": torch.tensor([0, 1, 2, 6])}, ValueError, r"labels must lie in \[0, 6\); got \[6\]"),
    ({"labels": torch.tensor([0, 1, 2, -100])}, ValueError, r"\[0, 6\); got \[-100\]"),
    ({"labels": None}, ValueError, "diagonal"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"q": torch.ones(4, 3, dtype=torch.long)}, TypeError, "q must be float"),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("change", "error", "pattern"), BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("fn", [infcl.naive_sigmoid_loss, *LOSSES], ids=lambda f: f.__name__)
def test_bad_input_raises(fn, change, error, pattern, compiled):
    gen = torch.Generator().manual_seed(0)
    args = {"q": torch.randn(4, 3, generator=gen), "k": torch.randn(6, 3, generator=gen),
            "bias": -1.0, "labels": torch.tensor([0, 5, 1, 2])} | change

    def call(a):
        a = dict(a)
        return fn(a.pop("q"), a.pop("k"), 2.0, a.pop("bias"), **a)

    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    with pytest.raises(error, match=pattern):
        call(args)


def assert_compiles_once(fn, sizes: tuple[int, int], d: int) -> None:
    """`fn(q, k, scale, bias)` under `torch.compile(fullgraph=True)` gives the eager loss and
    gradients at two batch sizes marked dynamic, compiling one frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for m in sizes:
        q, k = (x.float() for x in Case(m=m, n=m, d=d, seed=m).inputs())
        results = []
        for f in (fn, compiled):
            args = [q.clone().requires_grad_(), k.clone().requires_grad_(),
                    torch.tensor(2.3, requires_grad=True), torch.tensor(-5.0, requires_grad=True)]
            torch._dynamo.mark_dynamic(args[0], 0)
            torch._dynamo.mark_dynamic(args[1], 0)
            loss = f(*args)
            loss.backward()
            results.append([loss.detach()] + [a.grad for a in args])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_compiled_step_no_recompile():
    """fullgraph, forward and backward, and a second batch size marked dynamic compiles nothing."""
    assert_compiles_once(
        lambda q, k, s, b: infcl.chunked_sigmoid_loss(q, k, s.exp(), b, chunk_size=4), (13, 29), 6)


@pytest.fixture(scope="module")
def small_blocks():
    """Several forward partitions and backward blocks at the interpreter's small shapes."""
    saved = configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK
    configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK = 2, 2, 24
    yield
    configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK = saved


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@given(c=cases(rows=st.integers(1, 40) | st.sampled_from([17, 31, 37])))
@settings(max_examples=8)
@example(c=Case(m=37, n=37, d=33, scale=100.0, bias=-10.0, seed=1))
@example(c=Case(m=31, n=40, d=20, labels=tuple([3] * 30 + [39]), reduction="sum"))
def test_triton_matches_naive_interpreted(small_blocks, dtype, c):
    from infcl import inf

    assert inf._block(torch.empty(1, dtype=dtype)) == "inf"
    check(infcl.inf_sigmoid_loss, c, dtype, precision="ieee")


def check_tma(c: Case, dtype: torch.dtype, device: str, bwd_block: int | None = None) -> None:
    """The sigmoid kernels with their tiles loaded through TMA descriptors, at any size (and
    backward blocks of `bwd_block` if given)."""
    from infcl.kernels.logits import use_tma

    with tma_everywhere(bwd_block):
        q, k = (x.to(dtype).to(device) for x in c.inputs())
        assert use_tma(q, k), "the descriptor path must be the one tested"
        check(infcl.inf_sigmoid_loss, c, dtype, device)


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@given(c=cases(rows=st.integers(1, 40) | st.sampled_from([17, 31, 37])).map(aligned))
@settings(max_examples=6)
def test_tma_path_interpreted(small_blocks, dtype, c):
    check_tma(c, dtype, "cpu")


CUDA_CASES = [(torch.bfloat16, None), (torch.float16, None)] + [
    (torch.float32, precision) for precision in configs.PRECISIONS
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "precision"), CUDA_CASES, ids=str)
@given(c=cases(rows=st.integers(1, 600) | st.sampled_from([1, 97, 257, 513])))
@settings(max_examples=10)
@example(c=Case(m=300, n=300, d=47, scale=100.0, bias=-10.0, seed=3))
@example(c=Case(m=4099, n=4099, d=384, scale=10.0, bias=-10.0, seed=6))
@example(c=Case(m=8200, n=8300, d=200, labels=tuple(range(8200)), reduction="sum", seed=7))
def test_triton_matches_naive_cuda(dtype, precision, c):
    """The real tile configs, sizes past the 128/256 tiles and the 8192 backward block."""
    from infcl import inf

    assert inf._block(torch.empty(1, dtype=dtype, device="cuda")) == "inf"
    check(infcl.inf_sigmoid_loss, c, dtype, "cuda", precision=precision)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@given(c=cases(rows=st.integers(1, 600) | st.sampled_from([1, 97, 257, 513])).map(aligned))
@settings(max_examples=8)
@example(c=Case(m=300, n=300, d=48, scale=100.0, bias=-10.0, seed=3))
def test_tma_path_cuda(dtype, c):
    check_tma(c, dtype, "cuda", bwd_block=256)  # descriptors of row and column slices too


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_sigmoid_pass_interpreted(small_blocks, reduction):
    """With a gradient wanted, "mean" and "sum" take the loss and the gradients from one sweep
    (`inf_sigmoid_fused`); without one, the forward alone; either way the same loss. The
    backward scales by any incoming gradient, also twice over a retained graph."""
    c = Case(m=37, n=37, d=33, scale=20.0, bias=-5.0, seed=11, reduction=reduction)
    q, k = (x.float() for x in c.inputs())
    s, b = torch.tensor(c.scale), torch.tensor(c.bias)
    with torch.no_grad(), OpLog() as log:
        plain = infcl.inf_sigmoid_loss(q, k, s, b, reduction=reduction)
    assert "inf_sigmoid_fwd" in log.names and "inf_sigmoid_fused" not in log.names
    leaves = [x.clone().requires_grad_() for x in (q, k, s, b)]
    with OpLog() as log:
        loss = infcl.inf_sigmoid_loss(*leaves, reduction=reduction)
    assert "inf_sigmoid_fused" in log.names and "inf_sigmoid_fwd" not in log.names
    torch.testing.assert_close(loss.detach(), plain, rtol=1e-6, atol=0)
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    (2.5 * loss).backward(retain_graph=True)
    loss.backward()
    for g1, leaf in zip(once, leaves, strict=True):
        torch.testing.assert_close(leaf.grad, 3.5 * g1, rtol=1e-6, atol=1e-9)


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
def test_fused_sigmoid_compiles_fullgraph_interpreted(small_blocks):
    """The fused pass under `torch.compile(fullgraph=True)`: the eager numbers, forward and
    backward, and a second batch size marked dynamic compiles nothing new."""
    assert_compiles_once(lambda q, k, s, b: infcl.inf_sigmoid_loss(q, k, s.exp(), b), (19, 29), 9)


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
def test_fused_sigmoid_limits_interpreted(small_blocks):
    """fp16 keeps the two sweeps (its gradients for an incoming 1 would underflow, and
    overflow under a loss scale); a second-order gradient through the fused pass raises
    instead of silently dropping its terms; the held gradients are scaled in fp32, once."""
    c = Case(m=29, n=29, d=11, scale=10.0, bias=-5.0, seed=21)
    q, k = (x.half() for x in c.inputs())
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    with OpLog() as log:
        infcl.inf_sigmoid_loss(*leaves, 10.0, -5.0).backward(torch.tensor(65536.0))
    assert "inf_sigmoid_fused" not in log.names and "inf_sigmoid_bwd" in log.names
    assert all(torch.isfinite(x.grad).all() for x in leaves)

    q, k = (x.float().requires_grad_() for x in c.inputs())
    loss = infcl.inf_sigmoid_loss(q, k, 10.0, -5.0)
    with pytest.raises(RuntimeError, match="cannot differentiate its gradients"):
        torch.autograd.grad(loss, q, create_graph=True)

    x = torch.randn(3000, dtype=torch.float32).bfloat16()
    g = torch.tensor(0.1)
    # the interpreter converts to bf16 by truncation (a GPU rounds to nearest: the CUDA test)
    got = torch.ops.infcl.scaled(x, g).float()
    torch.testing.assert_close(got, x.float() * 0.1, rtol=2**-7, atol=0)
    torch.library.opcheck(torch.ops.infcl.scaled.default, (x, g))


@pytest.mark.gpu
@needs_cuda
def test_fused_sigmoid_scales_in_fp32_cuda():
    """The held bf16 gradients times a 0-dim fp32 incoming gradient: one rounding, as the
    product in fp32 rounded to bf16 (`x * g` in torch may round g to bf16 first)."""
    x = torch.randn(100_000, device="cuda").bfloat16()
    g = torch.tensor(0.1, device="cuda")
    assert torch.equal(torch.ops.infcl.scaled(x, g), (x.float() * g).bfloat16())
    torch.library.opcheck(torch.ops.infcl.scaled.default, (x, g))
