"""One device, plain PyTorch tiles with recomputation: O((M + N) * chunk_size) memory.

The forward and backward are `torch.library` ops (`infcl::chunked_fwd`, `infcl::chunked_bwd`), so
`torch.compile` treats them as opaque, sees symbolic shapes through their fake implementations and
never unrolls the tile loop (no recompile when the batch size changes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from infcl._autograd import register_block_autograd
from infcl._spec import (
    LSE_DTYPE,
    acc_dtype,
    assemble,
    checked,
    describe,
    scale_tensor,
    split_lse,
    target_columns,
)
from infcl._typing import Cols, Labels, Loss, Rows, Scale, typechecked

DEFAULT_TILE_ELEMENTS = 1 << 22
"""Default strip: about 4M logits (16 MiB in float32) per tile of `chunk_size` rows by N columns."""


def default_chunk_size(m: int, n: int) -> int:
    """Rows per strip when the caller gives none: a strip of about 4M logits, at least one row."""
    return max(1, min(m, DEFAULT_TILE_ELEMENTS // max(n, 1)))


def _strip_pos(st: Tensor, y: Tensor, n: int) -> Tensor:
    """S[i, y_i] for the rows of a strip, 0 where y_i is not a column of this block (no OOB read)."""
    hit = (y >= 0) & (y < n)
    picked = st.gather(1, y.clamp(0, max(n - 1, 0))[:, None]).squeeze(1)
    return torch.where(hit, picked, torch.zeros_like(picked))


def _lse(st: Tensor, dim: int) -> Tensor:
    """log-sum-exp along `dim` as `max + log(sum(exp(st - max)))`, summed in float64."""
    mx = st.amax(dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # all -inf or inf: no NaN
    total = torch.exp(st - mx).sum(dim).to(LSE_DTYPE)
    return mx.squeeze(dim).to(LSE_DTYPE) + torch.log(total)


@torch.library.custom_op("infcl::chunked_fwd", mutates_args=())
def chunked_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, want_col: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row LSE [M], column LSE [N] (or [0] unless want_col) and positive logit [M] of one block.

    `labels` are column indices shifted by `col_offset` (the block's first global column).
    """
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s = scale.to(acc)
    kt = k.to(acc).T
    y = labels - col_offset
    lse = dict(dtype=LSE_DTYPE, device=q.device)
    row = torch.empty(m, **lse)
    pos = torch.empty(m, dtype=acc, device=q.device)
    col = torch.full((n if want_col else 0,), float("-inf"), **lse)
    if m == 0 or n == 0:
        return row.fill_(float("-inf")), col, pos.zero_()
    for a in range(0, m, cs):
        b = min(a + cs, m)
        st = (q[a:b].to(acc) @ kt) * s
        row[a:b] = _lse(st, 1)
        pos[a:b] = _strip_pos(st, y[a:b], n)
        if want_col:
            col = torch.logaddexp(col, _lse(st, 0))
    return row, col, pos


@chunked_fwd.register_fake
def _(q, k, scale, labels, col_offset, want_col, chunk_size):
    n_col = k.shape[0] if want_col else 0
    return (
        q.new_empty(q.shape[0], dtype=LSE_DTYPE),
        q.new_empty(n_col, dtype=LSE_DTYPE),
        q.new_empty(q.shape[0], dtype=acc_dtype(q)),
    )


@torch.library.custom_op("infcl::chunked_bwd", mutates_args=())
def chunked_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of `sum(g_row * row_lse + g_col * col_lse + g_pos * pos)` for one block.

    The LSEs may be global ones (merged over other blocks): the softmax uses them as given.
    """
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s = scale.to(acc)
    kf = k.to(acc)
    use_col = col_lse.numel() > 0
    r_hi, r_lo = split_lse(row_lse, acc)
    c_hi, c_lo = split_lse(col_lse, acc)
    g_row, g_col, g_pos = g_row.to(acc), g_col.to(acc), g_pos.to(acc)
    y = labels - col_offset
    hit = (y >= 0) & (y < n)
    yc = y.clamp(0, max(n - 1, 0))
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    ds = torch.zeros((), dtype=acc, device=q.device)
    if n == 0:
        dq.zero_()
    for a in range(0, m if n > 0 else 0, cs):
        b = min(a + cs, m)
        qc = q[a:b].to(acc)
        gc = qc @ kf.T
        st = gc * s
        p = g_row[a:b, None] * torch.exp((st - r_hi[a:b, None]) - r_lo[a:b, None])
        if use_col:
            p = p + g_col[None, :] * torch.exp((st - c_hi[None, :]) - c_lo[None, :])
        gp = torch.where(hit[a:b], g_pos[a:b], torch.zeros_like(g_pos[a:b]))
        p = p.scatter_add(1, yc[a:b, None], gp[:, None])
        pk = p @ kf
        dq[a:b] = pk * s
        dk += p.T @ qc
        ds += (p * gc).sum()  # elementwise, as the kernels do: <q, dS k> loses digits to cancellation
    return dq.to(q.dtype), (dk * s).to(k.dtype), ds.to(scale.dtype)


@chunked_bwd.register_fake
def _(q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, chunk_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


register_block_autograd(chunked_fwd, chunked_bwd)


@checked
@typechecked
def chunked_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    *,
    labels: Labels | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Loss:
    """Contrastive loss from strips of logits recomputed in backward, in plain PyTorch."""
    s = scale_tensor(scale, q)
    y = target_columns(labels, q.shape[0], q.device)
    row, col, pos = chunked_fwd(q, k, s, y, 0, symmetric, chunk_size or 0)
    valid = None if labels is None else labels != ignore_index
    return assemble(row, col, pos, valid, symmetric, reduction)


describe(
    chunked_loss,
    extra="""
    Memory: O((M + N) * chunk_size) beyond the inputs and their gradients; no `[M, N]` tensor is
    ever held, in forward or in what autograd saves (backward recomputes each strip). Runs on any
    device, CPU included, and under `torch.compile(fullgraph=True)`.

    Args:
        chunk_size: rows of q per strip of `chunk_size x N` logits. None picks about 4M logits
            a strip (`DEFAULT_TILE_ELEMENTS // N` rows, at least 1).
    """,
)
