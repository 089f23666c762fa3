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
  gradient follows one step behind, like the column accumulator, and arrives home after W steps.

On CUDA the transfers run on the process group's own communication stream (NCCL), so they overlap
the block compute on the current stream without a stream of ours. The block op pair is a parameter
(`block`, registered with `register_block`): `"chunked"` uses torch tiles, `"inf"` the Triton ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from infcl._spec import FLOAT_DTYPES, LSE_DTYPE, acc_dtype, assemble, scale_tensor, validate
from infcl.chunked import chunked_bwd, chunked_fwd

__all__ = [
    "group_name",
    "register_block",
    "resolve_group",
    "ring_bwd",
    "ring_fwd",
    "ring_loss_impl",
    "ring_pieces",
]

_BLOCKS: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[[str], Any]]] = {}

TAG_KEYS, TAG_TRAIL, TAG_STATS = 0, 1, 2
"""P2P tags: gloo matches messages by (peer, tag), and W=2 sends several tensors to one peer."""


def register_block(name: str, fwd: Callable, bwd: Callable, parse: Callable[[str], Any]) -> None:
    """Make a block op pair usable by the ring under `name`.

    `fwd(q, k, scale, labels, col_offset, want_col, extra) -> (row_lse, col_lse, pos)` and
    `bwd(q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, extra)
    -> (dq, dk, dscale)` as in `infcl._autograd`; `parse` turns the ring op's string `extra`
    back into the block's own argument (a chunk size, a precision).
    """
    _BLOCKS[name] = (fwd, bwd, parse)


register_block("chunked", chunked_fwd, chunked_bwd, int)


def group_name(group: dist.ProcessGroup | None) -> str:
    """The name by which the ring ops find `group` again (None: the default group)."""
    if group is None:
        group = dist.distributed_c10d._get_default_group()
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


_IGNORE_SENTINEL = (1 << 62, -(1 << 62))


def _exchange_shapes(
    ring: _Ring, q: Tensor, k: Tensor, labels: Tensor, diagonal: bool, want_col: bool,
    ignore_index: int,
) -> list[list[int]]:
    """All-gather every rank's shard sizes and label range, and check the global batch.

    Every rank sees the same table and raises the same error, so a bad shard on one rank cannot
    leave the others waiting in the ring.
    """
    lo, hi = _IGNORE_SENTINEL
    if not diagonal and labels.numel():
        y = labels.long()
        keep = y != ignore_index
        lo = int(torch.where(keep, y, torch.full_like(y, lo)).min())
        hi = int(torch.where(keep, y, torch.full_like(y, hi)).max())
    mine = torch.tensor(
        [q.shape[0], k.shape[0], q.shape[1], lo, hi, FLOAT_DTYPES.index(q.dtype), want_col,
         diagonal],
        dtype=torch.int64, device=q.device,
    )
    table = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(table, mine, group=ring.group)
    rows = torch.stack(table).tolist()
    ms, ns = [r[0] for r in rows], [r[1] for r in rows]
    m_all, n_all = sum(ms), sum(ns)
    for what, col in (("D", 2), ("dtype", 5), ("symmetric", 6), ("labels=None", 7)):
        if len({r[col] for r in rows}) > 1:
            raise ValueError(f"all ranks must agree on {what}; per rank: {[r[col] for r in rows]}")
    if m_all == 0 or n_all == 0:
        raise ValueError(f"empty global batch: rows per rank {ms}, columns per rank {ns}")
    if want_col and ms != ns:
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
    bad = [i for i, r in enumerate(rows) if r[3] <= r[4] and (r[3] < 0 or r[4] >= n_all)]
    if bad:
        raise ValueError(
            f"labels are global column indices and must lie in [0, {n_all}) or equal "
            f"ignore_index={ignore_index}; ranks {bad} hold labels in "
            f"{[(rows[i][3], rows[i][4]) for i in bad]}"
        )
    return [ms, ns]


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _global_labels(labels: Tensor, diagonal: bool, m: int, row_offset: int) -> Tensor:
    if diagonal:
        return torch.arange(row_offset, row_offset + m, device=labels.device)
    return labels.long()


