"""The ring: key shards travel around the ranks, one block op per step, as two `torch.library` ops.

`infcl::ring_fwd` and `infcl::ring_bwd` run a whole ring (every step and every transfer)
inside one opaque op keyed by the process group's name, so `torch.compile(fullgraph=True)` sees
one node with a fake implementation and registered autograd instead of P2P calls it cannot trace.

Schedule on rank r of W (ranks of the group; `nxt = r + 1`, `prv = r - 1` mod W), step t = 0..W-1
works on the key block of rank `src = r - t`:

* forward: the block travels ahead (sent to `nxt` before this step's compute, so the transfer
  overlaps it); rank r merges the block's row log-sum-exp into its rows with `logaddexp` and adds
  the positive logit (nonzero only in the block that holds the label). When symmetric, the column
  log-sum-exp of the block over rank r's rows is merged into an accumulator that follows the block
  one step behind; after the last step one more transfer brings every accumulator home, merged
  over all ranks' rows.
* backward: the block travels ahead again, with its column statistics (global column LSE and the
  gradient of its column LSE) when symmetric; dq and dscale accumulate locally; the block's key
  gradient (fp32) follows one step behind and arrives home after W steps. It is received before
  the step that adds to it (while the next keys arrive during the compute), so each rank holds
  one of it, and the block op adds into it and into dq in place (`<block>_bwd_into`, where the
  block has one).

Large shards are cut into up to `RING_SLICES` slices of key rows, and each ring above runs once
per slice: the transfers and the travelling key gradient are a slice's size, and the memory per
rank is the fp32 dq accumulator and the gradients, plus a few slices. On CUDA the transfers run
on the process group's own communication stream (NCCL), so they overlap the block compute on the
current stream without a stream of ours. The block op pair is a parameter: `block="chunked"`
runs `infcl::chunked_fwd` / `_bwd_into` (torch tiles) at every step, `"inf"` runs
`infcl::inf_fwd` / `_bwd` (Triton); both take the same arguments, `chunk_size` and `precision`
included, and each uses its own.

Before anything else every rank all-gathers a small status record (its shard sizes, its label
range, dtype, scale, and whether its own arguments were valid). A rank whose arguments the
contract rejected takes part in that one collective from `infcl::reject` (`share_status`), so all
ranks fail at once with the reason instead of waiting in the ring for the process-group timeout.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from infcl.kernels.numerics import FLOAT_DTYPES, LSE_DTYPE, acc_dtype

__all__ = [
    "NO_IGNORE",
    "group_name",
    "group_size",
    "resolve_group",
    "ring_bwd",
    "ring_fwd",
    "ring_sigmoid_bwd",
    "ring_sigmoid_fwd",
    "share_status",
]

NO_IGNORE = -(1 << 63)
"""An `ignore_index` no label can equal once its range is checked: for losses without one."""

TAG_KEYS, TAG_TRAIL, TAG_STATS = 0, 1, 2
"""P2P tags: gloo matches messages by (peer, tag), and W=2 sends several tensors to one peer."""

RING_SLICES = 8
"""Passes of each ring over slices of every key shard (rows of k, columns of the logits): a
transfer, the travelling key gradient and a block op's working copy of the keys then hold
1/RING_SLICES of a shard each, so that the backward's peak is the fp32 dq accumulator beside the
two gradients while it is rounded into dq (the floor with exact fp32 accumulation: twice the
inputs for 16-bit inputs with as many q as k rows)."""

MIN_SLICE_COLUMNS = 8192
"""The fewest key rows a slice is cut to: smaller shards take fewer passes (one below this), so
that small blocks do not pay the per-step overhead RING_SLICES times."""


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; None means this process alone. A loss runs the ring when it is > 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_name(group: dist.ProcessGroup) -> str:
    """The name by which the ring ops find `group` again."""
    return group.group_name


def resolve_group(name: str) -> dist.ProcessGroup:
    """The process group registered under `name` (inverse of `group_name`)."""
    c10d = dist.distributed_c10d
    if hasattr(c10d, "_resolve_process_group"):
        return c10d._resolve_process_group(name)
    for pg, pg_name in c10d._world.pg_names.items():  # torch without the C++ registry
        if pg_name == name:
            return pg
    raise ValueError(f"no process group named {name!r}")


class _Ring:
    """This rank's place in the ring and the P2P calls of one step."""

    def __init__(self, name: str):
        self.group = resolve_group(name)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.nxt = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prv = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        nccl = dist.get_backend(self.group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def start(self, sends: list[tuple[int, Tensor]], recvs: list[tuple[int, Tensor]]) -> list:
        """Post sends to `nxt` and receives from `prv`; empty tensors are skipped on both ends.

        Every rank knows every shard's size, so sender and receiver skip the same messages.
        """
        ops = [
            dist.P2POp(dist.isend, t, self.nxt, self.group, tag) for tag, t in sends if t.numel()
        ] + [dist.P2POp(dist.irecv, t, self.prv, self.group, tag) for tag, t in recvs if t.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    def exchange(self, send: Tensor, recv: Tensor, tag: int) -> Tensor:
        for work in self.start([(tag, send)], [(tag, recv)]):
            work.wait()
        return recv


def _wait(works: list) -> None:
    for work in works:
        work.wait()


_STATUS_FIELDS = 11
"""[rejected, M_r, N_r, D, lowest label, highest label, dtype, symmetric, diagonal, scale bits,
bias bits]"""
_NO_LABELS = (1 << 62, -(1 << 62))


def _gather_status(ring: _Ring, mine: list[int], reason: str, device: torch.device) -> list[list[int]]:
    """All-gather every rank's status record; if any rank rejected its arguments, fail here.

    A rank that rejected its own arguments (`reason` not empty) returns, to raise its own error;
    every other rank raises ValueError naming the ranks at fault and why.
    """
    table = [torch.empty(_STATUS_FIELDS, dtype=torch.int64, device=device) for _ in range(ring.world)]
    dist.all_gather(table, torch.tensor(mine, dtype=torch.int64, device=device), group=ring.group)
    rows = torch.stack(table).tolist()
    failed = [i for i, row in enumerate(rows) if row[0]]
    if failed:
        reasons: list[str | None] = [None] * ring.world
        dist.all_gather_object(reasons, reason, group=ring.group)
        if not reason:
            said = "; ".join(f"rank {i}: {reasons[i]}" for i in failed)
            raise ValueError(
                f"the loss was rejected on rank(s) {failed} of the group, so it fails on every "
                f"rank: {said}"
            )
    return rows


def share_status(name: str, reason: str) -> None:
    """Tell the ranks of group `name` that this rank rejected its arguments, and why."""
    ring = _Ring(name)
    _gather_status(ring, [1] + [0] * (_STATUS_FIELDS - 1), reason, ring.device or torch.device("cpu"))


def _bits(x: Tensor | float) -> int:
    """A number's float64 bits as an int64, to travel in the status record (-0.0 as 0.0, every
    NaN as one NaN, so that equal numbers compare equal)."""
    v = float(x)
    v = math.nan if math.isnan(v) else v + 0.0
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _unbits(v: int) -> float:
    return struct.unpack("<d", struct.pack("<q", v))[0]


def _exchange_shapes(
    ring: _Ring, q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, diagonal: bool,
    symmetric: bool, ignore_index: int, bias: Tensor | float = 0.0,
) -> list[list[int]]:
    """All-gather every rank's status, shard sizes and label range, and check the global batch.

    Every rank sees the same table and raises the same error, so a bad shard on one rank cannot
    leave the others waiting in the ring.
    """
    lo, hi = _NO_LABELS
    if not diagonal and labels.numel():
        y = labels.long()
        keep = y != ignore_index if ignore_index != NO_IGNORE else torch.ones_like(y, dtype=torch.bool)
        lo = int(torch.where(keep, y, torch.full_like(y, lo)).min())
        hi = int(torch.where(keep, y, torch.full_like(y, hi)).max())
    mine = [0, q.shape[0], k.shape[0], q.shape[1], lo, hi, FLOAT_DTYPES.index(q.dtype),
            symmetric, diagonal, _bits(scale), _bits(bias)]
    rows = _gather_status(ring, mine, "", ring.device or torch.device("cpu"))
    ms, ns = [r[1] for r in rows], [r[2] for r in rows]
    m_all, n_all = sum(ms), sum(ns)
    names = {
        "D": lambda v: v,
        "dtype": lambda v: FLOAT_DTYPES[v],
        "symmetric": bool,
        "labels=None": bool,
        "scale": _unbits,
        "bias": _unbits,
    }
    for (what, show), col in zip(names.items(), (3, 6, 7, 8, 9, 10), strict=True):
        if len({r[col] for r in rows}) > 1:
            raise ValueError(
                f"all ranks must agree on {what}; per rank: {[show(r[col]) for r in rows]}"
            )
    if m_all == 0 or n_all == 0:
        raise ValueError(f"empty global batch: rows per rank {ms}, columns per rank {ns}")
    if symmetric and ms != ns:
        raise ValueError(
            f"symmetric=True pairs row i with column i, so every rank needs as many q as k rows; "
            f"rows per rank {ms}, columns per rank {ns}"
        )
    if diagonal and m_all != n_all:
        raise ValueError(
            f"without labels the positives are the global diagonal, so the global batch needs "
            f"as many q as k rows; rows per rank {ms} (sum {m_all}), columns per rank {ns} "
            f"(sum {n_all})"
        )
    bad = [i for i, r in enumerate(rows) if r[4] <= r[5] and (r[4] < 0 or r[5] >= n_all)]
    if bad:
        allowed = "" if ignore_index == NO_IGNORE else f" or equal ignore_index={ignore_index}"
        raise ValueError(
            f"labels are global column indices and must lie in [0, {n_all}){allowed}; ranks "
            f"{bad} hold labels in {[(rows[i][4], rows[i][5]) for i in bad]}"
        )
    return [ms, ns]


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _slices(ns: list[int]) -> list[list[tuple[int, int]]]:
    """The passes of a ring: per pass, every rank's row range `(lo, hi)` of its own key shard.
    Every rank computes the same table from the shared sizes."""
    passes = max(1, min(RING_SLICES, max(ns) // MIN_SLICE_COLUMNS))
    return [[(n * p // passes, n * (p + 1) // passes) for n in ns] for p in range(passes)]


def _keys(k: Tensor, lo: int, hi: int) -> Tensor:
    """Rows lo:hi of this rank's keys, as the first block of a pass (a view when k is dense)."""
    return k.detach()[lo:hi].contiguous()


def _global_labels(labels: Tensor, diagonal: bool, m: int, row_offset: int) -> Tensor:
    if diagonal:
        return torch.arange(row_offset, row_offset + m, device=labels.device)
    return labels.long()


def _backward_ring(
    ring: _Ring, k: Tensor, ns: list[int], acc: torch.dtype, stats: Tensor | None,
    step: Callable[[int, int, Tensor, Tensor | None, Tensor], None],
) -> Tensor:
    """The backward's ring, shared by both losses; returns this rank's dk, summed over every
    rank's rows, in k's dtype. In each pass over a slice of the key shards (`_slices`), step t
    works on the slice of rank `src = r - t`: its keys (with `stats`, their column statistics,
    when given) are sent ahead to the next rank while `step(src, col, keys, stats, dk)` adds
    this rank's rows' part of the slice's key gradient into `dk` (fp32: `acc`) in place; `col`
    is the slice's first global column. That `dk` is the sum over the ranks before, received
    from the previous rank before the step, so one buffer travels (no block gradient beside
    it, no second buffer to compute into while it arrives); after the last step it goes home
    already rounded to k's dtype (one rounding, as at home, half the bytes on the wire),
    straight into its rows of the result."""
    w, r = ring.world, ring.rank
    d = k.shape[1]
    col_off = _offsets(ns)
    dk = None  # made when the first slice comes home (one pass: after the ring, not during it)
    for cols in _slices(ns):
        sizes = [hi - lo for lo, hi in cols]
        kb = _keys(k, *cols[r])
        sb = None if stats is None else stats[:, cols[r][0] : cols[r][1]].contiguous()
        trail = None  # key gradient of this step's slice, summed over the ranks so far
        for t in range(w):
            src = (r - t) % w
            if t == 0:
                trail = torch.zeros((sizes[src], d), dtype=acc, device=k.device)
            else:  # sent on, and dropped, before the keys of the next step are received
                trail = ring.exchange(trail, trail.new_empty((sizes[src], d)), TAG_TRAIL)
            sends, recvs, k_next, stats_next = [], [], None, None
            if t < w - 1:
                n_next = sizes[(src - 1) % w]
                k_next = k.new_empty((n_next, d))
                sends.append((TAG_KEYS, kb))
                recvs.append((TAG_KEYS, k_next))
                if sb is not None:
                    stats_next = sb.new_empty((sb.shape[0], n_next))
                    sends.append((TAG_STATS, sb))
                    recvs.append((TAG_STATS, stats_next))
            works = ring.start(sends, recvs)
            step(src, col_off[src] + cols[src][0], kb, sb, trail)
            _wait(works)
            kb, sb = k_next, stats_next
        dk = k.new_empty((ns[r], d)) if dk is None else dk
        mine = dk[cols[r][0] : cols[r][1]]
        if w == 1:
            mine.copy_(trail)
        else:
            ring.exchange(trail.to(k.dtype), mine, TAG_TRAIL)
        del trail
    return dk


def _backward_into(block: str, kind: str = "") -> Callable[..., tuple[Tensor, ...]]:
    """`into(*block_bwd_args, dq, dk)`: block `block`'s backward (`kind="_sigmoid"`: the
    sigmoid one) adding its dq and dk into fp32 accumulators; returns its scalar gradients.
    Through the block's `<block><kind>_bwd_into` op, in place, where it has one; otherwise the
    gradients of its `_bwd` op are added (a block-sized gradient of each at every step)."""
    ops = torch.ops.infcl
    if hasattr(ops, f"{block}{kind}_bwd_into"):
        op = getattr(ops, f"{block}{kind}_bwd_into")

        def into(*args: Any) -> tuple[Tensor, ...]:
            out = op(*args)
            return out if isinstance(out, tuple) else (out,)

        return into
    bwd = getattr(ops, f"{block}{kind}_bwd")

    def add(*args: Any) -> tuple[Tensor, ...]:
        *args, dq, dk = args
        dq_b, dk_b, *scalars = bwd(*args)
        dq.add_(dq_b)
        dk.add_(dk_b)
        return tuple(scalars)

    return add


@torch.library.custom_op("infcl::ring_fwd", mutates_args=())
def ring_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, diagonal: bool, symmetric: bool,
    ignore_index: int, group_name: str, block: str, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row LSE [M_r], column LSE [N_r] (or [0] unless symmetric), positive logit [M_r], sizes.

    The statistics are global (over every rank's shard); `sizes` is the CPU int64 table
    `[[M_0..M_{W-1}], [N_0..N_{W-1}]]` that the backward reuses. With `diagonal` the labels
    argument is ignored and row i of rank r takes global column `sum(M_<r) + i`.
    """
    fwd = getattr(torch.ops.infcl, f"{block}_fwd")
    ring = _Ring(group_name)
    ms, ns = _exchange_shapes(ring, q, k, scale, labels, diagonal, symmetric, ignore_index)
    w, r = ring.world, ring.rank
    acc = acc_dtype(q)
    m, d = q.shape
    col_off = _offsets(ns)
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s = scale.detach()
    row = torch.full((m,), float("-inf"), dtype=LSE_DTYPE, device=q.device)
    pos = torch.zeros(m, dtype=acc, device=q.device)
    col = row.new_empty(ns[r] if symmetric else 0)
    for cols in _slices(ns):
        sizes = [hi - lo for lo, hi in cols]
        kb = _keys(k, *cols[r])
        trail = None  # column LSE of the slice finished last step, merged over the ranks so far
        for t in range(w):
            src = (r - t) % w
            sends, recvs, k_next, trail_in = [], [], None, None
            if t < w - 1:
                k_next = k.new_empty((sizes[(src - 1) % w], d))
                sends.append((TAG_KEYS, kb))
                recvs.append((TAG_KEYS, k_next))
            if symmetric and t > 0:
                trail_in = row.new_empty(sizes[src])
                sends.append((TAG_TRAIL, trail))
                recvs.append((TAG_TRAIL, trail_in))
            works = ring.start(sends, recvs)
            if m and sizes[src]:
                row_b, col_b, pos_b = fwd(
                    q, kb, s, y, col_off[src] + cols[src][0], symmetric, chunk_size, precision
                )
                row = torch.logaddexp(row, row_b)
                pos = pos + pos_b
            else:
                col_b = row.new_full((sizes[src] if symmetric else 0,), float("-inf"))
            _wait(works)
            if symmetric:
                trail = col_b if trail_in is None else torch.logaddexp(trail_in, col_b)
            kb = k_next
        if symmetric:  # home, into this rank's columns of the slice
            mine = col[cols[r][0] : cols[r][1]]
            if w == 1:
                mine.copy_(trail)
            else:
                ring.exchange(trail, mine, TAG_TRAIL)
    return row, col, pos, torch.tensor([ms, ns], dtype=torch.int64)


@ring_fwd.register_fake
def ring_fwd_fake(
    q, k, scale, labels, diagonal, symmetric, ignore_index, group_name, block, chunk_size, precision
):
    acc = acc_dtype(q)
    w = dist.get_world_size(resolve_group(group_name))
    m = q.shape[0]
    n_col = k.shape[0] if symmetric else 0
    return (
        q.new_empty(m, dtype=LSE_DTYPE),
        q.new_empty(n_col, dtype=LSE_DTYPE),
        q.new_empty(m, dtype=acc),
        torch.empty((2, w), dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("infcl::ring_bwd", mutates_args=())
def ring_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, sizes: Tensor, diagonal: bool,
    symmetric: bool, row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor,
    g_pos: Tensor, group_name: str, block: str, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's dq, dk and its share of dscale for `sum(g_row*row + g_col*col + g_pos*pos)`.

    Summed over ranks the dscale shares give the gradient of the sum of every rank's terms:
    there is no all-reduce, so DDP's averaging yields the gradient of the mean over ranks.
    """
    into = _backward_into(block)
    ring = _Ring(group_name)
    ms, ns = sizes.tolist()
    r = ring.rank
    acc = acc_dtype(q)
    m, d = q.shape
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s = scale.detach()
    dq = torch.zeros((m, d), dtype=acc, device=q.device)
    dscale = torch.zeros((), dtype=acc, device=q.device)
    stats = torch.stack([col_lse, g_col.to(col_lse.dtype)]) if symmetric else None  # [2, N_src]
    no_col = row_lse.new_empty(0)

    def step(src: int, col: int, kb: Tensor, stats_b: Tensor | None, dk: Tensor) -> None:
        if not (m and kb.shape[0]):
            return
        c_lse, c_g = (stats_b[0], stats_b[1]) if stats_b is not None else (no_col, no_col)
        (dscale_b,) = into(
            q, kb, s, y, col, row_lse, c_lse, g_row, c_g, g_pos, chunk_size, precision, dq, dk
        )
        dscale.add_(dscale_b)

    dk = _backward_ring(ring, k, ns, acc, stats, step)
    return dq.to(q.dtype), dk, dscale.to(scale.dtype)


@ring_bwd.register_fake
def ring_bwd_fake(q, k, scale, labels, sizes, diagonal, symmetric, row_lse, col_lse, g_row, g_col,
                  g_pos, group_name, block, chunk_size, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, labels, diagonal, symmetric, _ignore, group, block, chunk_size, precision = inputs
    row, col, _, sizes = output
    ctx.save_for_backward(q, k, scale, labels, sizes, row, col)
    ctx.args = (diagonal, symmetric, group, block, chunk_size, precision)


def _backward(ctx, g_row, g_col, g_pos, _g_sizes):
    q, k, scale, labels, sizes, row, col = ctx.saved_tensors
    diagonal, symmetric, group, block, chunk_size, precision = ctx.args
    g_row = torch.zeros_like(row) if g_row is None else g_row
    g_col = torch.zeros_like(col) if g_col is None else g_col
    g_pos = torch.zeros_like(row) if g_pos is None else g_pos
    dq, dk, dscale = ring_bwd(
        q, k, scale, labels, sizes, diagonal, symmetric, row, col, g_row, g_col, g_pos,
        group, block, chunk_size, precision,
    )
    return dq, dk, dscale, None, None, None, None, None, None, None, None


ring_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("infcl::ring_sigmoid_fwd", mutates_args=())
def ring_sigmoid_fwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, diagonal: bool,
    group_name: str, block: str, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor]:
    """The sigmoid loss of this rank's rows against every rank's columns, per row [M_r], and the
    shard-size table. The row losses are sums over columns, so the blocks' add: no statistics
    travel, only the keys."""
    fwd = getattr(torch.ops.infcl, f"{block}_sigmoid_fwd")
    ring = _Ring(group_name)
    ms, ns = _exchange_shapes(ring, q, k, scale, labels, diagonal, False, NO_IGNORE, bias)
    w, r = ring.world, ring.rank
    m, d = q.shape
    col_off = _offsets(ns)
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s, b = scale.detach(), bias.detach()
    per = torch.zeros(m, dtype=acc_dtype(q), device=q.device)
    for cols in _slices(ns):
        sizes = [hi - lo for lo, hi in cols]
        kb = _keys(k, *cols[r])
        for t in range(w):
            src = (r - t) % w
            k_next, works = None, []
            if t < w - 1:
                k_next = k.new_empty((sizes[(src - 1) % w], d))
                works = ring.start([(TAG_KEYS, kb)], [(TAG_KEYS, k_next)])
            if m and sizes[src]:
                per = per + fwd(q, kb, s, b, y, col_off[src] + cols[src][0], chunk_size, precision)
            _wait(works)
            kb = k_next
    return per, torch.tensor([ms, ns], dtype=torch.int64)


@ring_sigmoid_fwd.register_fake
def ring_sigmoid_fwd_fake(q, k, scale, bias, labels, diagonal, group_name, block, chunk_size,
                          precision):
    w = dist.get_world_size(resolve_group(group_name))
    return (q.new_empty(q.shape[0], dtype=acc_dtype(q)),
            torch.empty((2, w), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("infcl::ring_sigmoid_bwd", mutates_args=())
def ring_sigmoid_bwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, sizes: Tensor,
    diagonal: bool, g_row: Tensor, group_name: str, block: str, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's dq, dk and its shares of dscale and dbias for `sum(g_row * per_row)`; the key
    gradient follows its block one step behind and arrives home after the last step."""
    into = _backward_into(block, "_sigmoid")
    ring = _Ring(group_name)
    ms, ns = sizes.tolist()
    r = ring.rank
    acc = acc_dtype(q)
    m, d = q.shape
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s, b = scale.detach(), bias.detach()
    dq = torch.zeros((m, d), dtype=acc, device=q.device)
    dscale = torch.zeros((), dtype=acc, device=q.device)
    dbias = torch.zeros((), dtype=acc, device=q.device)

    def step(src: int, col: int, kb: Tensor, _stats: Tensor | None, dk: Tensor) -> None:
        if not (m and kb.shape[0]):
            return
        dscale_b, dbias_b = into(q, kb, s, b, y, col, g_row, chunk_size, precision, dq, dk)
        dscale.add_(dscale_b)
        dbias.add_(dbias_b)

    dk = _backward_ring(ring, k, ns, acc, None, step)
    return dq.to(q.dtype), dk, dscale.to(scale.dtype), dbias.to(bias.dtype)


@ring_sigmoid_bwd.register_fake
def ring_sigmoid_bwd_fake(q, k, scale, bias, labels, sizes, diagonal, g_row, group_name, block,
                          chunk_size, precision):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale),
            torch.empty_like(bias))


def _sigmoid_setup_context(ctx, inputs, output):
    q, k, scale, bias, labels, diagonal, group, block, chunk_size, precision = inputs
    ctx.save_for_backward(q, k, scale, bias, labels, output[1])
    ctx.args = (diagonal, group, block, chunk_size, precision)


def _sigmoid_backward(ctx, g_row, _g_sizes):
    q, k, scale, bias, labels, sizes = ctx.saved_tensors
    diagonal, group, block, chunk_size, precision = ctx.args
    dq, dk, dscale, dbias = ring_sigmoid_bwd(
        q, k, scale, bias, labels, sizes, diagonal, g_row.contiguous(), group, block, chunk_size,
        precision,
    )
    return dq, dk, dscale, dbias, None, None, None, None, None, None


ring_sigmoid_fwd.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup_context)
