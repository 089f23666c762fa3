"""Backward stage: recompute tiles of logits, turn them into dS (the logits' gradient), and let
two GEMMs take dq and dk from it.

For each square block of at most `BWD_BLOCK x BWD_BLOCK` logits, `_ds_kernel` recomputes the
tiles with `tl.dot`, forms `dS = g_row * softmax_row + g_col * softmax_col + g_pos * onehot`,
and writes dS in the input dtype (fp16 as `dS / g_max`: dividing by the largest incoming
gradient keeps it away from underflow) along with per-program partial sums of `dS * (q @ k.T)`, which give dscale
exactly in fp32. cuBLAS then adds `dS @ k` into an fp32 dq block and `dS.T @ q` into an fp32 dk
accumulator. Memory: one block of dS, the fp32 dk accumulator, O(M + N) statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, bwd_tile
from infcl.kernels.logits import LOG2E, ds_gemms, exp_precise, fp16_grad_scale, qk_tile
from infcl.kernels.numerics import autocast_off, split_lse


@triton.jit
def _softmax(b_s, b_hi, b_lo, PRECISE: tl.constexpr):
    """exp(S - lse) with lse = hi + lo. `S - hi` is exact where S is near the LSE, which keeps
    fp32's digits in the probabilities that matter; bf16 and fp16 take one FMA instead."""
    if PRECISE:
        return exp_precise((b_s - b_hi) - b_lo)
    return tl.exp2(b_s * LOG2E - (b_hi + b_lo) * LOG2E)


@triton.jit
def _ds_kernel(
    q_ptr, k_ptr, scale_ptr, inv_g_ptr, y_ptr,
    r_hi_ptr, r_lo_ptr, c_hi_ptr, c_lo_ptr, g_row_ptr, g_col_ptr, g_pos_ptr,
    ds_ptr, dscale_ptr,
    M, N, D, col_offset, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_dsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SYMMETRIC: tl.constexpr,  # the symmetric loss also backpropagates through the column LSE
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
    PRECISE: tl.constexpr,  # fp32 inputs: subtract the LSE in two exact steps (see _softmax)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    col_lo = pid_c * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr)
    inv_g = tl.load(inv_g_ptr)
    b_rh = tl.load(r_hi_ptr + o_m, mask=m_m, other=0.0)  # [BLOCK_M], LSE = hi + lo
    b_rl = tl.load(r_lo_ptr + o_m, mask=m_m, other=0.0)
    b_gr = tl.load(g_row_ptr + o_m, mask=m_m, other=0.0)
    b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1) - col_offset
    b_gp = tl.load(g_pos_ptr + o_m, mask=m_m, other=0.0)
    b_dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < col_hi
        b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled
            q_ptr, k_ptr, o_m, o_n, m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION,
        )
        b_s = b_acc * s
        b_ds = b_gr[:, None] * _softmax(b_s, b_rh[:, None], b_rl[:, None], PRECISE)
        if SYMMETRIC:
            b_ch = tl.load(c_hi_ptr + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
            b_cl = tl.load(c_lo_ptr + o_n, mask=m_n, other=0.0)
            b_gc = tl.load(g_col_ptr + o_n, mask=m_n, other=0.0)
            b_ds += b_gc[None, :] * _softmax(b_s, b_ch[None, :], b_cl[None, :], PRECISE)
        b_ds += tl.where(o_n[None, :] == b_y[:, None], b_gp[:, None], 0.0)
        b_ds = tl.where(m_m[:, None] & m_n[None, :], b_ds, 0.0)  # [BLOCK_M, BLOCK_N]
        b_dscale += tl.sum(b_ds * b_acc, axis=1)
        p_ds = ds_ptr + o_m[:, None] * stride_dsm + o_n[None, :]
        tl.store(p_ds, (b_ds * inv_g).to(ds_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_c, tl.sum(b_dscale))


def ds_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    precision: str, tile: Tile | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of `sum(g_row * row_lse + g_col * col_lse + g_pos * pos)` for one block.

    The loss is symmetric when `col_lse` is not empty."""
    precision = configs.resolve_precision(precision)
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale)
    symmetric = col_lse.numel() > 0
    g_max = fp16_grad_scale(q, g_row, g_pos, g_col)
    inv_g = (1.0 / g_max).reshape(1)
    s = scale.detach().to(torch.float32).reshape(1)
    # autograd hands in expanded (stride-0) gradients; the kernel indexes them as dense vectors
    r_hi, r_lo = (x.contiguous() for x in split_lse(row_lse, torch.float32))
    c_hi, c_lo = (x.contiguous() for x in split_lse(col_lse, torch.float32))
    g_row, g_col, g_pos = (g.float().contiguous() for g in (g_row, g_col, g_pos))
    if not symmetric:
        c_hi, c_lo, g_col = r_hi, r_lo, g_row  # never read; any valid pointer will do
    y = labels.contiguous()
    t = tile or bwd_tile(q.dtype)

    def launch(rows, cols, ds, sums, grid, cols_per):
        c_rows = cols if symmetric else slice(None)
        _ds_kernel[grid](
            q[rows], k[cols], s, inv_g, y[rows],
            r_hi[rows], r_lo[rows], c_hi[c_rows], c_lo[c_rows],
            g_row[rows], g_col[c_rows], g_pos[rows],
            ds, sums[0],
            ds.shape[0], ds.shape[1], d, col_offset + cols.start, cols_per,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), ds.stride(0),
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
            SYMMETRIC=symmetric,
            UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
            IS_FP32=q.dtype == torch.float32, PRECISION=precision,
            PRECISE=q.dtype == torch.float32,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    dq, dk, (dscale,) = ds_gemms(q, k, scale, g_max, t, 1, precision, launch)
    return dq, dk, dscale.to(scale.dtype)


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
