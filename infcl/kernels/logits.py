"""cuBLAS helpers of the backward: fp32 accumulation of low-precision products, fp32 precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """cuBLAS follows the fp32 precision asked for (TF32 unless "ieee"); restored on exit."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def addmm32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """`acc += a @ b` with `acc` fp32; on CUDA low-precision inputs go straight to the tensor
    cores with fp32 output, without a temporary."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return acc.addmm_(a.float(), b.float())
    return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
