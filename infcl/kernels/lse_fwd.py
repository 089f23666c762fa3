"""Forward stage: online log-sum-exp over tiles of `scale * q @ k.T` and the positive logits; the
logits are never stored. The symmetric loss runs it twice, over (q, k) and over (k, q).

The grid is a P x Q grid of rectangular partitions of the logit matrix (P, Q <= `configs.PARTS`),
enough programs to keep two on every SM. A program walks its partition one row block at a time,
keeping that block's running max and sum in registers, and writes `[Q, M]` partials that torch
merges: O(Q * M) extra memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, fwd_tile, split
from infcl.kernels.logits import LOG2E, exp_precise, qk_tile
from infcl.kernels.numerics import LSE_DTYPE, autocast_off


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, y_ptr, max_ptr, logsum_ptr, pos_ptr,
    M, N, D, col_offset, rows_per_part, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr)
    for start_m in range(row_lo, row_hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < row_hi
        b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1) - col_offset  # [BLOCK_M]
        b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(col_lo, col_hi, BLOCK_N):
            o_n = start_n + tl.arange(0, BLOCK_N)
            m_n = o_n < col_hi
            b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled
                q_ptr, k_ptr, o_m, o_n, m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION,
            )
            # rows past the partition keep finite values (never stored); columns past it are -inf
            b_s = tl.where(m_n[None, :], b_acc * s, float("-inf"))
            b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
            if IS_FP32:  # S - max first: exact near the max, so the sum keeps fp32's digits
                b_e = exp_precise(b_s - b_new[:, None])
            else:  # one FMA; its rounding (eps * |S|) is far below bf16/fp16 input rounding
                b_e = tl.exp2(b_s * LOG2E - (b_new * LOG2E)[:, None])
            b_sum = b_sum * tl.exp2((b_max - b_new) * LOG2E) + tl.sum(b_e, axis=1)
            b_max = b_new
            b_pos += tl.sum(tl.where(o_n[None, :] == b_y[:, None], b_acc, 0.0), axis=1)
        # the LSE leaves as (max, log(sum)); torch adds them in float64
        tl.store(max_ptr + pid_q * M + o_m, b_max, mask=m_m)
        tl.store(logsum_ptr + pid_q * M + o_m, tl.log(b_sum), mask=m_m)
        tl.store(pos_ptr + pid_q * M + o_m, b_pos * s, mask=m_m)


def lse_rows(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor | None, col_offset: int, precision: str,
    tile: Tile | None = None,
) -> tuple[Tensor, Tensor]:
    """Row LSE [M] (float64) of `scale * q @ k.T` and the positive logits [M] (fp32; zeros
    without labels)."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    if m == 0 or n == 0:
        return torch.full((m,), float("-inf"), dtype=LSE_DTYPE, device=q.device), torch.zeros(m, **f32)
    t = tile or fwd_tile(q.dtype)
    n_p, rows_per = split(m, t.block_m, configs.PARTS)
    n_q, cols_per = split(n, t.block_n, configs.PARTS)
    max_part = torch.empty((n_q, m), **f32)
    logsum_part = torch.empty((n_q, m), **f32)
    pos_part = torch.empty((n_q, m), **f32)
    y = labels.contiguous() if labels is not None else torch.full((m,), -1, device=q.device)
    _lse_fwd_kernel[(n_p, n_q)](
        q, k, scale.detach().to(torch.float32).reshape(1), y, max_part, logsum_part, pos_part,
        m, n, d, col_offset if labels is not None else 0, rows_per, cols_per,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
        IS_FP32=q.dtype == torch.float32, PRECISION=precision,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    lse = max_part.to(LSE_DTYPE) + logsum_part.to(LSE_DTYPE)
    return (lse[0] if n_q == 1 else torch.logsumexp(lse, dim=0)), pos_part.sum(dim=0)


def lse_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, symmetric: bool,
    precision: str, tile: Tile | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(row LSE [M], column LSE [N] or [0], positive logit [M]); LSEs float64, pos fp32."""
    precision = configs.resolve_precision(precision)
    row, pos = lse_rows(q, k, scale, labels, col_offset, precision, tile)
    if symmetric:
        col, _ = lse_rows(k, q, scale, None, 0, precision, tile)
    else:
        col = q.new_empty(0, dtype=LSE_DTYPE)
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
