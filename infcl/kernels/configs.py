"""Fixed tile configurations, the one place they live. Autotuning is not used by default."""

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


def tile_for(dtype: torch.dtype) -> Tile:
    """The tile for one logits kernel. Small tiles under the interpreter keep CPU tests fast and
    make several tiles (and ragged edges) appear even at small shapes."""
    if INTERPRET:
        return Tile(16, 16, 16, 1, 1)
    if dtype == torch.float32:
        return Tile(128, 64, 32, 8, 3)
    return Tile(128, 128, 64, 8, 3)


BWD_BLOCK = 8192
"""Side of the square block of probabilities the backward materialises before its two GEMMs
(at most BWD_BLOCK**2 elements: 128 MiB in bf16). Tests lower it to exercise the block loops."""
