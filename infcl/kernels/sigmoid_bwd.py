"""Backward stage of the sigmoid (SigLIP) loss: recompute tiles of logits, turn them into
`dS = g_row * (sigmoid(S) - onehot)`, and let two GEMMs take dq and dk from it.

The positive's term is written `-sigmoid(-S)` and both come from `e = exp(-|S|)`, so neither
cancels nor overflows. As in the softmax backward (`lse_bwd.py`), one block of at most
`BWD_BLOCK x BWD_BLOCK` dS is materialised in the input dtype as `scale * dS` (fp16 divided by
`g_max`, away from underflow), with per-program partial sums of `dS * (q @ k.T)` (dscale) and
of `dS` (dbias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs
from infcl.kernels.configs import INTERPRET, Tile, sigmoid_tile
from infcl.kernels.logits import (
    descriptors,
    ds_gemms,
    exp_of,
    fp16_grad_scale,
    local_column,
    part,
    qk_tile,
    use_tma,
)
from infcl.kernels.numerics import autocast_off
from infcl.kernels.sigmoid_fwd import softplus_rows


@triton.jit
def _sigmoid_ds_kernel(
    q_ptr, k_ptr, q_desc, k_desc, scale_ptr, bias_ptr, inv_g_ptr, y_ptr, g_row_ptr,
    ds_ptr, dscale_ptr, dbias_ptr, loss_ptr,
    M, N, D, col_offset, cols_per_part,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_dsm, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN: tl.constexpr,  # M and N are multiples of the tile: no masks in the epilogue
    G_SCALED: tl.constexpr,  # fp16: dS is stored divided by the largest incoming gradient
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION (see configs.PRECISIONS); others ignore it
    PRECISION: tl.constexpr,
    WITH_LOSS: tl.constexpr,  # also the partial sums of the loss itself (the fused forward)
    TMA: tl.constexpr,  # q and k through the descriptors of this block (see logits.qk_tile)
):
    """Per tile, `u = dS / g_row = sigmoid(S) - onehot` (the incoming gradient is a row factor,
    applied once per row to the partial sums and once per element to the store) and, WITH_LOSS,
    the rows' `softplus(-z S)` (see `sigmoid_fwd.softplus_rows`)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    # 64-bit row bases; offsets inside the block (M, N <= BWD_BLOCK) in 32 bits
    q_ptr += pid_m * BLOCK_M * stride_qm
    ds_ptr += pid_m * BLOCK_M * stride_dsm
    o_i = tl.arange(0, BLOCK_M)
    o_m = pid_m * BLOCK_M + o_i
    m_m = o_m < M
    col_lo = pid_c * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    s = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(bias_ptr).to(tl.float32)
    out = s * tl.load(inv_g_ptr) if G_SCALED else s  # ds holds scale * dS (fp16: / g_max)
    b_g = tl.load(g_row_ptr + o_m * stride_g, mask=m_m, other=0.0).to(tl.float32)  # [BLOCK_M]
    b_y = local_column(tl.load(y_ptr + o_m, mask=m_m, other=-1), col_offset, N)
    b_out = b_g * out  # the store's row factor
    b_dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    if IS_FP32:  # fp32: the partial sums' rows add up in float64 (dscale's terms cancel)
        b_dscale = b_dscale.to(tl.float64)
    b_dbias = tl.zeros([BLOCK_M], dtype=b_dscale.dtype)
    b_loss = tl.zeros([BLOCK_M], dtype=b_dscale.dtype)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < col_hi
        b_acc = qk_tile(  # [BLOCK_M, BLOCK_N], q @ k.T unscaled (k's offsets in 64 bits)
            q_ptr, k_ptr, q_desc, k_desc, (pid_m * BLOCK_M).to(tl.int32), start_n, o_i,
            o_n.to(tl.int64), m_m, m_n, D, stride_qm, stride_qd, stride_kn, stride_kd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION, TMA,
        )
        b_s = b_acc * s + b
        b_e = exp_of(-tl.abs(b_s), IS_FP32)
        b_v = 1.0 + b_e
        b_r = 1.0 / b_v  # sigmoid(|S|); sigmoid(-|S|) = e * r
        b_hit = o_n[None, :] == b_y[:, None]
        # sigmoid(S) off the positive, -sigmoid(-S) on it: sigmoid(|S|) where the sign of S and
        # the hit differ, else sigmoid(-|S|); negated on the positive
        b_u = tl.where((b_s >= 0) != b_hit, b_r, b_e * b_r)
        b_u = tl.where(b_hit, -b_u, b_u)
        if not EVEN:
            b_u = tl.where(m_m[:, None] & m_n[None, :], b_u, 0.0)  # [BLOCK_M, BLOCK_N]
        if WITH_LOSS:
            b_loss += softplus_rows(
                tl.where(b_hit, -b_s, b_s), b_e, b_v, m_m, m_n, EVEN, IS_FP32
            ).to(b_loss.dtype)
        b_dscale += tl.sum(b_u * b_acc, axis=1).to(b_dscale.dtype)
        b_dbias += tl.sum(b_u, axis=1).to(b_dbias.dtype)
        p_ds = ds_ptr + o_i[:, None] * stride_dsm + o_n[None, :]
        b_ds = (b_u * b_out[:, None]).to(ds_ptr.dtype.element_ty)
        if EVEN:
            tl.store(p_ds, b_ds)
        else:
            tl.store(p_ds, b_ds, mask=m_m[:, None] & m_n[None, :])
    o_part = pid_m * tl.num_programs(1) + pid_c
    tl.store(dscale_ptr + o_part, tl.sum(b_dscale * b_g.to(b_dscale.dtype)))
    tl.store(dbias_ptr + o_part, tl.sum(b_dbias * b_g.to(b_dbias.dtype)))
    if WITH_LOSS:
        tl.store(loss_ptr + o_part, tl.sum(b_loss))


