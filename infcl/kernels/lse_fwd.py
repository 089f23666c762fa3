"""Forward stage: online log-sum-exp over tiles of `scale * q @ k.T` and the positive logits; the
logits are never stored. The symmetric loss takes its column statistics from the same tiles, so
each logit is computed once whichever direction is asked for.

The grid is a P x Q grid of rectangular partitions of the logit matrix (P, Q <= `configs.PARTS`),
enough programs to keep two on every SM. Each program writes `[Q, M]` row partials (running max,
sum, positive logit) and, for the symmetric loss, `[P, N]` column partials that only it touches.
`_lse_fwd_kernel` (one direction; fp32 symmetric) walks its partition one row block at a time,
keeping the block's row statistics in registers and the columns' exactly, with a column max.
`_separable_kernel` (bf16, fp16 symmetric) walks it one column block at a time and takes the
column sums from the row probabilities. `_merge_kernel` then folds the partials into float64 LSEs
in one launch: O((P + Q) * (M + N)) extra memory, two launches in all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, fwd_tile, split
from infcl.kernels.logits import (
    LN2,
    LOG2E,
    descriptors,
    exp_of,
    local_column,
    qk_tile,
    scale_logits,
    use_tma,
)
from infcl.kernels.numerics import LSE_DTYPE, autocast_off

ROW_SHIFT = tl.constexpr(48.0)
COL_SHIFT = tl.constexpr(48.0)
"""The separable forward (`_separable_kernel`) keeps its probabilities `p = exp(S - r_i)` times
2^ROW_SHIFT (so the row sums carry that factor) and multiplies them by `exp(r_i - R)` times
2^COL_SHIFT for the column sums, which carry both. Neither factor exceeds its power of two, a
sum of 2^31 column terms stays below 2^127, and a term is lost to underflow only where a factor
or the product falls below 2^-126: where `S < R - 120.6`, R the column block's reference (see
`FLUSH_MARGIN`). With one shift on the product alone, `p` itself would flush 87.3 below its
own row's reference, and a column's terms from rows whose best logit is far above it would
vanish unseen."""
SHIFT = tl.constexpr(96.0)
"""ROW_SHIFT + COL_SHIFT: the column sums' power of two."""


