"""Distributed test support: one pool of spawned gloo ranks, sharded problems and their checks.

Spawning ranks costs seconds each (a fresh interpreter imports torch), so the tests share one
pool of `POOL_SIZE` processes for the whole module, started once. The pool's default group has
every rank; `SUBGROUPS` adds a group of each smaller size, so one spawn serves world sizes 1..4
(and tests groups whose ranks are not 0..W-1). A job is a module-level function run on every
rank of the pool; ranks outside the job's group skip its collectives.

The pool runs gloo on CPU by default. `INFCL_TEST_BACKEND=nccl` runs the same tests on NCCL with
one GPU per rank, `INFCL_TEST_WORLD` sets the pool size (default 4; 2 on a 2-GPU machine).

A `Sharded` problem is a global batch split into per-rank shards, described by a few numbers
and a seed; every rank rebuilds the same global batch from the seed, runs the loss on its own
shard and checks its loss and gradients against `naive_loss` on the whole batch.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from helpers import FLOOR, make_cotangent, within
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor

from infcl import naive_loss

BACKEND = os.environ.get("INFCL_TEST_BACKEND", "gloo")
POOL_SIZE = int(os.environ.get("INFCL_TEST_WORLD", "4"))
TIMEOUT = datetime.timedelta(seconds=60)
SUBGROUPS = (
    {1: [2], 2: [1, 3], 3: [0, 2, 3]}
    if POOL_SIZE == 4
    else {w: list(range(POOL_SIZE - w, POOL_SIZE)) for w in range(1, POOL_SIZE)}
)
"""Ranks of the pool that form the group of each world size below POOL_SIZE (the default group
has them all). Groups whose members are not 0..W-1 check the group-to-global rank mapping."""
JOB_TIMEOUT_S = 240.0


@dataclass
class Ctx:
    """What a job sees: this process's rank in the pool and the group of every world size."""

    rank: int
    groups: dict[int, Any]
    device: torch.device

    def group(self, world: int) -> Any:
        """The group of `world` ranks (the default group for the whole pool), as a loss takes it."""
        return dist.group.WORLD if world == POOL_SIZE else self.groups[world]

    def member(self, world: int) -> bool:
        return world == POOL_SIZE or self.rank in SUBGROUPS[world]

    def group_rank(self, world: int) -> int:
        return dist.get_rank(self.group(world))


def _pool_main(rank: int, init_file: str, tasks: Any, results: Any) -> None:
    device = torch.device("cpu")
    if BACKEND == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        BACKEND, init_method=f"file://{init_file}", rank=rank, world_size=POOL_SIZE,
        timeout=TIMEOUT,
    )
    groups = {w: dist.new_group(ranks, timeout=TIMEOUT) for w, ranks in SUBGROUPS.items()}
    ctx = Ctx(rank, groups, device)
    while True:
        fn, args = tasks.get()
        try:
            results.put((rank, True, fn(ctx, *args)))
        except BaseException:  # noqa: B036  (report everything, the pool decides)
            results.put((rank, False, traceback.format_exc()))


