"""Products shared by both stages: the Triton tile of `q @ k.T` that the forward and backward
kernels recompute, and the backward's cuBLAS helpers (fp32 accumulation, fp32 precision)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from infcl.kernels import configs

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None

LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e): the kernels take exponentials as `exp2(x * LOG2E)`."""
LOG2E_LO = tl.constexpr(1.92596298909109e-08)
"""log2(e) minus its float32 rounding: the part of LOG2E that `x * LOG2E` in fp32 drops."""
LN2 = tl.constexpr(0.6931471805599453)
NATIVE = tl.constexpr(not configs.INTERPRET)
"""Compiled for a GPU (inline assembly available), not run by the interpreter."""


@triton.jit
def exp_precise(x):
    """exp(x) for fp32 without the `|x| * eps` error of `exp2(x * LOG2E)`: the rounding error of
    the product (recovered exactly by an FMA) and LOG2E's own rounding are put back as a
    first-order factor. Left: exp2's own error, about two ulps."""
    y = x * LOG2E
    r = tl.fma(x, LOG2E, -y) + x * LOG2E_LO  # x * log2(e) - y, to fp32 accuracy
    r = tl.where(tl.abs(y) < float("inf"), r, 0.0)  # exp(-inf) = 0 and NaN stay as exp2 has them
    return tl.exp2(y) * (1.0 + r * LN2)


@triton.jit
def exp_of(x, PRECISE: tl.constexpr):
    """exp(x): `exp_precise` for fp32 (PRECISE), one exp2 otherwise. (libdevice's expf in its
    place left dq at B=130, D=1030, scale 100 where it was on an H200: 3.3x IEEE naive's.)"""
    if PRECISE:
        return exp_precise(x)
    return tl.exp2(x * LOG2E)


@triton.jit
def scale_logits(b_acc, s, ROUNDED: tl.constexpr):
    """`S = b_acc * s`, with ROUNDED (fp32, fp16 on a GPU) as a lone `mul.rn`: the compiler cannot fuse
    it into a later `S - lse` FMA in one kernel and not in another, so the forward and the
    backward subtract the same rounded S (an FMA there would leave `exp(rounding) != 1` in the
    backward's probabilities: gradient errors of `eps * |S|` times the scale). The interpreter
    never fuses; see `configs.rounded_logits` for why bf16 goes without."""
    if ROUNDED:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [b_acc, s + tl.zeros(b_acc.shape, tl.float32)],
            dtype=tl.float32, is_pure=True, pack=1,
        )
    return b_acc * s


@triton.jit
def add_rn(a, b):
    """`a + b` in fp32 as a lone `add.rn` on a GPU. A plain add of a fresh `tl.dot` result is
    folded by Triton's combine pass into the dot's accumulator (one chain of FMAs again)."""
    if NATIVE:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1,
        )
    return a + b


@triton.jit
def local_column(b_y, lo, n):
    """Label columns `b_y` (int64) as 32-bit offsets from column `lo`, -1 where they fall outside
    `[lo, lo + n)` (range-checked before the narrowing): tiles compare them with their own
    32-bit column offsets."""
    b_y = b_y - lo
    return tl.where((b_y >= 0) & (b_y < n), b_y, -1).to(tl.int32)


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), as cuBLAS rounds its TF32 inputs.
    `tl.dot(input_precision="tf32")` truncates instead, which biases every product low."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)  # a NaN with a full mantissa would carry into the sign