@triton.jit
def _exact_column_update(c_max, c_sum, b_s, PRECISE: tl.constexpr):
    """The running (max, sum of exp(S - max)) of each column after the tile `b_s` (rows that do
    not count are -inf): each column's own max, a second exponential per logit."""
    c_new = tl.maximum(c_max, tl.max(b_s, axis=0))
    c_sum = c_sum * tl.exp2((c_max - c_new) * LOG2E) + tl.sum(
        exp_of(b_s - c_new[None, :], PRECISE), axis=0)
    return c_new, c_sum


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, q_desc, k_desc, scale_ptr, y_ptr, row_ptr, col_ptr,
    M, N, D, col_offset, rows_per_part, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN: tl.constexpr,  # M and N are multiples of the tile: no masks on the logits
    SYMMETRIC: tl.constexpr,  # also the column statistics, from the same tiles
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
    ROUNDED: tl.constexpr,  # fp32, fp16 on a GPU: S rounded alone (see logits.scale_logits)
    TMA: tl.constexpr,  # q and k through the descriptors (see logits.qk_tile)
):
    """Row partials `row_ptr[3, Q, M]` (max, sum of exp(S - max), positive logit); with
    SYMMETRIC (fp32: bf16 and fp16 take `_separable_kernel`), column partials `col_ptr[2, P,
    N]` (max, sum of exp(S - max)), exactly: each tile's column max and a second exponential
    per logit."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(0).to(tl.int64)
    n_q = tl.num_programs(1).to(tl.int64)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr).to(tl.float32)
    for start_m in range(row_lo, row_hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < row_hi
        b_y = local_column(  # the positive's column inside this partition [BLOCK_M]
            tl.load(y_ptr + o_m, mask=m_m, other=-1), col_offset + col_lo, col_hi - col_lo)
        b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(col_lo, col_hi, BLOCK_N):
            o_n = start_n + tl.arange(0, BLOCK_N)
            m_n = o_n < col_hi
            if SYMMETRIC:  # this program's column partials, loaded before the product needs them
                p_c = col_ptr + pid_p * N + o_n
                m_old = m_n & (start_m > row_lo)  # nothing stored yet on the first row block
                c_max = tl.load(p_c, mask=m_old, other=float("-inf"))
                c_sum = tl.load(p_c + n_p * N, mask=m_old, other=0.0)
            b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled
                q_ptr, k_ptr, q_desc, k_desc, tl.cast(start_m, tl.int32), tl.cast(start_n, tl.int32),
                o_m, o_n, m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION, TMA,
            )
            # rows past the partition keep finite values here; columns past it are -inf
            b_s = scale_logits(b_acc, s, ROUNDED)
            if not EVEN:
                b_s = tl.where(m_n[None, :], b_s, float("-inf"))
            b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
            # fp32: S - max first, exact near the max, so the sum keeps fp32's digits; bf16/fp16
            # lose nothing to a single FMA (its rounding is far below their input rounding)
            b_p = exp_of(b_s - b_new[:, None], IS_FP32)
            b_sum = b_sum * tl.exp2((b_max - b_new) * LOG2E) + tl.sum(b_p, axis=1)
            b_max = b_new
            o_j = (start_n - col_lo).to(tl.int32) + tl.arange(0, BLOCK_N)  # in the partition
            b_pos += tl.sum(tl.where(o_j[None, :] == b_y[:, None], b_acc, 0.0), axis=1)
            if SYMMETRIC:
                b_sc = b_s if EVEN else tl.where(m_m[:, None], b_s, float("-inf"))
                c_new, c_sum = _exact_column_update(c_max, c_sum, b_sc, IS_FP32)
                tl.store(p_c, c_new, mask=m_n)
                tl.store(p_c + n_p * N, c_sum, mask=m_n)
        p_r = row_ptr + pid_q * M + o_m
        tl.store(p_r, b_max, mask=m_m)
        tl.store(p_r + n_q * M, b_sum, mask=m_m)
        tl.store(p_r + 2 * n_q * M, b_pos * s, mask=m_m)
        if SYMMETRIC:  # this row block's column stores are seen by every thread of the next
            tl.debug_barrier()


@triton.jit
def _separable_kernel(
    q_ptr, k_ptr, q_desc, k_desc, scale_ptr, y_ptr, row_ptr, col_ptr,
    M, N, D, col_offset, rows_per_part, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN: tl.constexpr, UPCAST: tl.constexpr, ROUNDED: tl.constexpr, TMA: tl.constexpr,
):
    """The symmetric forward for bf16 and fp16: the partials of `_lse_fwd_kernel`, with the row
    sums kept times 2^ROW_SHIFT and the column sums times 2^SHIFT (see ROW_SHIFT), taken from
    the row probabilities `p = exp(S - r_i)` that the row sums need anyway: `exp(S - R) = p *
    exp(r_i - R)`, one multiply-add per logit and no column max. The positive logits are left
    to `_merge_kernel` (a gathered row of k per row, not a select and a sum in every tile).

    The loops are the other way round: a program walks its partition one column block at a
    time, and the row blocks inside it. The row statistics go through the row partials at
    every tile (each row's max and sum are reduced along the row, inside a warp). The column
    terms are added elementwise into a `[BLOCK_M, BLOCK_N]` register tile across the row
    blocks, against one reference R per column block (the largest row reference so far,
    rescaled when it grows), and reduced down the rows once per column block: the per-tile
    reduction across warps that the other order needs cost more than the exponentials (a third
    of this forward on an H200). A term underflows only below `exp(R - 120.6)`;
    `_merge_kernel` bounds what such terms can change and recomputes the columns where that is
    not negligible."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(0).to(tl.int64)
    n_q = tl.num_programs(1).to(tl.int64)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr).to(tl.float32)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < col_hi
        c_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # times 2^SHIFT / exp(c_ref)
        c_ref = tl.max(tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), axis=0)
        for start_m in range(row_lo, row_hi, BLOCK_M):
            o_m = start_m + tl.arange(0, BLOCK_M)
            m_m = o_m < row_hi
            p_r = row_ptr + pid_q * M + o_m
            m_old = m_m & (start_n > col_lo)  # nothing stored yet in the first column block
            r_max = tl.load(p_r, mask=m_old, other=float("-inf"))
            r_sum = tl.load(p_r + n_q * M, mask=m_old, other=0.0)
            b_acc = qk_tile(
                q_ptr, k_ptr, q_desc, k_desc, tl.cast(start_m, tl.int32), tl.cast(start_n, tl.int32),
                o_m, o_n, m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, False, "ieee", TMA,
            )
            # rows past the partition keep finite values here; columns past it are -inf
            b_s = scale_logits(b_acc, s, ROUNDED)
            if not EVEN:
                b_s = tl.where(m_n[None, :], b_s, float("-inf"))
            b_new = tl.maximum(r_max, tl.max(b_s, axis=1))
            b_p = tl.exp2((b_s - b_new[:, None]) * LOG2E + ROW_SHIFT)
            r_sum = r_sum * tl.exp2((r_max - b_new) * LOG2E) + tl.sum(b_p, axis=1)
            tl.store(p_r, b_new, mask=m_m)
            tl.store(p_r + n_q * M, r_sum, mask=m_m)
            b_r = b_new if EVEN else tl.where(m_m, b_new, float("-inf"))
            t_ref = tl.max(b_r, axis=0)
            if t_ref > c_ref:
                c_acc = c_acc * tl.exp2((c_ref - t_ref) * LOG2E)
                c_ref = t_ref
            # [BLOCK_M], 0 on rows past the partition
            c_acc += b_p * tl.exp2((b_r - c_ref) * LOG2E + COL_SHIFT)[:, None]
        p_c = col_ptr + pid_p * N + o_n
        tl.store(p_c, tl.zeros([BLOCK_N], dtype=tl.float32) + c_ref, mask=m_n)
        tl.store(p_c + n_p * N, tl.sum(c_acc, axis=0), mask=m_n)
        # the next column block loads the row partials this one stored, maybe in other threads
        tl.debug_barrier()


