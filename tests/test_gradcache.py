"""grad_cache_step gives the parameter gradients of one plain step on the whole batch, exactly.

Both modes, both losses, dropout in both encoders and a learnable logit scale, in float64. The
plain step encodes micro-batch i of both sides in turn (a then b) from the same seed, so it draws
the same dropout masks; without dropout it is literally one forward of the whole batch. With
BatchNorm, the buffers it leaves must be left too, bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import infcl
from infcl.gradcache import grad_cache_step, split_batch

B, MICRO, D_IN, D_TXT, D = 12, 4, 7, 5, 6
ATOL = 1e-10
LOSSES = {"chunked": infcl.chunked_loss, "naive": infcl.naive_loss}


class Tower(nn.Module):
    def __init__(self, d_in: int, p: float, bn: bool) -> None:
        super().__init__()
        # BatchNorm after dropout: its running statistics depend on the masks too.
        norm = [nn.BatchNorm1d(16)] if bn else []
        self.net = nn.Sequential(
            nn.Linear(d_in, 16), nn.GELU(), nn.Dropout(p), *norm, nn.Linear(16, D)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


class Clip(nn.Module):
    def __init__(self, p: float, bn: bool) -> None:
        super().__init__()
        self.image = Tower(D_IN, p, bn)
        self.text = Tower(D_TXT, p, bn)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(x), self.text(t)


def make(p: float, seed: int = 0, *, bn: bool = False) -> tuple[Clip, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Clip(p, bn).double().train()
    x = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    t = torch.randn(B, D_TXT, generator=g, dtype=torch.float64)
    return model, x, t


def loss_of(model: Clip, name: str):
    """A contrastive loss of LOSSES, or "a only" / "b only": a loss that ignores the other side."""
    if name == "a only":
        return lambda a, b: (a**3).sum()
    if name == "b only":
        return lambda a, b: (b**3).sum()
    fn = LOSSES[name]
    return lambda a, b: fn(a, b, model.logit_scale.exp(), symmetric=True)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def outcome(loss: torch.Tensor, model: nn.Module):
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads(model), buffers, torch.get_rng_state()


def reference(p: float, name: str, *, whole: bool, frozen_a: bool = False, bn: bool = False):
    model, x, t = make(p, bn=bn)
    if frozen_a:
        model.image.requires_grad_(False)
    torch.manual_seed(1)
    if whole:
        ea, eb = model.image(x), model.text(t)
    else:
        parts = [(model.image(a), model.text(b)) for a, b in zip(x.split(MICRO), t.split(MICRO), strict=True)]
        ea, eb = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    loss = loss_of(model, name)(ea, eb)
    loss.backward()
    return outcome(loss, model)


def cached(p: float, name: str, mode: str, *, frozen_a: bool = False, **kw):
    model, x, t = make(p)
    if frozen_a:
        model.image.requires_grad_(False)
    torch.manual_seed(1)
    loss = grad_cache_step(
        model.image, model.text, x, t, loss_of(model, name),
        micro_batch_size=MICRO, mode=mode, frozen_a=frozen_a, **kw,
    )
    return outcome(loss, model)


def assert_same(got, want) -> None:
    loss, g, buffers, rng = got
    loss_ref, g_ref, buffers_ref, rng_ref = want
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=0)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=ATOL, rtol=0, msg=f"grad of {n}")
    for n in buffers_ref:
        assert torch.equal(buffers[n], buffers_ref[n]), f"buffer {n}"
    assert torch.equal(rng, rng_ref), "the RNG must be left as the plain step leaves it"


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_equals_plain_step_with_dropout(mode: str, name: str) -> None:
    want = reference(0.3, name, whole=False)
    assert "logit_scale" in want[1] and want[1]["logit_scale"].abs() > 1e-6
    assert_same(cached(0.3, name, mode), want)


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
def test_equals_whole_batch_forward_without_dropout(mode: str) -> None:
    assert_same(cached(0.0, "chunked", mode), reference(0.0, "chunked", whole=True))


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
def test_frozen_image_tower(mode: str) -> None:
    want = reference(0.3, "chunked", whole=False, frozen_a=True)
    assert not any(n.startswith("image.") for n in want[1])
    assert_same(cached(0.3, "chunked", mode, frozen_a=True), want)


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
@pytest.mark.parametrize("frozen_a", [False, True])
@pytest.mark.parametrize("encoders", ["modules", "bound methods", "pair", "named"])
def test_batchnorm_buffers_equal_plain_step(mode: str, frozen_a: bool, encoders: str) -> None:
    """Running statistics are updated once per micro-batch, as in the plain step, not also by the
    no-grad first pass; a frozen tower in train mode keeps its first pass's update."""
    want = reference(0.3, "chunked", whole=False, frozen_a=frozen_a, bn=True)
    assert want[2]["image.net.3.num_batches_tracked"] == B // MICRO  # once per micro-batch
    model, x, t = make(0.3, bn=True)
    if frozen_a:
        model.image.requires_grad_(False)
    kw = {}
    if encoders == "modules":
        encode_a, encode_b = model.image, model.text
    elif encoders == "bound methods":
        encode_a, encode_b = model.image.forward, model.text.forward
    elif encoders == "pair":  # closures hide their modules: `modules=` names them
        encode_a, encode_b = (lambda ab: model(*ab)), None
        kw["modules"] = model
    else:
        encode_a, encode_b = (lambda a: model.image(a)), (lambda b: model.text(b))
        kw["modules"] = [model.image, model.text]
    torch.manual_seed(1)
    loss = grad_cache_step(
        encode_a, encode_b, x, t, loss_of(model, "chunked"),
        micro_batch_size=MICRO, mode=mode, frozen_a=frozen_a, **kw,
    )
    assert_same(outcome(loss, model), want)


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_loss_of_one_side(mode: str, side: str) -> None:
    """The unused encoder gets no gradient (None, as after the plain step); the other its own."""
    want = reference(0.3, f"{side} only", whole=False)
    unused = "text." if side == "a" else "image."
    assert want[1] and not any(n.startswith(unused) for n in want[1])
    assert_same(cached(0.3, f"{side} only", mode), want)


