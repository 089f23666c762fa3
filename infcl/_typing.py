"""The annotations of the public signatures (jaxtyping), checked at run time in eager mode."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar, Union

import torch
from beartype import beartype
from beartype.roar import BeartypeCallHintViolation
from jaxtyping import Float, Integer, jaxtyped
from torch import Tensor

__all__ = ["Rows", "Cols", "Labels", "Scale", "Loss", "typechecked"]

Rows = Float[Tensor, "m d"]
"""`q`: a floating tensor `[M, D]`, one row per query (e.g. image embeddings)."""
Cols = Float[Tensor, "n d"]
"""`k`: a floating tensor `[N, D]` (e.g. text embeddings), the same D, dtype and device as q."""
Labels = Integer[Tensor, " m"]
"""`labels`: an integer tensor `[M]`, each row's positive column."""
Scale = Union[float, int, Float[Tensor, ""]]
"""`scale` (and the sigmoid loss's `bias`): a Python number or a 0-dim floating tensor."""
Loss = Float[Tensor, "..."]
"""The result: a 0-dim tensor, or `[M]` with `reduction="none"`."""

F = TypeVar("F", bound=Callable)


def typechecked(fn: F) -> F:
    """Check jaxtyping annotations with beartype in eager mode; trace the bare function under compile.

    Runtime checking calls Python machinery that dynamo cannot trace, so it would break a
    `torch.compile(fullgraph=True)` graph; while compiling, the undecorated function runs.
    """
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        try:
            return checked(*args, **kwargs)
        except BeartypeCallHintViolation as e:  # a plain TypeError is what callers catch
            raise TypeError(str(e)) from None

    return wrapper  # type: ignore[return-value]