@triton.jit
def _merge(max_ptr, sum_ptr, o, mask, L, n_parts, log_scale):
    """`logsumexp_p(max[p, o] + log(sum[p, o])) - log_scale` in float64, and `max_p max[p, o]`."""
    best = tl.full(o.shape, float("-inf"), dtype=tl.float64)
    top = tl.full(o.shape, float("-inf"), dtype=tl.float32)
    for p in range(0, n_parts):
        b_max = tl.load(max_ptr + p * L + o, mask=mask, other=0.0)
        top = tl.maximum(top, b_max)
        x = b_max.to(tl.float64) + tl.log(
            tl.load(sum_ptr + p * L + o, mask=mask, other=1.0).to(tl.float64))
        best = tl.maximum(best, x)
    ref = tl.where((best == float("inf")) | (best == float("-inf")), 0.0, best)  # no inf - inf
    total = tl.zeros(o.shape, dtype=tl.float64)
    for p in range(0, n_parts):
        x = tl.load(max_ptr + p * L + o, mask=mask, other=0.0).to(tl.float64) + tl.log(
            tl.load(sum_ptr + p * L + o, mask=mask, other=1.0).to(tl.float64))
        total += tl.exp(x - ref)
    return ref + tl.log(total) - log_scale, top


FLUSH_MARGIN = tl.constexpr(108.5)
"""A separable column term lost to underflow (see ROW_SHIFT) is below `exp(R - 120.6)`, R at
most the column's stored reference `top`; a column's sum takes each of its M terms once and
each rescaling of a partial sum at most once per row block (those lose below `exp(R - 153.9)`
each), so the lost mass is below about `M exp(top - 120.6)`. Columns where that bound passes
2^-17 of the column's sum (`lse < top + log(M) - 108.8`) are recomputed exactly: columns whose
every logit lies more than about 100 below every row's best, as a key pointing away from all
queries at scale 100 (at scale 100 and unit rows `top` is at most 100)."""


