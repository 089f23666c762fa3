"""Backward stage: recompute tiles of logits, turn them into dS (the logits' gradient), and let
two GEMMs take dq and dk from it.

For each square block of at most `BWD_BLOCK x BWD_BLOCK` logits, `_ds_kernel` recomputes the
tiles with `tl.dot`, forms `dS = g_row * softmax_row + g_col * softmax_col + g_pos * onehot`,
and writes `scale * dS` in the input dtype (fp16 as `scale * dS / g_max`: dividing by the largest
incoming gradient keeps it away from underflow) along with per-program partial sums of
`dS * (q @ k.T)`, which give dscale exactly in fp32. cuBLAS then takes dq and dk from it
(`logits.ds_gemms`). Memory: one block of dS, O(M + N) statistics, and for a loss of more than
one block an fp32 dk accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, bwd_tile
from infcl.kernels.logits import (
    LOG2E,
    descriptors,
    ds_gemms,
    exp_precise,
    fp16_grad_scale,
    local_column,
    part,
    qk_tile,
    scale_logits,
    use_tma,
)
from infcl.kernels.numerics import autocast_off


@triton.jit
def _softmax(b_s, b_hi, b_lo, PRECISE: tl.constexpr):
    """exp(S - lse) with lse = hi + lo. `S - hi` is exact where S is near the LSE, which keeps
    fp32's digits in the probabilities that matter (a lone column's probability is exactly 1);
    bf16 and fp16 take one exp2 of `(S - hi) * log2(e) - lo * log2(e)`. (`S * log2(e) - lse *
    log2(e)` in one FMA is off by half an ulp of `lse * log2(e)`: at |S| = 1000 a probability
    of 1 came out 1 +- 6e-5.)"""
    if PRECISE:
        return exp_precise((b_s - b_hi) - b_lo)
    return tl.exp2((b_s - b_hi) * LOG2E - b_lo * LOG2E)


@triton.jit
def _stats(lse_ptr, g_ptr, stride_g, o, mask):
    """A block of one direction's statistics: the float64 LSE split as fp32 `hi + lo` (so
    `(S - hi) - lo` is accurate where `S - lse` matters), and the incoming gradient."""
    b_lse = tl.load(lse_ptr + o, mask=mask, other=0.0)
    b_hi = b_lse.to(tl.float32)
    b_lo = (b_lse - b_hi.to(tl.float64)).to(tl.float32)
    b_g = tl.load(g_ptr + o * stride_g, mask=mask, other=0.0).to(tl.float32)
    return b_hi, b_lo, b_g


@triton.jit
def _ds_kernel(
    q_ptr, k_ptr, q_desc, k_desc, scale_ptr, inv_g_ptr, y_ptr,
    r_lse_ptr, c_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr,
    ds_ptr, dscale_ptr,
    M, N, D, col_offset, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_dsm,
    stride_gr, stride_gc, stride_gp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN: tl.constexpr,  # M and N are multiples of the tile: no masks in the epilogue
    SYMMETRIC: tl.constexpr,  # the symmetric loss also backpropagates through the column LSE
    G_SCALED: tl.constexpr,  # fp16: dS is stored divided by the largest incoming gradient
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
    PRECISE: tl.constexpr,  # fp32 inputs: subtract the LSE in two exact steps (see _softmax)
    ROUNDED: tl.constexpr,  # fp32, fp16 on a GPU: S rounded alone (see logits.scale_logits)
    TMA: tl.constexpr,  # q and k through the descriptors of this block (see logits.qk_tile)
):
    """Writes `scale * dS` (fp16: `scale * dS / g_max`) in ds's dtype, so that the GEMMs after
    it give dq and dk without another pass; and per-program partial sums of `dS * (q @ k.T)`.
    Offsets inside the block (M, N <= BWD_BLOCK) are 32-bit, the row bases 64-bit."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    q_ptr += pid_m * BLOCK_M * stride_qm
    ds_ptr += pid_m * BLOCK_M * stride_dsm
    o_i = tl.arange(0, BLOCK_M)
    o_m = pid_m * BLOCK_M + o_i
    m_m = o_m < M
    col_lo = pid_c * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr).to(tl.float32)
    out = s * tl.load(inv_g_ptr) if G_SCALED else s
    b_rh, b_rl, b_gr = _stats(r_lse_ptr, g_row_ptr, stride_gr, o_m, m_m)  # [BLOCK_M]
    b_y = local_column(tl.load(y_ptr + o_m, mask=m_m, other=-1), col_offset, N)
    b_gp = tl.load(g_pos_ptr + o_m * stride_gp, mask=m_m, other=0.0).to(tl.float32)
    b_dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PRECISE:  # fp32: the sum of `dS * (q @ k.T)` cancels; its rows add up in float64
        b_dscale = b_dscale.to(tl.float64)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < col_hi
        b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled (k's offsets in 64 bits)
            q_ptr, k_ptr, q_desc, k_desc, (pid_m * BLOCK_M).to(tl.int32), start_n, o_i,
            o_n.to(tl.int64), m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION, TMA,
        )
        b_s = scale_logits(b_acc, s, ROUNDED)
        b_ds = b_gr[:, None] * _softmax(b_s, b_rh[:, None], b_rl[:, None], PRECISE)
        if SYMMETRIC:
            b_ch, b_cl, b_gc = _stats(c_lse_ptr, g_col_ptr, stride_gc, o_n, m_n)  # [BLOCK_N]
            b_ds += b_gc[None, :] * _softmax(b_s, b_ch[None, :], b_cl[None, :], PRECISE)
        b_ds += tl.where(o_n[None, :] == b_y[:, None], b_gp[:, None], 0.0)
        if not EVEN:
            b_ds = tl.where(m_m[:, None] & m_n[None, :], b_ds, 0.0)  # [BLOCK_M, BLOCK_N]
        b_dscale += tl.sum(b_ds * b_acc, axis=1).to(b_dscale.dtype)
        p_ds = ds_ptr + o_i[:, None] * stride_dsm + o_n[None, :]
        b_out = (b_ds * out).to(ds_ptr.dtype.element_ty)
        if EVEN:
            tl.store(p_ds, b_out)
        else:
            tl.store(p_ds, b_out, mask=m_m[:, None] & m_n[None, :])
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_c, tl.sum(b_dscale))