@triton.jit
def qk_tile(
    q_ptr, k_ptr, q_desc, k_desc, row0, col0, o_m, o_n, m_m, m_n, D,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter computes low-precision dots wrongly: go through fp32
    IS_FP32: tl.constexpr,  # fp32 inputs take PRECISION ("ieee", "tf32x3", "tf32"); others ignore it
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # bf16/fp16: q and k come through the descriptors (see `descriptors`)
):
    """`q[o_m] @ k[o_n].T` unscaled, fp32 `[BLOCK_M, BLOCK_N]`; masked rows and columns are 0.
    Both stages call it, so the backward recomputes the forward's logits the same way. With
    TMA the tiles at rows `row0` and columns `col0` of the descriptors are loaded by the copy
    engine instead (out-of-range rows and D columns read as 0, so no masks; the pointers are
    unused). With PRECISION "tf32" the fp32 inputs are rounded to TF32 first (see
    `_round_tf32`). With "ieee" each BLOCK_D chunk is summed on its own and the chunk sums are
    added (`add_rn`): one chain of D FMAs per logit errs up to about 3x more than cuBLAS's
    blocked sums at scale 100."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        if TMA:
            b_q = q_desc.load([row0, start_d])  # [BLOCK_M, BLOCK_D]
            b_k = k_desc.load([col0, start_d]).T  # [BLOCK_D, BLOCK_N]
        else:
            o_d = start_d + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            p_q = q_ptr + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
            p_k = k_ptr + o_d[:, None] * stride_kd + o_n[None, :] * stride_kn
            b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
            b_k = tl.load(p_k, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            b_acc = tl.dot(b_q.to(tl.float32), b_k.to(tl.float32), b_acc, input_precision="ieee")
        elif IS_FP32 and PRECISION == "tf32":
            b_acc = tl.dot(_round_tf32(b_q), _round_tf32(b_k), b_acc, input_precision="tf32")
        elif IS_FP32 and PRECISION == "ieee":
            b_acc = add_rn(b_acc, tl.dot(b_q, b_k, input_precision="ieee"))
        elif IS_FP32:
            b_acc = tl.dot(b_q, b_k, b_acc, input_precision=PRECISION)
        else:
            b_acc = tl.dot(b_q, b_k, b_acc)  # [BLOCK_M, BLOCK_N]
    return b_acc


def use_tma(q: Tensor, k: Tensor) -> bool:
    """Whether q and k go to the kernels through TMA descriptors: bf16 and fp16 rows that are
    contiguous and 16-byte aligned, on a GPU with the copy engine (compute capability 9 and up;
    the interpreter emulates it, so the CPU tests run this path too), for products of at least
    `configs.TMA_MIN_LOGITS` logits (below that a step is host-bound, and building the
    descriptors costs host time)."""
    if TensorDescriptor is None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[0] * k.shape[0] < configs.TMA_MIN_LOGITS:
        return False
    if not configs.INTERPRET and not (q.is_cuda and _has_tma(q.device.index or 0)):
        return False
    size = q.element_size()
    return all(  # rows apart (no stride-0 or overlapping rows), contiguous, 16-byte aligned
        x.stride(1) == 1 and (x.stride(0) >= x.shape[1] or x.shape[0] == 1)
        and (x.stride(0) * size) % 16 == 0 and x.data_ptr() % 16 == 0
        for x in (q, k)
    )


@functools.cache
def _has_tma(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def descriptors(q: Tensor, k: Tensor, tile: Any, tma: bool) -> tuple[Any, Any]:
    """The kernels' `q_desc, k_desc`: TMA descriptors of q's `[block_m, block_d]` and k's
    `[block_n, block_d]` tiles when `tma`, else q and k themselves (never read)."""
    if not tma:
        return q, k
    return (TensorDescriptor.from_tensor(q, [tile.block_m, tile.block_d]),
            TensorDescriptor.from_tensor(k, [tile.block_n, tile.block_d]))


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """cuBLAS follows the fp32 precision asked for (TF32 only for "tf32"), through whichever of
    PyTorch's two settings is in use (mixing them raises); restored on exit."""
    matmul = torch.backends.cuda.matmul
    if configs.new_fp32_api() != "none":
        old, attr, new = matmul.fp32_precision, "fp32_precision", "tf32" if precision == "tf32" else "ieee"
    else:
        old, attr, new = matmul.allow_tf32, "allow_tf32", precision == "tf32"
    setattr(matmul, attr, new)
    try:
        yield
    finally:
        setattr(matmul, attr, old)


