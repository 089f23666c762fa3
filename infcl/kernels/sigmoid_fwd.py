"""Forward stage of the sigmoid (SigLIP) loss: each row's `sum_j -log sigmoid(z_ij S_ij)` over
tiles of `S = scale * q @ k.T + bias`, the logits never stored.

`-log sigmoid(z S)` is `softplus(-z S)`, taken as `max(x, 0) + log1p(exp(-|x|))` with `x = -z S`:
no overflow at any size. `log1p` is formed from `u = 1 + e` as `log(u) * e / (u - 1)`, which
keeps the relative accuracy of `e` when it is tiny (the negatives of a SigLIP batch, with their
bias near -10, are mostly there). The grid is the forward's P x Q grid of partitions
(`configs.PARTS`); each program writes its rows' partial sums, which torch adds: O(Q * M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, fwd_tile, split
from infcl.kernels.logits import descriptors, exp_of, qk_tile, use_tma
from infcl.kernels.numerics import autocast_off


@triton.jit
def log1p_of(b_e, b_u):
    """log(1 + e) from `e` and `u = 1 + e` (the module docstring's form: keeps e's relative
    accuracy when e is tiny)."""
    return tl.where(b_u == 1.0, b_e, tl.log(b_u) * (b_e / (b_u - 1.0)))


@triton.jit
def _times(a, b):
    return a * b


@triton.jit
def softplus_rows(x, b_e, b_v, m_m, m_n, EVEN: tl.constexpr, PRECISE: tl.constexpr):
    """Row sums of `softplus(x)` over a tile `[BLOCK_M, BLOCK_N]`, given `e = exp(-|x|)` and
    `v = 1 + e`, masked by `m_m` x `m_n` unless EVEN. fp32 (PRECISE): `max(x, 0) + log1p(e)` per
    element (`log1p_of`). bf16 and fp16: the `log1p(e)` terms of 64 columns at a time are taken
    as the log of their product of `v` (each in [1, 2], so the product stays below 2^64): one
    logarithm per row and 64 columns instead of one and a division per element. That costs
    about one fp32 rounding of `v` per element (an absolute error near 6e-8 each, unbiased),
    far below what the bf16 or fp16 logits themselves carry."""
    if PRECISE:
        b_l = tl.maximum(x, 0.0) + log1p_of(b_e, b_v)
        if not EVEN:
            b_l = tl.where(m_m[:, None] & m_n[None, :], b_l, 0.0)
        return tl.sum(b_l, axis=1)
    b_x = tl.maximum(x, 0.0)
    if not EVEN:
        b_x = tl.where(m_m[:, None] & m_n[None, :], b_x, 0.0)
        b_v = tl.where(m_m[:, None] & m_n[None, :], b_v, 1.0)
    BLOCK_M: tl.constexpr = x.shape[0]
    BLOCK_N: tl.constexpr = x.shape[1]
    if BLOCK_N <= 64:
        b_log = tl.log(tl.reduce(b_v, 1, _times))
    else:
        b_v = tl.reshape(b_v, (BLOCK_M, BLOCK_N // 64, 64))
        b_log = tl.sum(tl.log(tl.reduce(b_v, 2, _times)), axis=1)
    return tl.sum(b_x, axis=1) + b_log


@triton.jit
def softplus(x, PRECISE: tl.constexpr):
    """log(1 + exp(x)) for fp32 x of any size, to a few ulps."""
    b_e = exp_of(-tl.abs(x), PRECISE)
    return tl.maximum(x, 0.0) + log1p_of(b_e, 1.0 + b_e)


@triton.jit
def _sigmoid_fwd_kernel(
    q_ptr, k_ptr, q_desc, k_desc, scale_ptr, bias_ptr, y_ptr, part_ptr,
    M, N, D, col_offset, rows_per_part, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # q and k through the descriptors (see logits.qk_tile)
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(bias_ptr).to(tl.float32)
    for start_m in range(row_lo, row_hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < row_hi
        b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1) - col_offset  # [BLOCK_M]
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(col_lo, col_hi, BLOCK_N):
            o_n = start_n + tl.arange(0, BLOCK_N)
            m_n = o_n < col_hi
            b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled
                q_ptr, k_ptr, q_desc, k_desc, tl.cast(start_m, tl.int32), tl.cast(start_n, tl.int32),
                o_m, o_n, m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION, TMA,
            )
            b_s = b_acc * s + b
            b_x = tl.where(o_n[None, :] == b_y[:, None], -b_s, b_s)  # -z * S
            b_l = tl.where(m_m[:, None] & m_n[None, :], softplus(b_x, IS_FP32), 0.0)
            b_sum += tl.sum(b_l, axis=1)
        tl.store(part_ptr + pid_q * M + o_m, b_sum, mask=m_m)


def sigmoid_rows(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    precision: str, tile: Tile | None = None,
) -> Tensor:
    """Each row's sigmoid loss over the columns of `k` [M] (fp32)."""
    precision = configs.kernel_precision(q.dtype, precision)
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        return torch.zeros(m, dtype=torch.float32, device=q.device)
    tma = use_tma(q, k)
    t = tile or fwd_tile(q.dtype, tma=tma)
    n_p, rows_per = split(m, t.block_m, configs.PARTS)
    n_q, cols_per = split(n, t.block_n, configs.PARTS)
    part = torch.empty((n_q, m), dtype=torch.float32, device=q.device)
    _sigmoid_fwd_kernel[(n_p, n_q)](
        q, k, *descriptors(q, k, t, tma), scale, bias, labels.contiguous(), part,
        m, n, d, col_offset, rows_per, cols_per,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
        IS_FP32=q.dtype == torch.float32, PRECISION=precision, TMA=tma,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return part[0] if n_q == 1 else part.sum(dim=0)


@torch.library.custom_op("infcl::inf_sigmoid_fwd", mutates_args=())
@autocast_off
def inf_sigmoid_fwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    chunk_size: int, precision: str,
) -> Tensor:
    """Triton twin of `infcl::chunked_sigmoid_fwd` (`chunk_size` unused)."""
    return sigmoid_rows(q, k, scale, bias, labels, col_offset, precision)


@inf_sigmoid_fwd.register_fake
def inf_sigmoid_fwd_fake(q, k, scale, bias, labels, col_offset, chunk_size, precision):
    return q.new_empty(q.shape[0], dtype=torch.float32)