def test_dropout_really_differs_between_micro_batches() -> None:
    """Guard for the test above: without the RNG restore the re-run would see other masks."""
    model, x, _ = make(0.3)
    torch.manual_seed(1)
    first = model.image(x[:MICRO])
    second = model.image(x[:MICRO])
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
def test_no_sync_entered_for_all_but_last(mode: str) -> None:
    entered: list[int] = []
    calls = {"n": 0}

    @contextlib.contextmanager
    def no_sync():
        entered.append(calls["n"])
        yield

    model, x, t = make(0.0)

    def encode_b(b: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            calls["n"] += 1
        return model.text(b)

    grad_cache_step(
        model.image, encode_b, x, t, loss_of(model, "naive"),
        micro_batch_size=MICRO, mode=mode, no_sync=[no_sync, no_sync],
    )
    # Entered twice (two factories) before each of the first B / MICRO - 1 grad forwards.
    assert entered == [i for i in range(B // MICRO - 1) for _ in range(2)]


def test_batch_structures() -> None:
    """Micro-batches may be tuples or dicts of tensors (e.g. pixels and a mask)."""
    model, x, t = make(0.0)

    def encode_a(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.image(parts["x"] * parts["w"][:, None])

    loss = grad_cache_step(
        encode_a, lambda b: model.text(b[0]), {"x": x, "w": torch.ones(B, dtype=x.dtype)}, (t,),
        loss_of(model, "naive"), micro_batch_size=MICRO,
    )
    assert torch.isfinite(loss)


def test_bad_input() -> None:
    model, x, t = make(0.0)
    fn = loss_of(model, "naive")
    with pytest.raises(ValueError, match="not a positive multiple of micro_batch_size=5"):
        grad_cache_step(model.image, model.text, x, t, fn, micro_batch_size=5)
    with pytest.raises(ValueError, match="as many samples"):
        grad_cache_step(model.image, model.text, x, t[:8], fn, micro_batch_size=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        grad_cache_step(model.image, model.text, x, t, fn, micro_batch_size=4, mode="gc")
    with pytest.raises(ValueError, match="at least 1"):
        split_batch(x, 0)
    with pytest.raises(ValueError, match="different batch sizes"):
        split_batch((x, t[:6]), 3)
    with pytest.raises(TypeError, match="must be a tensor"):
        split_batch("abc", 1)


def _rows(k: int):
    return lambda m: m[:k]


BAD_ENCODER_B = {
    "tuple": (lambda m: (m, m), TypeError, r"encode_b must return .* got a tuple of 2 items"),
    "integer": (lambda m: m.long(), TypeError, r"encode_b .* got a torch.int64 tensor of shape"),
    "rows": (_rows(3), ValueError, r"encode_b .* micro-batch of 4 samples, got .* shape \(3, 6\)"),
    "1-D": (lambda m: m[:, 0], ValueError, r"encode_b .* \[4, d\] .* got .* shape \(4,\)"),
    "3-D": (lambda m: m[:, None], ValueError, r"encode_b .* got .* shape \(4, 1, 6\)"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ENCODER_B))
def test_bad_encoder_output(bad: str) -> None:
    model, x, t = make(0.0)
    wrap, error, message = BAD_ENCODER_B[bad]
    with pytest.raises(error, match=message):
        grad_cache_step(
            model.image, lambda b: wrap(model.text(b)), x, t, loss_of(model, "naive"),
            micro_batch_size=MICRO,
        )


def test_bad_pair_encoder_output() -> None:
    model, x, t = make(0.0)
    fn = loss_of(model, "naive")
    with pytest.raises(TypeError, match=r"encode_a must return a pair .* got a torch.float64"):
        grad_cache_step(lambda ab: model.image(ab[0]), None, x, t, fn, micro_batch_size=MICRO)
    with pytest.raises(ValueError, match=r"encode_a\(\.\.\.\)\[1\] .* got .* shape \(2, 6\)"):
        grad_cache_step(
            lambda ab: (model.image(ab[0]), model.text(ab[1])[:2]), None, x, t, fn,
            micro_batch_size=MICRO,
        )


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
def test_bad_loss_output(mode: str) -> None:
    model, x, t = make(0.0)
    step = lambda fn: grad_cache_step(  # noqa: E731
        model.image, model.text, x, t, fn, micro_batch_size=MICRO, mode=mode,
    )
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor, got a float"):
        step(lambda a, b: 1.0)
    with pytest.raises(ValueError, match=r"loss_fn .* got a torch.float64 tensor of shape \(12,\)"):
        step(lambda a, b: (a * b).sum(-1))


@pytest.mark.parametrize("mode", ["cache", "accumulate"])
@pytest.mark.parametrize("frozen_a", [False, True])
def test_pair_encoder(mode: str, frozen_a: bool) -> None:
    """One call encodes both sides (the form DDP needs); same gradients as the plain step."""
    want = reference(0.3, "chunked", whole=False, frozen_a=frozen_a)
    model, x, t = make(0.3)
    if frozen_a:
        model.image.requires_grad_(False)
    torch.manual_seed(1)
    loss = grad_cache_step(
        lambda ab: (model.image(ab[0]), model.text(ab[1])), None, x, t, loss_of(model, "chunked"),
        micro_batch_size=MICRO, mode=mode, frozen_a=frozen_a,
    )
    assert_same(outcome(loss, model), want)


def _ddp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        for mode in ("cache", "accumulate"):
            model, x, t = make(0.0)
            ddp = nn.parallel.DistributedDataParallel(model)
            shard = slice(rank * B // world, (rank + 1) * B // world)
            for _ in range(2):  # a second step fails if DDP missed a gradient in the first
                model.zero_grad()
                grad_cache_step(
                    lambda ab: ddp(*ab), None, x[shard], t[shard],  # noqa: B023
                    lambda a, b: infcl.inf_loss(a, b, model.logit_scale.exp(), symmetric=True,  # noqa: B023
                                              group=dist.group.WORLD),
                    micro_batch_size=MICRO // 2, mode=mode, no_sync=ddp.no_sync,
                )
            result[mode] = grads(model)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_ddp_two_ranks_equal_plain_step(tmp_path) -> None:
    """Under DDP (gloo, 2 ranks, no_sync, inf_loss across ranks), each rank holding half the
    batch, the averaged gradients are those of the plain step on the whole batch, both modes."""
    import torch.multiprocessing as mp

    world = 2
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_rank, args=(world, str(tmp_path / "init"), out), nprocs=world)
    want = reference(0.0, "naive", whole=True)[1]
    for mode, got in torch.load(out, weights_only=True).items():
        assert got.keys() == want.keys(), mode
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0, msg=f"{mode}: {n}")