def sigmoid_ds_bwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    g_row: Tensor, precision: str, tile: Tile | None = None, with_loss: bool = False,
) -> tuple[Tensor, ...]:
    """dq, dk, dscale, dbias of `sum(g_row * per_row)` for one block; with `with_loss`, also
    the fp32 sum of the rows' losses (unweighted), from the same tiles."""
    precision = configs.kernel_precision(q.dtype, precision)
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        zeros = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale),
                 torch.zeros_like(bias))
        return (*zeros, torch.zeros((), dtype=torch.float32, device=q.device))[: 4 + with_loss]
    g_max = fp16_grad_scale(q, g_row)
    y = labels.contiguous()
    tma = use_tma(q, k)
    t = tile or sigmoid_tile(q.dtype)

    def launch(rows, cols, ds, sums, grid, cols_per):
        q_b, k_b = part(q, rows), part(k, cols)
        _sigmoid_ds_kernel[grid](
            q_b, k_b, *descriptors(q_b, k_b, t, tma), scale, bias, scale if g_max is None else 1.0 / g_max,
            part(y, rows), part(g_row, rows), ds, sums[0], sums[1], sums[-1],
            ds.shape[0], ds.shape[1], d, col_offset + cols.start, cols_per,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), ds.stride(0), g_row.stride(0),
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
            EVEN=ds.shape[0] % t.block_m == 0 and ds.shape[1] % t.block_n == 0,
            G_SCALED=g_max is not None,
            UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
            IS_FP32=q.dtype == torch.float32, PRECISION=precision, WITH_LOSS=with_loss, TMA=tma,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    dq, dk, sums = ds_gemms(q, k, g_max, t, 2 + with_loss, precision, launch)
    out = (dq, dk, sums[0].to(scale.dtype), sums[1].to(bias.dtype, copy=True))  # no aliasing
    return (*out, sums[2].clone()) if with_loss else out


