"""ring_loss across gloo ranks computes the spec on the global batch, with DDP's gradient convention.

All distributed tests share one pool of 4 spawned ranks (see dist_utils.py): world sizes 1..4
are subgroups of it. Hypothesis draws the sharded problems in this process (derandomized); every
rank replays the same list and checks its own loss and gradients against naive_loss on the
whole batch, so one spawn serves every problem (about 70 of them).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import POOL_SIZE, Ctx, Pool, Sharded, check_case, sharded
from helpers import assert_close_to_naive
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infcl import naive_loss
from infcl.chunked import chunked_loss
from infcl.ring import ring_loss

pytestmark = pytest.mark.dist

DRAWN_PER_WORLD = 15

BIG_LOGITS = Sharded(ms=(3, 3, 3, 3), ns=(3, 3, 3, 3), d=7, symmetric=True, scale=100.0)
"""Inf-CL defect 6: scale 100 on gaussian rows puts logits far beyond 88.7 (exp overflows)."""

PINNED = [
    # Inf-CL defect 8: every positive lives on another rank (global labels).
    Sharded(ms=(3, 2), ns=(2, 4), d=5, labels=(5, 4, 3, 0, 1)),
    # Inf-CL defect 7: unequal shards, a rank with no rows, the diagonal crossing rank borders.
    Sharded(ms=(4, 0, 3), ns=(2, 3, 2), d=3, reduction="sum"),
    Sharded(ms=(3, 0, 2, 1), ns=(3, 0, 2, 1), d=4, symmetric=True, reduction="none"),
    Sharded(ms=(0, 5), ns=(0, 5), d=3, symmetric=True),
    # A rank whose rows are all ignored (its mean is NaN, its gradients are not).
    Sharded(ms=(2, 2), ns=(1, 3), d=3, labels=(-100, -100, 0, 3)),
    # ignore_index equal to a real column: the ignore rule wins.
    Sharded(ms=(2, 1, 2), ns=(2, 2, 1), d=2, labels=(1, 4, 1, 0, 3), ignore_index=1),
    BIG_LOGITS,
    # bf16 keys on the wire at scale 100.
    Sharded(ms=(3, 4, 2, 3), ns=(3, 4, 2, 3), d=7, symmetric=True, scale=100.0, dtype="bfloat16",
            unit=True, reduction="none"),
    Sharded(ms=(1,), ns=(1,), d=1),
]


def draw_cases(world: int, n: int) -> list[Sharded]:
    """n problems of `world` ranks, drawn by Hypothesis from a fixed seed (the same every run)."""
    drawn: list[Sharded] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(sharded(st.just(world)))
    def collect(p: Sharded) -> None:
        drawn.append(p)

    collect()
    return drawn[:n]


@pytest.fixture(scope="module")
def pool():
    p = Pool()
    yield p
    p.close()


def job_cases(ctx: Ctx, cases: list[Sharded]) -> list[str]:
    return [check_case(ctx, p, ring_loss) for p in cases]


@pytest.mark.parametrize("world", range(1, POOL_SIZE + 1))
def test_matches_naive_on_global_batch(pool, world):
    """Loss and dq, dk, dscale of every rank against naive_loss on the gathered batch."""
    cases = [p for p in PINNED if p.world == world] + draw_cases(world, DRAWN_PER_WORLD)
    per_rank = pool.run(job_cases, cases)
    failures = [
        f"{p}\n  rank {r}: {msg}"
        for i, p in enumerate(cases)
        for r, msgs in enumerate(per_rank)
        if (msg := msgs[i])
    ]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:10])


def test_learnable_scale_without_process_group():
    """Inf-CL defect 1: with no process group a learnable scale trains (single-device path)."""
    assert not (dist.is_available() and dist.is_initialized())
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    logit_scale = torch.tensor(2.5, dtype=torch.float64)
    for symmetric in (False, True):
        assert_close_to_naive(
            ring_loss, q, k, logit_scale.exp(), dtype=torch.float64, symmetric=symmetric,
            chunk_size=3,
        )


def job_ddp(ctx: Ctx, world: int) -> list[float] | None:
    """A CLIP-style step under DistributedDataParallel with a learnable logit scale.

    Returns this rank's averaged gradients (scale first), or None outside the group.
    """
    if not ctx.member(world):
        return None
    group = ctx.group(world)
    r = ctx.group_rank(world)
    model = _Clip().to(ctx.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    x, y = _clip_data(world)
    loss = ring_loss(*ddp(x[r].to(ctx.device), y[r].to(ctx.device)), symmetric=True,
                     group=group, chunk_size=2)
    loss.backward()
    return [model.logit_scale.grad.item(), *model.img.weight.grad.flatten().tolist(),
            *model.txt.weight.grad.flatten().tolist()]


class _Clip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.img = torch.nn.Linear(6, 4, bias=False, dtype=torch.float64)
        self.txt = torch.nn.Linear(5, 4, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.img.weight.copy_(torch.randn(4, 6, generator=gen))
            self.txt.weight.copy_(torch.randn(4, 5, generator=gen))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x, y):
        return self.img(x), self.txt(y), self.logit_scale.exp()


def _clip_data(world: int, per_rank: int = 3):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(world, per_rank, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(world, per_rank, 5, generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= POOL_SIZE])
def test_ddp_gradients_are_those_of_the_mean(pool, world):
    """Inf-CL defect 2: after DDP's averaging every gradient, the scale's included, is the
    gradient of the mean over ranks, i.e. of the global loss with equal shards (not W times it)."""
    got = [g for g in pool.run(job_ddp, world) if g is not None]
    model = _Clip()
    x, y = _clip_data(world)
    img, txt, s = model(x.flatten(0, 1), y.flatten(0, 1))
    naive_loss(img, txt, s, symmetric=True).backward()
    want = torch.tensor([model.logit_scale.grad.item(), *model.img.weight.grad.flatten().tolist(),
                         *model.txt.weight.grad.flatten().tolist()])
    for g in got:
        torch.testing.assert_close(torch.tensor(g), want, rtol=1e-9, atol=1e-12)


def job_bad_labels(ctx: Ctx) -> str | None:
    """A label out of the global range on one rank must raise on every rank, not hang."""
    world = min(3, POOL_SIZE)
    if not ctx.member(world):
        return None
    r = ctx.group_rank(world)
    q = torch.randn(2, 3, dtype=torch.float64, device=ctx.device)
    labels = torch.tensor([0, 6 if r == 1 else 1], device=ctx.device)  # 6: global N
    try:
        ring_loss(q, q, labels=labels, group=ctx.group(world))
    except ValueError as e:
        return str(e)
    return "no error"


def job_bad_symmetric(ctx: Ctx) -> str | None:
    world = 2
    if not ctx.member(world):
        return None
    r = ctx.group_rank(world)
    q = torch.randn(2 + r, 3, device=ctx.device)
    k = torch.randn(3 - r, 3, device=ctx.device)
    try:
        ring_loss(q, k, symmetric=True, group=ctx.group(world))
    except ValueError as e:
        return str(e)
    return "no error"


def test_global_errors_raise_on_every_rank(pool):
    msgs = [m for m in pool.run(job_bad_labels) if m is not None]
    assert len(msgs) == min(3, POOL_SIZE) and all("ranks [1]" in m for m in msgs), msgs
    msgs = [m for m in pool.run(job_bad_symmetric) if m is not None]
    assert len(msgs) == 2 and all("as many q as k rows" in m for m in msgs), msgs


def job_compile(ctx: Ctx) -> str | None:
    """ring_loss inside torch.compile(fullgraph=True) matches eager, forward and backward."""
    world = 2
    if not ctx.member(world):
        return None
    from torch._dynamo.testing import CompileCounterWithBackend

    group = ctx.group(world)
    r = ctx.group_rank(world)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, logit_scale, labels):
        s = logit_scale.exp()
        sym = ring_loss(q, q, s, symmetric=True, group=group, chunk_size=2)
        lab = ring_loss(q, k, s, labels=labels, reduction="sum", group=group)
        return sym + lab

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    out = []
    for m in (3 + r, 5 + 2 * r):  # unequal shards, then a second batch size
        gen = torch.Generator().manual_seed(m)
        q = torch.randn(m, 4, generator=gen, dtype=torch.float64).to(ctx.device)
        k = torch.randn(2 + r, 4, generator=gen, dtype=torch.float64).to(ctx.device)
        labels = torch.randint(0, 5, (m,), generator=gen).to(ctx.device)  # global N = 2 + 3
        results = []
        for fn in (step, compiled):
            args = [q.clone().requires_grad_(), k.clone().requires_grad_(),
                    torch.tensor(1.7, dtype=torch.float64, device=ctx.device,
                                 requires_grad=True), labels.clone()]
            torch._dynamo.mark_dynamic(args[0], 0)
            torch._dynamo.mark_dynamic(args[3], 0)
            loss = fn(*args)
            loss.backward()
            results.append([loss.detach(), args[0].grad, args[1].grad, args[2].grad])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        out.append(sum("ring_fwd" in g.code for g in counter.graphs))
    return str(out)


def test_compile_fullgraph(pool):
    """One graph with both ring ops, no break, and no recompile for a second batch size."""
    graphs = [f for f in pool.run(job_compile) if f is not None]
    assert graphs == ["[1, 1]"] * 2, graphs


def job_group_of_one(ctx: Ctx) -> bool | None:
    """Inf-CL defect 7: a group of one rank is the single-device loss (no self-send)."""
    if not ctx.member(1):
        return None
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 6, 3, generator=gen).to(ctx.device)
    a = ring_loss(q, k, 4.0, symmetric=True, group=ctx.group(1))
    b = chunked_loss(q, k, 4.0, symmetric=True)
    return bool(torch.equal(a, b))


def job_opcheck(ctx: Ctx) -> bool | None:
    """torch.library.opcheck on the ring op: schema, fake tensors, autograd registration, AOT."""
    world = 2
    if not ctx.member(world):
        return None
    from infcl.dist import group_name

    r = ctx.group_rank(world)
    gen = torch.Generator().manual_seed(r)
    dev = ctx.device
    q = torch.randn(2 + r, 3, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    k = torch.randn(2 + r, 3, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, device=dev, requires_grad=True)
    name = group_name(ctx.group(world))
    for args in (
        (q, k, s, q.new_empty(0, dtype=torch.long), True, True, -100, name, "chunked", "0"),
        (q, k, s, torch.tensor([4, 0, -100][: 2 + r], device=dev), False, False, -100, name,
         "chunked", "1"),
    ):
        torch.library.opcheck(torch.ops.infcl.ring_fwd.default, args)
    return True


def test_opcheck(pool):
    assert [x for x in pool.run(job_opcheck) if x is not None] == [True, True]


def test_group_of_one(pool):
    assert [x for x in pool.run(job_group_of_one) if x is not None] == [True]


def test_pinned_cases_are_valid():
    """The pinned problems satisfy the contract they are meant to exercise."""
    for p in PINNED:
        q, k, labels = p.batch()
        kw = p.spec_kwargs() | {"reduction": "none"}
        assert naive_loss(q.double(), k.double(), p.scale, **kw).shape == (sum(p.ms),)
    q, k, _ = BIG_LOGITS.batch()
    assert float((q @ k.T).max()) * BIG_LOGITS.scale > 200.0