@triton.jit
def _exact_columns(q_ptr, k_ptr, scale_ptr, o, m_o, M, D,
                   stride_qm, stride_qd, stride_kn, stride_kd,
                   BLOCK: tl.constexpr, FIX_M: tl.constexpr, FIX_D: tl.constexpr,
                   UPCAST: tl.constexpr, ROUNDED: tl.constexpr):
    """Column LSEs [BLOCK] of columns `o` over all M rows with each column's own running max
    (the forward's exact method; pointer loads, bf16/fp16 only)."""
    s = tl.load(scale_ptr).to(tl.float32)
    c_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    c_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start_m in range(0, M, FIX_M):
        o_m = start_m + tl.arange(0, FIX_M)
        m_m = o_m < M
        b_acc = qk_tile(
            q_ptr, k_ptr, q_ptr, k_ptr, 0, 0, o_m, o, m_m, m_o, D,
            stride_qm, stride_qd, stride_kn, stride_kd, FIX_M, BLOCK, FIX_D, UPCAST,
            False, "ieee", False,
        )
        b_s = tl.where(m_m[:, None], scale_logits(b_acc, s, ROUNDED), float("-inf"))
        c_max, c_sum = _exact_column_update(c_max, c_sum, b_s, False)
    return c_max.to(tl.float64) + tl.log(c_sum.to(tl.float64))


@triton.jit
def _positive_logits(q_ptr, k_ptr, y_ptr, scale_ptr, o, m_o, N, D, col_offset,
                     stride_qm, stride_qd, stride_kn, stride_kd,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ROUNDED: tl.constexpr):
    """`scale * q[o] . k[label]` [BLOCK] in fp32 (0 where the label is not among these N
    columns): one gathered row of k per row, M * D work in all."""
    b_y = local_column(tl.load(y_ptr + o, mask=m_o, other=-1), col_offset, N)
    has = m_o & (b_y >= 0)
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        m = has[:, None] & (o_d < D)[None, :]
        b_q = tl.load(q_ptr + o[:, None] * stride_qm + o_d[None, :] * stride_qd, mask=m, other=0.0)
        b_k = tl.load(k_ptr + b_y.to(tl.int64)[:, None] * stride_kn + o_d[None, :] * stride_kd,
                      mask=m, other=0.0)
        b_acc += tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32), axis=1)
    return scale_logits(b_acc, tl.load(scale_ptr).to(tl.float32), ROUNDED)