@torch.library.custom_op("infcl::inf_sigmoid_bwd", mutates_args=())
@autocast_off
def inf_sigmoid_bwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    g_row: Tensor, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of `infcl::chunked_sigmoid_bwd` (`chunk_size` unused)."""
    return sigmoid_ds_bwd(q, k, scale, bias, labels, col_offset, g_row, precision)


@inf_sigmoid_bwd.register_fake
def inf_sigmoid_bwd_fake(q, k, scale, bias, labels, col_offset, g_row, chunk_size, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale), torch.empty_like(bias)


@torch.library.custom_op("infcl::inf_sigmoid_fused", mutates_args=())
@autocast_off
def inf_sigmoid_fused(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, mean: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward and backward of the "mean" (or "sum") sigmoid loss in one sweep over the
    tiles (a scalar upstream gradient needs no statistics): (the rows' loss sum [] fp32; dq,
    dk, dscale, dbias of the mean, or of the sum). The backward then only scales these by its
    incoming gradient (`ops.sigmoid_loss`)."""
    weight = 1.0 / max(q.shape[0], 1) if mean else 1.0
    g_row = torch.full((1,), weight, dtype=torch.float32, device=q.device).expand(q.shape[0])
    dq, dk, dscale, dbias, total = sigmoid_ds_bwd(
        q, k, scale, bias, labels, 0, g_row, precision, with_loss=True
    )
    return total, dq, dk, dscale, dbias


@inf_sigmoid_fused.register_fake
def inf_sigmoid_fused_fake(q, k, scale, bias, labels, mean, precision):
    return (q.new_empty((), dtype=torch.float32), torch.empty_like(q), torch.empty_like(k),
            torch.empty_like(scale), torch.empty_like(bias))


@triton.jit
def _scale_block(x_ptr, out_ptr, blk, n, g, BLOCK: tl.constexpr):
    """Block `blk` of `out = x * g` (n elements), in fp32, rounded once to out's dtype (to
    nearest on a GPU); out may be x."""
    o = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + o, (x * g).to(out_ptr.dtype.element_ty), mask=m)


SCALE_BLOCK = 1024
"""Elements per program of the scaling kernels."""


@triton.jit
def _scaled_kernel(x_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _scale_block(x_ptr, out_ptr, tl.program_id(0), n, tl.load(g_ptr).to(tl.float32), BLOCK)


@triton.jit
def _scale_pair_kernel(a_ptr, b_ptr, g_ptr, n_a, n_b, blocks_a, BLOCK: tl.constexpr):
    """In place: `a *= g` on the first `blocks_a` programs, `b *= g` on the others (one launch
    for both feature gradients)."""
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(tl.float32)
    if pid < blocks_a:
        _scale_block(a_ptr, a_ptr, pid, n_a, g, BLOCK)
    else:
        _scale_block(b_ptr, b_ptr, pid - blocks_a, n_b, g, BLOCK)


def scale_pair_(a: Tensor, b: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """`a *= g` and `b *= g` in place, in one launch, multiplied as `scaled` multiplies: eager
    mode's held gradients (`ops._Held`). Empty or non-contiguous ones go through `scaled`
    instead (new tensors)."""
    if not (a.is_contiguous() and b.is_contiguous() and a.numel() and b.numel()):
        return scaled(a, g), scaled(b, g)
    blocks_a = triton.cdiv(a.numel(), SCALE_BLOCK)
    grid = (blocks_a + triton.cdiv(b.numel(), SCALE_BLOCK),)
    _scale_pair_kernel[grid](a, b, g, a.numel(), b.numel(), blocks_a, BLOCK=SCALE_BLOCK)
    return a, b


@torch.library.custom_op("infcl::scaled", mutates_args=())
@autocast_off
def scaled(x: Tensor, g: Tensor) -> Tensor:
    """`x * g` for a 0-dim `g`, multiplied in fp32 and rounded once to x's dtype (torch's own
    product of a bf16 tensor and a 0-dim device tensor may round `g` to bf16 first): the
    backward of `inf_sigmoid_fused`'s held gradients."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _scaled_kernel[(triton.cdiv(n, SCALE_BLOCK),)](x, g, out, n, BLOCK=SCALE_BLOCK)
    return out


@scaled.register_fake
def scaled_fake(x, g):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
