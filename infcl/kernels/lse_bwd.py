"""Backward stage: recompute a block of logits, turn it into dS (the logits' gradient), and let
two GEMMs take dq and dk from it.

The kernel writes `dS / g_max` for a block of at most `BWD_BLOCK x BWD_BLOCK` logits in the input
dtype (dividing by the largest incoming gradient keeps fp16 away from underflow) and the block's
partial sums of `dS * (q @ k.T)`, which give dscale exactly in fp32. cuBLAS then forms
`dq += dS @ k` and `dk += dS.T @ q` with fp32 outputs. Memory: one block of dS, an fp32 dk
accumulator and O(M + N) statistics.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl._autograd import register_block_autograd
from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, tile_for
from infcl.kernels.lse_fwd import inf_fwd


@triton.jit
def _dlogits_kernel(
    q_ptr, k_ptr, scale_ptr, inv_g_ptr, y_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr,
    p_ptr, ds_ptr,
    M, N, D, col_offset,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COL: tl.constexpr,  # the symmetric loss also backpropagates through the column LSE
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION ("tf32" or "ieee"); others ignore it
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_q = q_ptr + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
        p_k = k_ptr + o_d[:, None] * stride_kd + o_n[None, :] * stride_kn
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        b_k = tl.load(p_k, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            b_acc = tl.dot(b_q.to(tl.float32), b_k.to(tl.float32), b_acc, input_precision="ieee")
        elif IS_FP32:
            b_acc = tl.dot(b_q, b_k, b_acc, input_precision=PRECISION)
        else:
            b_acc = tl.dot(b_q, b_k, b_acc)  # [BLOCK_M, BLOCK_N], q @ k.T without the scale
    s = tl.load(scale_ptr).to(tl.float32)
    b_s = b_acc * s
    b_r = tl.load(row_lse_ptr + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
    b_gr = tl.load(g_row_ptr + o_m, mask=m_m, other=0.0)
    b_p = b_gr[:, None] * tl.exp(b_s - b_r[:, None])  # [BLOCK_M, BLOCK_N]
    if HAS_COL:
        b_c = tl.load(col_lse_ptr + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
        b_gc = tl.load(g_col_ptr + o_n, mask=m_n, other=0.0)
        b_p += b_gc[None, :] * tl.exp(b_s - b_c[None, :])
    b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1) - col_offset  # [BLOCK_M]
    b_gp = tl.load(g_pos_ptr + o_m, mask=m_m, other=0.0)
    b_p += tl.where(o_n[None, :] == b_y[:, None], b_gp[:, None], 0.0)
    b_p = tl.where(m_m[:, None] & m_n[None, :], b_p, 0.0)
    n_pid_n = tl.num_programs(1)
    tl.store(ds_ptr + pid_m * n_pid_n + pid_n, tl.sum(b_p * b_acc))
    inv_g = tl.load(inv_g_ptr)
    p_p = p_ptr + o_m[:, None] * stride_pm + o_n[None, :]
    tl.store(p_p, (b_p * inv_g).to(p_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """cuBLAS follows the same fp32 precision the kernels use (TF32 unless "ieee")."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result: cuBLAS accumulates low-precision inputs into fp32 output."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def dlogits_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of `sum(g_row * row_lse + g_col * col_lse + g_pos * pos)` for one block."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dq = torch.zeros_like(q)
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    if m == 0 or n == 0:
        return dq, dk32.to(k.dtype), ds.to(scale.dtype)
    has_col = col_lse.numel() > 0
    g_all = [g_row.abs().amax(), g_pos.abs().amax()] + ([g_col.abs().amax()] if has_col else [])
    g_max = torch.stack(g_all).amax().float()
    g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max))
    inv_g = (1.0 / g_max).reshape(1)
    s = scale.detach().to(torch.float32).reshape(1)
    t = tile_for(q.dtype)
    p_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    blk = configs.BWD_BLOCK
    p_buf = torch.empty((min(m, blk), min(n, blk)), dtype=p_dtype, device=q.device)
    # autograd hands in expanded (stride-0) gradients; the kernel indexes them as dense vectors
    row_lse, col_lse = row_lse.float().contiguous(), col_lse.float().contiguous()
    g_row, g_col, g_pos = (g.float().contiguous() for g in (g_row, g_col, g_pos))
    labels = labels.contiguous()
    with _matmul_precision(precision):
        for a in range(0, m, blk):
            b = min(a + blk, m)
            dq32 = torch.zeros((b - a, d), dtype=torch.float32, device=q.device)
            for c in range(0, n, blk):
                e = min(c + blk, n)
                p = p_buf[: b - a, : e - c]
                grid = (triton.cdiv(b - a, t.block_m), triton.cdiv(e - c, t.block_n))
                ds_part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device)
                _dlogits_kernel[grid](
                    q[a:b], k[c:e], s, inv_g, labels[a:b],
                    row_lse[a:b], col_lse[c:e] if has_col else row_lse,
                    g_row[a:b], g_col[c:e] if has_col else g_row, g_pos[a:b],
                    p, ds_part,
                    b - a, e - c, d, col_offset + c,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), p.stride(0),
                    BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
                    HAS_COL=has_col,
                    UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
                    IS_FP32=q.dtype == torch.float32, PRECISION=precision,
                    num_warps=t.num_warps, num_stages=t.num_stages,
                )
                ds += ds_part.sum()
                dq32 += _mm32(p, k[c:e])
                dk32[c:e] += _mm32(p.T, q[a:b])
            dq[a:b] = (dq32 * (s * g_max)).to(q.dtype)
    dk = (dk32 * (s * g_max)).to(k.dtype)
    return dq, dk, ds.to(scale.dtype)


@torch.library.custom_op("infcl::inf_bwd", mutates_args=())
def inf_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `infcl::chunked_bwd`; the LSEs are used as given (they may be global)."""
    return dlogits_bwd(
        q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, precision
    )


@inf_bwd.register_fake
def _(q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


register_block_autograd(inf_fwd, inf_bwd)