@torch.library.custom_op("infcl::ring_fwd", mutates_args=())
def ring_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, diagonal: bool, want_col: bool,
    ignore_index: int, group_name: str, block: str, extra: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row LSE [M_r], column LSE [N_r] (or [0] unless want_col), positive logit [M_r], sizes.

    The statistics are global (over every rank's shard); `sizes` is the CPU int64 table
    `[[M_0..M_{W-1}], [N_0..N_{W-1}]]` that the backward reuses. With `diagonal` the labels
    argument is ignored and row i of rank r takes global column `sum(M_<r) + i`.
    """
    fwd, _, parse = _BLOCKS[block]
    arg = parse(extra)
    ring = _Ring(group_name)
    ms, ns = _exchange_shapes(ring, q, k, labels, diagonal, want_col, ignore_index)
    w, r = ring.world, ring.rank
    acc = acc_dtype(q)
    m, d = q.shape
    col_off = _offsets(ns)
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s = scale.detach()
    row = torch.full((m,), float("-inf"), dtype=LSE_DTYPE, device=q.device)
    pos = torch.zeros(m, dtype=acc, device=q.device)
    kb = k.detach().contiguous()
    trail = None  # column LSE of the block finished last step, merged over the ranks so far
    for t in range(w):
        src = (r - t) % w
        sends, recvs, k_next, trail_in = [], [], None, None
        if t < w - 1:
            k_next = k.new_empty((ns[(src - 1) % w], d))
            sends.append((TAG_KEYS, kb))
            recvs.append((TAG_KEYS, k_next))
        if want_col and t > 0:
            trail_in = row.new_empty(ns[src])
            sends.append((TAG_TRAIL, trail))
            recvs.append((TAG_TRAIL, trail_in))
        works = ring.start(sends, recvs)
        if m and ns[src]:
            row_b, col_b, pos_b = fwd(q, kb, s, y, col_off[src], want_col, arg)
            row = torch.logaddexp(row, row_b)
            pos = pos + pos_b
        else:
            col_b = row.new_full((ns[src] if want_col else 0,), float("-inf"))
        _wait(works)
        if want_col:
            trail = col_b if trail_in is None else torch.logaddexp(trail_in, col_b)
        if k_next is not None:
            kb = k_next
    if not want_col:
        col = row.new_empty(0)
    elif w == 1:
        col = trail
    else:
        col = ring.exchange(trail, row.new_empty(ns[r]), TAG_TRAIL)
    return row, col, pos, torch.tensor([ms, ns], dtype=torch.int64)


@ring_fwd.register_fake
def _(q, k, scale, labels, diagonal, want_col, ignore_index, group_name, block, extra):
    acc = acc_dtype(q)
    w = dist.get_world_size(resolve_group(group_name))
    m = q.shape[0]
    n_col = k.shape[0] if want_col else 0
    return (
        q.new_empty(m, dtype=LSE_DTYPE),
        q.new_empty(n_col, dtype=LSE_DTYPE),
        q.new_empty(m, dtype=acc),
        torch.empty((2, w), dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("infcl::ring_bwd", mutates_args=())
def ring_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, sizes: Tensor, diagonal: bool,
    want_col: bool, row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor,
    g_pos: Tensor, group_name: str, block: str, extra: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's dq, dk and its share of dscale for `sum(g_row*row + g_col*col + g_pos*pos)`.

    Summed over ranks the dscale shares give the gradient of the sum of every rank's terms:
    there is no all-reduce, so DDP's averaging yields the gradient of the mean over ranks.
    """
    _, bwd, parse = _BLOCKS[block]
    arg = parse(extra)
    ring = _Ring(group_name)
    ms, ns = sizes.tolist()
    w, r = ring.world, ring.rank
    acc = acc_dtype(q)
    m, d = q.shape
    col_off = _offsets(ns)
    y = _global_labels(labels, diagonal, m, _offsets(ms)[r])
    s = scale.detach()
    dq = torch.zeros((m, d), dtype=acc, device=q.device)
    ds = torch.zeros((), dtype=acc, device=q.device)
    kb = k.detach().contiguous()
    stats = torch.stack([col_lse, g_col.to(col_lse.dtype)]) if want_col else None  # [2, N_src]: LSE and its grad
    no_col = row_lse.new_empty(0)
    trail = None  # key gradient of the block finished last step, summed over the ranks so far
    for t in range(w):
        src = (r - t) % w
        sends, recvs, k_next, stats_next, trail_in = [], [], None, None, None
        if t < w - 1:
            n_next = ns[(src - 1) % w]
            k_next = k.new_empty((n_next, d))
            sends.append((TAG_KEYS, kb))
            recvs.append((TAG_KEYS, k_next))
            if stats is not None:
                stats_next = row_lse.new_empty((2, n_next))
                sends.append((TAG_STATS, stats))
                recvs.append((TAG_STATS, stats_next))
        if t > 0:
            trail_in = dq.new_empty((ns[src], d))
            sends.append((TAG_TRAIL, trail))
            recvs.append((TAG_TRAIL, trail_in))
        works = ring.start(sends, recvs)
        if m and ns[src]:
            c_lse, c_g = (stats[0], stats[1]) if stats is not None else (no_col, no_col)
            dq_b, dk_b, ds_b = bwd(q, kb, s, y, col_off[src], row_lse, c_lse, g_row, c_g, g_pos, arg)
            dq += dq_b
            ds += ds_b
            dk_b = dk_b.to(acc)
        else:
            dk_b = dq.new_zeros((ns[src], d))
        _wait(works)
        trail = dk_b if trail_in is None else trail_in.add_(dk_b)
        if k_next is not None:
            kb, stats = k_next, stats_next
    dk = trail if w == 1 else ring.exchange(trail, dq.new_empty((ns[r], d)), TAG_TRAIL)
    return dq.to(q.dtype), dk.to(k.dtype), ds.to(scale.dtype)


@ring_bwd.register_fake
def _(q, k, scale, labels, sizes, diagonal, want_col, row_lse, col_lse, g_row, g_col, g_pos,
      group_name, block, extra):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, labels, diagonal, want_col, _ignore, group, block, extra = inputs
    row, col, _, sizes = output
    ctx.save_for_backward(q, k, scale, labels, sizes, row, col)
    ctx.args = (diagonal, want_col, group, block, extra)


def _backward(ctx, g_row, g_col, g_pos, _g_sizes):
    q, k, scale, labels, sizes, row, col = ctx.saved_tensors
    diagonal, want_col, group, block, extra = ctx.args
    g_row = torch.zeros_like(row) if g_row is None else g_row
    g_col = torch.zeros_like(col) if g_col is None else g_col
    g_pos = torch.zeros_like(row) if g_pos is None else g_pos
    dq, dk, ds = ring_bwd(
        q, k, scale, labels, sizes, diagonal, want_col, row, col, g_row, g_col, g_pos,
        group, block, extra,
    )
    return dq, dk, ds, None, None, None, None, None, None, None


ring_fwd.register_autograd(_backward, setup_context=_setup_context)


def ring_pieces(
    q: Tensor, k: Tensor, scale: float | Tensor, labels: Tensor | None, symmetric: bool,
    ignore_index: int, group: dist.ProcessGroup | None, block: str, extra: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Global row LSE, column LSE and positive logit of this rank's shard, through the ring."""
    s = scale_tensor(scale, q)
    diagonal = labels is None
    y = q.new_empty(0, dtype=torch.long) if labels is None else labels
    row, col, pos, _ = ring_fwd(
        q, k, s, y, diagonal, symmetric, ignore_index, group_name(group), block, extra
    )
    return row, col, pos


def ring_loss_impl(
    q: Tensor, k: Tensor, scale: float | Tensor, labels: Tensor | None, symmetric: bool,
    reduction: str, ignore_index: int, group: dist.ProcessGroup | None, block: str, extra: str,
) -> Tensor:
    """This rank's local reduction of the global loss (see `infcl.ring_loss`)."""
    row, col, pos = ring_pieces(q, k, scale, labels, symmetric, ignore_index, group, block, extra)
    valid = None if labels is None else labels != ignore_index
    return assemble(row, col, pos, valid, symmetric, reduction)
