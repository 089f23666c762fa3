"""Hypothesis strategies for the shared loss contract, reusable by the tests of every loss.

A `Problem` is a small, printable description (sizes, options, a generator seed); its tensors
are built from the seed, so a failing example shrinks to a few readable numbers and replays
exactly. Construct one directly to pin an edge case with `@example`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

ROWS = st.one_of(st.integers(1, 70), st.sampled_from([1, 2, 3, 61, 67]))
"""Batch sizes: any in 1..70, with 1 and primes drawn more often."""
DIMS = st.one_of(st.integers(1, 48), st.sampled_from([1, 3, 5, 7, 13, 33, 47]))
"""Embedding widths: any in 1..48, non-powers of two drawn more often."""
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
SCALES = st.one_of(st.floats(0.0, 100.0), st.sampled_from([1.0, 14.285714, 100.0]))
CHUNK_SIZES = st.one_of(
    st.none(), st.sampled_from([1, 2, 3, 7, 61, 67, 71, 1000]), st.integers(1, 80)
)
"""chunk_size / tile sizes: None (the default), 1, primes, sizes that do not divide the batch
and sizes larger than it."""


@dataclass(frozen=True)
class Problem:
    """One input to a loss: rows `m`, columns `n`, width `d`, the options, and a data seed."""

    m: int
    n: int
    d: int
    symmetric: bool = False
    labels: tuple[int, ...] | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    scale: float = 1.0
    scale_is_tensor: bool = False
    unit: bool = False
    seed: int = 0

    def inputs(self) -> tuple[Tensor, Tensor]:
        """q [m, d] and k [n, d] in float64, gaussian or unit rows, from `seed`."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.m, self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(self.n, self.d, generator=gen, dtype=torch.float64)
        if self.unit:
            q = q / q.norm(dim=1, keepdim=True)
            k = k / k.norm(dim=1, keepdim=True)
        return q, k

    def scale_for(self, dtype: torch.dtype) -> float | Tensor:
        """The scale as the caller would pass it: a float, or a 0-dim tensor in the accumulation
        dtype (float32 beside low-precision inputs, as `logit_scale.exp()` usually is)."""
        if not self.scale_is_tensor:
            return self.scale
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.tensor(self.scale, dtype=acc)

    def kwargs(self) -> dict[str, Any]:
        """The shared keyword arguments of every loss."""
        labels = None if self.labels is None else torch.tensor(self.labels, dtype=torch.long)
        return {
            "labels": labels,
            "symmetric": self.symmetric,
            "reduction": self.reduction,
            "ignore_index": self.ignore_index,
        }


@st.composite
def problems(draw: st.DrawFn, rows: st.SearchStrategy[int] = ROWS) -> Problem:
    """Any valid input of the shared contract.

    Symmetric problems have M == N and no labels; otherwise labels are present (any N) or absent
    (M == N). About a quarter of the labels equal `ignore_index`, which is -100 or sometimes 7,
    a real column index that the ignore rule must win over (and must not touch without labels).
    All rows may be ignored: then the mean is NaN (0 / 0, as in F.cross_entropy) and the
    gradients are 0.
    """
    m = draw(rows)
    d = draw(DIMS)
    symmetric = draw(st.booleans())
    with_labels = not symmetric and draw(st.booleans())
    n = draw(rows) if with_labels else m
    reduction = draw(REDUCTIONS)
    # 7 is a real column index whenever n > 7: with labels, the ignore rule must win over it;
    # without labels it must change nothing (the diagonal ignores no row).
    ignore_index = draw(st.sampled_from([-100, -100, 7]))
    labels = None
    if with_labels:
        column = st.integers(0, n - 1)
        entry = st.one_of(column, column, column, st.just(ignore_index))
        labels = tuple(draw(st.lists(entry, min_size=m, max_size=m)))
    return Problem(
        m=m,
        n=n,
        d=d,
        symmetric=symmetric,
        labels=labels,
        ignore_index=ignore_index,
        reduction=reduction,
        scale=draw(SCALES),
        scale_is_tensor=draw(st.booleans()),
        unit=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