def addmm32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """`acc += a @ b` with `acc` fp32; on CUDA low-precision inputs go straight to the tensor
    cores with fp32 output, without a temporary."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return acc.addmm_(a.float(), b.float())
    return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)


def fp16_grad_scale(q: Tensor, *grads: Tensor) -> Tensor | None:
    """The largest incoming gradient for fp16 inputs (dS is stored as `dS / g_max`, away from
    fp16's underflow); None otherwise: bf16 and fp32 have fp32's range and need no scaling."""
    if q.dtype != torch.float16:
        return None
    g_max = torch.stack([g.abs().amax() for g in grads if g.numel()]).amax().float()
    return torch.where(g_max > 0, g_max, torch.ones_like(g_max))


def _total(sums: Tensor) -> Tensor:
    """The fp32 totals [n_sums] of the float64 partial sums [n_sums, blocks, programs], rounded
    once."""
    return sums.sum(dim=(1, 2)).float()


def part(x: Tensor, rows: slice) -> Tensor:
    """`x[rows]`, or x itself when the slice covers it (a view costs host time at small B)."""
    return x if rows.start == 0 and rows.stop >= x.shape[0] else x[rows]


LaunchDS = Callable[[slice, slice, Tensor, list[Tensor], tuple[int, int], int], None]


def ds_gemms(
    q: Tensor, k: Tensor, g_max: Tensor | None, tile: Any, n_sums: int, precision: str,
    launch: LaunchDS,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's block loop, shared by the softmax and sigmoid losses: for each block of
    at most `BWD_BLOCK x BWD_BLOCK` logits, `launch(rows, cols, ds, sums, grid, cols_per_part)`
    runs a dS kernel that writes the block's `scale * dS` (fp16: divided by `g_max`) into `ds`
    and per-program partial sums into the rows of `sums` [n_sums, programs] (float64); cuBLAS
    then takes `ds @ k` and `ds.T @ q`. Returns dq, dk (input dtypes) and the fp32 totals [n_sums] of the
    partial sums. q and k are not empty.

    A loss of one block (M, N <= BWD_BLOCK) without fp16 scaling gets its gradients straight
    from two GEMMs in the input dtype (cuBLAS accumulates in fp32 and rounds once). Larger ones
    add into an fp32 dq block per row block and an fp32 [N, D] dk accumulator; when that
    accumulator would pass `configs.ACC_BYTES_MAX`, a second sweep in column order recomputes
    dS instead and keeps one fp32 dk block at a time, with dS blocks half as wide (a third more
    backward work, and the gradients are then nearly all the memory the backward needs)."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    ds_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    blk_m = blk_n = configs.BWD_BLOCK
    one_block = m <= blk_m and n <= blk_n and g_max is None
    two_sweeps = not one_block and n * d * 4 > configs.ACC_BYTES_MAX
    if two_sweeps:  # the gradients are then most of the memory: a dS block of half the size
        blk_n = max(blk_n // 2, tile.block_n)
    row_blocks, col_blocks = range(0, m, blk_m), range(0, n, blk_n)
    n_parts, _ = configs.split(min(n, blk_n), tile.block_n, configs.BWD_PARTS)
    per_block = triton.cdiv(min(m, blk_m), tile.block_m) * n_parts
    # float64 partial sums: the fp32 kernels (PRECISE) accumulate them in float64; one block's
    # programs write every slot, smaller edge blocks leave some, which must be 0
    sums = (torch.empty if len(row_blocks) == len(col_blocks) == 1 else torch.zeros)(
        (n_sums, len(row_blocks) * len(col_blocks), per_block), dtype=torch.float64,
        device=q.device)
    ds_buf = torch.empty((min(m, blk_m), min(n, blk_n)), dtype=ds_dtype, device=q.device)

    def block(rows: slice, cols: slice, out: Tensor) -> Tensor:
        """dS of one block into ds_buf; the partial sums into `out` [n_sums, per_block]."""
        ds = ds_buf[: rows.stop - rows.start, : cols.stop - cols.start]
        parts, cols_per = configs.split(cols.stop - cols.start, tile.block_n, configs.BWD_PARTS)
        grid = (triton.cdiv(rows.stop - rows.start, tile.block_m), parts)
        launch(rows, cols, ds, list(out[:, : grid[0] * grid[1]]), grid, cols_per)
        return ds

    def span(start: int, size: int, blk: int) -> slice:
        return slice(start, min(start + blk, size))

    fp32 = matmul_precision(precision) if q.dtype == torch.float32 else contextlib.nullcontext()
    with fp32:
        if one_block:
            ds = block(slice(0, m), slice(0, n), sums[:, 0])
            return ds @ k, ds.T @ q, _total(sums)
        dq = torch.empty_like(q)
        dk32 = None if two_sweeps else torch.zeros(k.shape, **f32)
        # one fp32 block buffer per sweep, zeroed per block: `torch.zeros` per block would hold
        # the old block and the new one at once (a block's fp32 size more at the peak)
        acc32 = torch.empty((max(min(m, blk_m), min(n, blk_n)), d), **f32)
        for a_i, a in enumerate(row_blocks):
            rows = span(a, m, blk_m)
            dq32 = acc32[: rows.stop - a].zero_()
            for c_i, c in enumerate(col_blocks):
                cols = span(c, n, blk_n)
                ds = block(rows, cols, sums[:, a_i * len(col_blocks) + c_i])
                addmm32_(dq32, ds, k[cols])
                if dk32 is not None:
                    addmm32_(dk32[cols], ds.T, q[rows])
            dq[rows] = dq32 if g_max is None else dq32.mul_(g_max)
        if dk32 is not None:
            dk = dk32 if g_max is None else dk32.mul_(g_max)  # in place: [N, D] fp32 is large
            return dq, dk.to(k.dtype), _total(sums)
        dk = torch.empty_like(k)
        scratch = torch.empty_like(sums[:, 0])  # the sums were taken in the first sweep
        for c in col_blocks:
            cols = span(c, n, blk_n)
            dk32 = acc32[: cols.stop - c].zero_()
            for a in row_blocks:
                rows = span(a, m, blk_m)
                addmm32_(dk32, block(rows, cols, scratch).T, q[rows])
            dk[cols] = dk32 if g_max is None else dk32.mul_(g_max)
    return dq, dk, _total(sums)