@triton.jit
def _merge_kernel(row_ptr, col_ptr, row_lse_ptr, col_lse_ptr, pos_ptr, M, N, n_q, n_p,
                  q_ptr, k_ptr, y_ptr, scale_ptr, D, col_offset,
                  stride_qm, stride_qd, stride_kn, stride_kd,
                  BLOCK: tl.constexpr, SEPARABLE: tl.constexpr, FIX_M: tl.constexpr,
                  FIX_D: tl.constexpr, UPCAST: tl.constexpr, ROUNDED: tl.constexpr):
    """Program column 0: row LSE [M] and positive logit [M] from the `[3, Q, M]` row partials
    (with SEPARABLE the positive logits from q and k: `_separable_kernel` leaves them out);
    column 1 (symmetric only): column LSE [N] from the `[2, P, N]` column partials, with
    SEPARABLE the columns that underflow may have changed recomputed (`FLUSH_MARGIN`)."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # int64 offsets ((2 * n_q + p) * M passes 2**31 beyond 44M rows); `zero + x` also holds for x
    # that Triton specialised to a constant 1
    zero = tl.program_id(0).to(tl.int64) * 0
    M, N, n_q, n_p = zero + M, zero + N, zero + n_q, zero + n_p
    if tl.program_id(1) == 0:
        m = o < M
        lse, _ = _merge(row_ptr, row_ptr + n_q * M, o, m, M, n_q,
                        ROW_SHIFT * LN2 if SEPARABLE else 0.0)
        tl.store(row_lse_ptr + o, lse, mask=m)
        if SEPARABLE:
            pos = _positive_logits(q_ptr, k_ptr, y_ptr, scale_ptr, o, m, N, D, col_offset,
                                   stride_qm, stride_qd, stride_kn, stride_kd, BLOCK, FIX_D,
                                   ROUNDED)
        else:
            pos = tl.zeros([BLOCK], dtype=tl.float32)
            for p in range(0, n_q):
                pos += tl.load(row_ptr + (2 * n_q + p) * M + o, mask=m, other=0.0)
        tl.store(pos_ptr + o, pos, mask=m)
    else:
        m = o < N
        lse, top = _merge(col_ptr, col_ptr + n_p * N, o, m, N, n_p,
                          SHIFT * LN2 if SEPARABLE else 0.0)
        if SEPARABLE:
            bad = m & (lse < top.to(tl.float64) + tl.log(M.to(tl.float64)) - FLUSH_MARGIN)
            if tl.max(bad.to(tl.int32), axis=0) > 0:
                exact = _exact_columns(q_ptr, k_ptr, scale_ptr, o, m, M, D, stride_qm,
                                       stride_qd, stride_kn, stride_kd, BLOCK, FIX_M, FIX_D,
                                       UPCAST, ROUNDED)
                lse = tl.where(bad, exact, lse)
        tl.store(col_lse_ptr + o, lse, mask=m)


MERGE_BLOCK = 128
"""Elements per program of the merge kernel (small: its float64 exp and log are slow, so many
programs)."""


def lse_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, symmetric: bool,
    precision: str, tile: Tile | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(row LSE [M], column LSE [N] or [0], positive logit [M]); LSEs float64, pos fp32.
    `labels` are column indices shifted by `col_offset` (-1: no positive in this block)."""
    precision = configs.kernel_precision(q.dtype, precision)
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    lse = dict(dtype=LSE_DTYPE, device=q.device)
    if m == 0 or n == 0:
        col = torch.full((n if symmetric else 0,), float("-inf"), **lse)
        return torch.full((m,), float("-inf"), **lse), col, q.new_zeros(m, dtype=torch.float32)
    tma = use_tma(q, k)
    t = tile or fwd_tile(q.dtype, symmetric, tma)
    y = labels.contiguous()
    q_desc, k_desc = descriptors(q, k, t, tma)
    n_p, rows_per = split(m, t.block_m, configs.PARTS)
    n_q, cols_per = split(n, t.block_n, configs.PARTS)
    n_row, n_col = 3 * n_q * m, (2 * n_p * n if symmetric else 0)
    part = torch.empty(n_row + n_col, dtype=torch.float32, device=q.device)
    row_part, col_part = part[:n_row], part[n_row:] if symmetric else part
    upcast = INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
    rounded = configs.rounded_logits(q.dtype)
    separable = symmetric and q.dtype != torch.float32
    args = (
        q, k, q_desc, k_desc, scale, y, row_part, col_part,
        m, n, d, col_offset, rows_per, cols_per,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
    )
    even = m % t.block_m == 0 and n % t.block_n == 0
    meta = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, EVEN=even,
                UPCAST=upcast, ROUNDED=rounded, TMA=tma,
                num_warps=t.num_warps, num_stages=t.num_stages)
    if separable:
        _separable_kernel[(n_p, n_q)](*args, **meta)
    else:
        _lse_fwd_kernel[(n_p, n_q)](*args, SYMMETRIC=symmetric, IS_FP32=q.dtype == torch.float32,
                                    PRECISION=precision, **meta)
    row, pos = torch.empty(m, **lse), torch.empty(m, dtype=torch.float32, device=q.device)
    col = torch.empty(n if symmetric else 0, **lse)
    grid = (triton.cdiv(max(m, n if symmetric else 0), MERGE_BLOCK), 2 if symmetric else 1)
    fix_m = configs.INTERPRET_TILE.block_m if INTERPRET else 32  # rows per step of a recompute
    _merge_kernel[grid](
        row_part, col_part, row, col if symmetric else row, pos, m, n, n_q, n_p,
        q, k, y, scale, d, col_offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        BLOCK=MERGE_BLOCK, SEPARABLE=separable, FIX_M=fix_m, FIX_D=t.block_d,
        UPCAST=upcast, ROUNDED=rounded,
    )
    return row, col, pos


@torch.library.custom_op("infcl::inf_fwd", mutates_args=())
@autocast_off
def inf_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, symmetric: bool,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `infcl::chunked_fwd`: (row LSE, column LSE or [0], positive logit).

    `chunk_size` is the torch tiles' argument, unused here: every block op takes the same
    arguments, so the ring runs either without knowing which."""
    return lse_fwd(q, k, scale, labels, col_offset, symmetric, precision)


@inf_fwd.register_fake
def inf_fwd_fake(q, k, scale, labels, col_offset, symmetric, chunk_size, precision):
    n_col = k.shape[0] if symmetric else 0
    return (
        q.new_empty(q.shape[0], dtype=LSE_DTYPE),
        q.new_empty(n_col, dtype=LSE_DTYPE),
        q.new_empty(q.shape[0], dtype=torch.float32),
    )