class Pool:
    """`POOL_SIZE` spawned ranks on gloo that run jobs until closed.

    A job that fails on one rank kills the pool (its peers may be stuck in a collective); the
    next `run` starts a fresh one.
    """

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="infcl-pg-")
        os.close(fd)
        os.unlink(init_file)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(POOL_SIZE)]
        self.procs = [
            ctx.Process(target=_pool_main, args=(r, init_file, self.tasks[r], self.results),
                        daemon=True)
            for r in range(POOL_SIZE)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run `fn(ctx, *args)` on every rank; return the results in rank order or raise."""
        if not self.procs:
            self._start()
        for t in self.tasks:
            t.put((fn, args))
        out: dict[int, Any] = {}
        while len(out) < POOL_SIZE:
            try:
                rank, ok, value = self.results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"{fn.__name__}: no answer within {JOB_TIMEOUT_S} s") from None
            if not ok:
                self.kill()
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            out[rank] = value
        return [out[r] for r in range(POOL_SIZE)]

    def kill(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self.procs = []

    def close(self) -> None:
        """Stop the ranks. They hold nothing worth a clean exit, and tearing the process groups
        down costs seconds per rank, so they are killed."""
        self.kill()


WORLDS = st.integers(1, POOL_SIZE)


@dataclass(frozen=True)
class Sharded:
    """A global batch split over `len(ms)` ranks: rank r holds ms[r] rows of q and ns[r] of k.

    `labels` are global column indices (None: the global diagonal).
    """

    ms: tuple[int, ...]
    ns: tuple[int, ...]
    d: int
    symmetric: bool = False
    labels: tuple[int, ...] | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    scale: float = 1.0
    scale_is_tensor: bool = True
    unit: bool = False
    chunk_size: int | None = None
    dtype: str = "float64"
    seed: int = 0

    @property
    def world(self) -> int:
        return len(self.ms)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def batch(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The global q [M, D], k [N, D] (in `dtype`) and labels, the same on every rank."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(sum(self.ms), self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(sum(self.ns), self.d, generator=gen, dtype=torch.float64)
        if self.unit:
            q = q / q.norm(dim=1, keepdim=True)
            k = k / k.norm(dim=1, keepdim=True)
        labels = None if self.labels is None else torch.tensor(self.labels, dtype=torch.long)
        return q.to(self.torch_dtype), k.to(self.torch_dtype), labels

    def rows(self, r: int) -> slice:
        return slice(sum(self.ms[:r]), sum(self.ms[: r + 1]))

    def cols(self, r: int) -> slice:
        return slice(sum(self.ns[:r]), sum(self.ns[: r + 1]))

    def scale_arg(self) -> float | Tensor:
        if not self.scale_is_tensor:
            return self.scale
        acc = torch.float64 if self.torch_dtype == torch.float64 else torch.float32
        return torch.tensor(self.scale, dtype=acc)

    def spec_kwargs(self) -> dict[str, Any]:
        _, _, labels = self.batch()
        return {
            "labels": labels, "symmetric": self.symmetric, "reduction": self.reduction,
            "ignore_index": self.ignore_index,
        }


@st.composite
def sharded(draw: st.DrawFn, worlds: st.SearchStrategy[int] = WORLDS) -> Sharded:
    """Any valid sharded problem: unequal shards (zero rows included), labels on any rank."""
    w = draw(worlds)
    shard = st.integers(0, 6)
    symmetric = draw(st.booleans())
    with_labels = not symmetric and draw(st.booleans())
    ms = tuple(draw(st.lists(shard, min_size=w, max_size=w).filter(lambda s: sum(s) > 0)))
    if symmetric:
        ns = ms
    elif with_labels:
        ns = tuple(draw(st.lists(shard, min_size=w, max_size=w).filter(lambda s: sum(s) > 0)))
    else:  # the global diagonal: as many columns as rows overall, split differently
        cuts = sorted(draw(st.lists(st.integers(0, sum(ms)), min_size=w - 1, max_size=w - 1)))
        ns = tuple(b - a for a, b in zip([0, *cuts], [*cuts, sum(ms)], strict=True))
    ignore_index, labels = -100, None
    if with_labels:
        ignore_index = draw(st.sampled_from([-100, 1]))
        col = st.integers(0, sum(ns) - 1)
        labels = tuple(
            draw(st.lists(st.one_of(col, col, col, st.just(ignore_index)), min_size=sum(ms),
                          max_size=sum(ms)))
        )
    return Sharded(
        ms=ms, ns=ns, d=draw(st.integers(1, 9)), symmetric=symmetric, labels=labels,
        ignore_index=ignore_index, reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        scale=draw(st.one_of(st.sampled_from([1.0, 14.285714, 100.0]), st.floats(0.01, 100.0))),
        scale_is_tensor=draw(st.booleans()), unit=draw(st.booleans()),
        chunk_size=draw(st.sampled_from([None, 1, 2, 3, 5])),
        dtype=draw(st.sampled_from(["float64", "float64", "float32", "bfloat16"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def local_losses(p: Sharded, per: Tensor) -> list[Tensor]:
    """Each rank's return value, from the global per-row losses: the contract's local reduction."""
    _, _, labels = p.batch()
    out = []
    for r in range(p.world):
        mine = per[p.rows(r)]
        if p.reduction == "none":
            out.append(mine)
        elif p.reduction == "sum":
            out.append(mine.sum())
        else:
            counted = (
                torch.ones_like(mine, dtype=torch.bool) if labels is None
                else labels[p.rows(r)] != p.ignore_index
            )
            out.append(mine[counted].sum() / counted.sum())
    return out


def reference(p: Sharded, dtype: torch.dtype) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
    """Every rank's loss and the gradients of their sum, by naive_loss on the global batch.

    With reduction="none" the gradients are those of `sum_r cot_r . loss_r`, cot from the seed.
    """
    q, k, _ = p.batch()
    q = q.to(dtype).requires_grad_()
    k = k.to(dtype).requires_grad_()
    s = p.scale_arg()
    if isinstance(s, Tensor):
        s = s.to(torch.float64 if dtype == torch.float64 else s.dtype).requires_grad_()
    kw = p.spec_kwargs() | {"reduction": "none"}
    losses = local_losses(p, naive_loss(q, k, s, **kw))
    if p.reduction == "none":
        cot = make_cotangent(q.shape[0], p.seed).to(losses[0].dtype)
        total = sum((cot[p.rows(r)] * x).sum() for r, x in enumerate(losses))
    else:
        total = sum(x.nan_to_num(0.0) for x in losses)  # a rank with no counted row: NaN, no grad
    total.backward()
    ds = s.grad if isinstance(s, Tensor) else None
    return [x.detach() for x in losses], q.grad, k.grad, ds


def _close(name: str, got: Tensor, truth: Tensor, ref: Tensor, floor: float, c: float = 2.0) -> str:
    """'' when `got` meets the tolerance rule of helpers.py against the float64 truth."""
    if got.shape != truth.shape:
        return f"{name}: shape {tuple(got.shape)}, want {tuple(truth.shape)}"
    if not torch.equal(torch.isnan(got), torch.isnan(truth.to(got.dtype))):
        return f"{name}: NaN where the spec is not, or the reverse: {got} vs {truth}"
    if not got.numel():
        return ""
    ok, e, e_ref, bound = within(got, ref, truth, floor=floor, c=c)
    return "" if ok else f"{name}: err {e:.3g} > bound {bound:.3g} (naive err {e_ref:.3g})"


def check_case(ctx: Ctx, p: Sharded, loss_fn: Callable[..., Tensor]) -> str:
    """Run `loss_fn` on this rank's shard of `p` and compare it with naive on the whole batch.

    Returns '' or a description of every mismatch on this rank (it never raises while its peers
    may still be in a collective). Ranks outside the problem's group return ''.
    """
    if not ctx.member(p.world):
        return ""
    group = ctx.group(p.world)
    r = ctx.group_rank(p.world)
    dtype = p.torch_dtype
    q, k, labels = p.batch()
    dev = ctx.device
    q_r = q[p.rows(r)].to(dev).requires_grad_()
    k_r = k[p.cols(r)].to(dev).requires_grad_()
    s = p.scale_arg()
    if isinstance(s, Tensor):
        s = s.to(dev).requires_grad_()
    kw = p.spec_kwargs()
    kw["labels"] = None if labels is None else labels[p.rows(r)].to(dev)
    loss = loss_fn(q_r, k_r, s, group=group, chunk_size=p.chunk_size, **kw)
    if p.reduction == "none":
        loss.backward(make_cotangent(q.shape[0], p.seed)[p.rows(r)].to(loss))
    else:
        loss.backward()
    dq, dk = q_r.grad.cpu(), k_r.grad.cpu()

    truth = reference(p, torch.float64)
    same = reference(p, dtype)
    floor = FLOOR[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    errors = []
    if loss.dtype != acc:
        errors.append(f"loss dtype {loss.dtype}, want {acc}")
    if dq.dtype != dtype or dk.dtype != dtype:
        errors.append(f"grad dtypes {dq.dtype}, {dk.dtype}, want {dtype}")
    errors.append(_close("loss", loss.detach().cpu(), truth[0][r], same[0][r], floor))
    errors.append(_close("dq", dq, truth[1][p.rows(r)], same[1][p.rows(r)], floor))
    errors.append(_close("dk", dk, truth[2][p.cols(r)], same[2][p.cols(r)], floor))
    # Each rank holds its share of dscale; the shares add up to the gradient of the sum of the
    # losses. (The all-reduce runs on every rank, with or without a scale to check.)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    if isinstance(s, Tensor):
        total += s.grad.detach().double()
    dist.all_reduce(total, group=group)
    if isinstance(s, Tensor):
        errors.append(_close("sum of dscale", total.cpu(), truth[3], same[3].double(), floor))
        if dtype == torch.float64:
            share = (q[p.rows(r)] * truth[1][p.rows(r)]).sum() / p.scale
            errors.append(_close("dscale share", s.grad.cpu(), share, share, 1e-9))
    return "; ".join(e for e in errors if e)


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
