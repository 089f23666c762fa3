"""Fixed tile configurations, the one place they live. Autotuning is not used by default; the
values below won a sweep on an H100 at B=65536, D=512 (benchmarks/tune_tiles.py, NOTES.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton reads this once, when kernels are decorated; infcl follows the same switch."""


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


PRECISIONS = ("ieee", "tf32x3", "tf32")
"""How fp32 inputs are multiplied: IEEE fp32 products, three TF32 products per product (fp32's
accuracy on the tensor cores, but for the scale's gradient), or TF32 with inputs rounded to
nearest as cuBLAS does. bf16 and fp16 inputs always go to the tensor cores as they are."""

HIGHEST = "ieee"
"""What `torch.get_float32_matmul_precision() == "highest"` (PyTorch's default) selects: IEEE
products, within 2x of naive fp32's error in the loss and every gradient (on an H200, B = 130
to 8192, D 384-1030, scale 1-100: at most 1.41x). "tf32x3" is about 2x faster but misses 2x
on dscale (up to 18x naive's error there)."""


def new_fp32_api() -> str:
    """PyTorch's newer float32 setting for CUDA matmuls ("ieee" or "tf32"), or "none" while
    only the older one (`set_float32_matmul_precision`, `allow_tf32`) is in use. Once the newer
    one is set, reading the older one raises, so it is read first."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return matmul if matmul != "none" else getattr(torch.backends, "fp32_precision", "none")


def resolve_precision(precision: str) -> str:
    """`precision`, or for "default" the one PyTorch's float32 matmul setting asks for:
    "highest" (or "ieee") -> `HIGHEST`, "high" and "medium" (or "tf32") -> "tf32". Read when
    the op runs, so a compiled graph follows the setting of the moment."""
    if precision != "default":
        return precision
    new = new_fp32_api()
    if new != "none":
        return "tf32" if new == "tf32" else HIGHEST
    return HIGHEST if torch.get_float32_matmul_precision() == "highest" else "tf32"


def kernel_precision(dtype: torch.dtype, precision: str) -> str:
    """The kernels' PRECISION for inputs of `dtype`: resolved for fp32 (see `resolve_precision`),
    a fixed value for bf16 and fp16, which ignore it (no setting to read, no recompile)."""
    return resolve_precision(precision) if dtype == torch.float32 else "ieee"


def rounded_logits(dtype: torch.dtype) -> bool:
    """The kernels' ROUNDED: fp32 and fp16 logits rounded alone (`logits.scale_logits`), on a
    GPU only (the interpreter has no inline assembly, and never fuses). fp16 needs it too: a
    lone column's gradient is exactly 0, and an FMA-fused `S - lse` left about
    `eps32 * |S| * scale * |k|` there (H200, |S| = 481, scale 86: 0.0055, past fp16's test
    floor). bf16's floor is 8x looser and its main path stays unrounded."""
    return dtype in (torch.float32, torch.float16) and not INTERPRET


INTERPRET_TILE = Tile(16, 16, 16, 1, 1)
"""Small tiles under the interpreter keep CPU tests fast and make several tiles (and ragged
edges) appear even at small shapes."""


TMA_MIN_LOGITS = 1 << 26
"""bf16 and fp16 products of at least this many logits (8192 x 8192) load their tiles through
TMA descriptors (`logits.use_tma`), with the larger tiles below; smaller ones are host-bound
(and would give the backward's 128-row tiles fewer programs than the GPU has SMs) and keep
pointer loads. Tests lower it to run the TMA path at small shapes."""


def fwd_tile(dtype: torch.dtype, symmetric: bool = False, tma: bool = False) -> Tile:
    """Tile of the forward kernels. The symmetric bf16/fp16 forward (`lse_fwd._separable_kernel`)
    keeps a second register tile of column sums; a smaller tile with fewer warps is faster there
    (H200, B=65536, D=512, bf16, TMA, with the merge: 10.25 ms at 64 x 128 x 64, 4 warps, 4
    stages, against 10.54 with 3 stages, 10.36 at 128 x 128 x 64, 8 warps, and 18.1 at 128 x
    256)."""
    if INTERPRET:
        return INTERPRET_TILE
    if dtype == torch.float32:
        return Tile(128, 128, 32, 8, 3)
    if symmetric:
        return Tile(64, 128, 64, 4, 4)
    return Tile(128, 256, 64, 8, 3) if tma else Tile(128, 256, 32, 8, 4)


def bwd_tile(dtype: torch.dtype) -> Tile:
    """Tile of the backward logit-gradient kernel, with pointer or TMA loads (H200, B=65536,
    D=512, bf16, TMA, kernel and GEMMs: 26.90 ms against 31.39 ms at 128 x 128, 8 warps, which
    won a stripped dS loop in benchmarks/kernel_lab.py)."""
    if INTERPRET:
        return INTERPRET_TILE
    if dtype == torch.float32:  # the forward's tile: fp32 recomputes S exactly as it did
        return Tile(128, 128, 32, 8, 3)
    return Tile(64, 128, 64, 4, 3)


def sigmoid_tile(dtype: torch.dtype) -> Tile:
    """Tile of the sigmoid loss's logit-gradient kernel (fused with its loss for "mean" and
    "sum"). Its epilogue is longer than the softmax one's: at 64 x 128 with 4 warps ptxas spills
    1.9 KB per thread (H200, B = 65536, D = 512, bf16: 67.7 ms for the fused kernel and its
    GEMMs against 42.6 ms at 64 x 64 x 64, 4 warps; after the epilogue's rewrite 34.9 ms with
    4 stages, 35.9 with 3; a D chunk of 128 with 3 stages: 34.0 against 35.3 in one run;
    benchmarks/NOTES.md). The same with TMA loads: 31.13 ms against 32.09 at 128 x 128, 8
    warps)."""
    if INTERPRET:
        return INTERPRET_TILE
    if dtype == torch.float32:
        return bwd_tile(dtype)
    return Tile(64, 64, 128, 4, 3)


PARTS = 16
"""The forward splits rows and columns into at most this many partitions each (P x Q programs,
enough to keep two programs on every SM)."""

BWD_PARTS = 2
"""The backward's programs each take one row block and 1/BWD_PARTS of a block's columns."""


def split(size: int, block: int, most: int) -> tuple[int, int]:
    """(number of parts, elements per part, a multiple of `block`) for one axis."""
    blocks = -(-size // block)
    count = min(blocks, most)
    per = -(-blocks // count) * block
    return -(-size // per), per


BWD_BLOCK = 8192
"""Side of the square block of logit gradients the backward materialises before its two GEMMs
(at most BWD_BLOCK**2 elements: 128 MiB in bf16). Tests lower it to exercise the block loops."""

ACC_BYTES_MAX = 256 << 20
"""The largest fp32 [N, D] key-gradient accumulator the backward holds (N * D * 4 bytes; N =
131072 at D = 512). Past it, the backward sweeps the blocks a second time in column order,
recomputing dS, so that its memory is the gradients, one dS block and one fp32 block."""