def ds_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    precision: str, tile: Tile | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of `sum(g_row * row_lse + g_col * col_lse + g_pos * pos)` for one block.

    The loss is symmetric when `col_lse` is not empty."""
    precision = configs.kernel_precision(q.dtype, precision)
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale)
    symmetric = col_lse.numel() > 0
    g_max = fp16_grad_scale(q, g_row, g_pos, g_col)
    if not symmetric:  # never read; any valid pointer will do
        col_lse, g_col = row_lse, g_row
    y = labels.contiguous()
    tma = use_tma(q, k)
    t = tile or bwd_tile(q.dtype)

    def launch(rows, cols, ds, sums, grid, cols_per):
        c_rows = cols if symmetric else slice(None)
        # autograd hands in expanded (stride-0) gradients: the kernel reads them by stride
        g_r, g_c, g_p = part(g_row, rows), part(g_col, c_rows), part(g_pos, rows)
        q_b, k_b = part(q, rows), part(k, cols)
        _ds_kernel[grid](
            q_b, k_b, *descriptors(q_b, k_b, t, tma), scale, scale if g_max is None else 1.0 / g_max,
            part(y, rows), part(row_lse, rows), part(col_lse, c_rows), g_r, g_c, g_p,
            ds, sums[0],
            ds.shape[0], ds.shape[1], d, col_offset + cols.start, cols_per,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), ds.stride(0),
            g_r.stride(0), g_c.stride(0), g_p.stride(0),
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
            EVEN=ds.shape[0] % t.block_m == 0 and ds.shape[1] % t.block_n == 0,
            SYMMETRIC=symmetric, G_SCALED=g_max is not None,
            UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
            IS_FP32=q.dtype == torch.float32, PRECISION=precision,
            PRECISE=q.dtype == torch.float32, ROUNDED=configs.rounded_logits(q.dtype), TMA=tma,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    dq, dk, sums = ds_gemms(q, k, g_max, t, 1, precision, launch)
    return dq, dk, sums[0].to(scale.dtype)


@torch.library.custom_op("infcl::inf_bwd", mutates_args=())
@autocast_off
def inf_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `infcl::chunked_bwd`; the LSEs are used as given (they may be global).
    `chunk_size` is unused, as in `infcl::inf_fwd`."""
    return ds_bwd(
        q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, precision
    )


@inf_bwd.register_fake
def inf_bwd_fake(
    q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, chunk_size, precision
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)
