"""Numerics every stage shares (plain torch, importable without Triton): the accumulation dtype
and the log-sum-exp statistics' dtype and split."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The input dtypes every loss accepts."""

LSE_DTYPE = torch.float64
"""Every op returns its log-sum-exp statistics in float64, whatever the input dtype: `max + log(sum)`
formed from the fp32 pieces without rounding, so the backward's `exp(S - lse)` and the loss's
`lse - S[i, y_i]` lose no digits to the size of the logits (naive's `S - max` is exact too).
The cost is O(M + N) doubles."""


def acc_dtype(x: Tensor) -> torch.dtype:
    """Logits and statistics are float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_lse(lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`lse` as `hi + lo` in `dtype`: `(S - hi) - lo` is then accurate where `S - lse` matters."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


def autocast_off(fn: F) -> F:
    """For the bodies of the block ops: autocast stays active inside a custom op and would
    re-cast the products they compute in the dtypes they chose (fp32 logits of bf16 inputs)."""

    @functools.wraps(fn)
    def wrapper(q: Tensor, *args: Any) -> Any:
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args)

    return wrapper  # type: ignore[return-value]
