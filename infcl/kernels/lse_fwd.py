"""Forward stage: online log-sum-exp over tiles of `scale * q @ k.T`, one row block a program.

`infcl::inf_fwd` runs the kernel once over (q, k) for the row statistics and positives, and,
when the column statistics are wanted, once over (k, q): the logits are never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels.configs import INTERPRET, tile_for


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, y_ptr, lse_ptr, pos_ptr,
    M, N, D, col_offset,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,  # the column pass (k over q) has no positives to pick
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION ("tf32" or "ieee"); others ignore it
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    s = tl.load(scale_ptr).to(tl.float32)
    if HAS_POS:
        b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1) - col_offset  # [BLOCK_M]
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        o_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
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
                b_acc = tl.dot(b_q, b_k, b_acc)  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(m_n[None, :], b_acc * s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_s - b_new[:, None]), axis=1)
        b_max = b_new
        if HAS_POS:
            b_pos += tl.sum(tl.where(o_n[None, :] == b_y[:, None], b_s, 0.0), axis=1)
    tl.store(lse_ptr + o_m, b_max + tl.log(b_sum), mask=m_m)
    if HAS_POS:
        tl.store(pos_ptr + o_m, b_pos, mask=m_m)


def lse_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor | None, col_offset: int, precision: str
) -> tuple[Tensor, Tensor]:
    """Row log-sum-exp of `scale * q @ k.T` and, if labels are given, the positive logits."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    lse = torch.empty(m, dtype=torch.float32, device=q.device)
    pos = torch.zeros(m, dtype=torch.float32, device=q.device)
    if m == 0:
        return lse, pos
    if n == 0:
        return lse.fill_(float("-inf")), pos
    t = tile_for(q.dtype)
    s = scale.detach().to(torch.float32).reshape(1)
    has_pos = labels is not None
    if has_pos:
        labels = labels.contiguous()
    _lse_fwd_kernel[(triton.cdiv(m, t.block_m),)](
        q, k, s, labels if has_pos else lse, lse, pos,
        m, n, d, col_offset,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        HAS_POS=has_pos, UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
        IS_FP32=q.dtype == torch.float32, PRECISION=precision,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return lse, pos


@torch.library.custom_op("infcl::inf_fwd", mutates_args=())
def inf_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, want_col: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `infcl::chunked_fwd`: (row LSE, column LSE or [0], positive logit)."""
    row, pos = lse_fwd(q, k, scale, labels, col_offset, precision)
    if want_col:
        col, _ = lse_fwd(k, q, scale, None, 0, precision)
    else:
        col = q.new_empty(0, dtype=torch.float32)
    return row, col, pos


@inf_fwd.register_fake
def _(q, k, scale, labels, col_offset, want_col, precision):
    f32 = torch.float32
    n_col = k.shape[0] if want_col else 0
    return (
        q.new_empty(q.shape[0], dtype=f32),
        q.new_empty(n_col, dtype=f32),
        q.new_empty(q.shape[0], dtype=f32),
    )
