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


CHECKED_SIGNATURES_MAX = 4096
"""How many distinct call signatures `typechecked` remembers as checked (a bound, not a cache
that grows with every batch size: shapes are not part of a signature)."""


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What the annotations can tell calls apart by: each argument's type, and a tensor's dtype,
    rank and device type. Shapes are left out: the annotations relate them (q and k share D,
    labels has q's rows), and the contract checks those relations on every call first."""

    def one(x: object) -> object:
        if isinstance(x, Tensor):
            return (type(x), x.dtype, x.ndim, x.device.type)
        return type(x)

    return (tuple(one(a) for a in args), tuple((key, one(v)) for key, v in kwargs.items()))


def typechecked(fn: F) -> F:
    """Check jaxtyping annotations with beartype in eager mode; trace the bare function under compile.

    Runtime checking calls Python machinery that dynamo cannot trace, so it would break a
    `torch.compile(fullgraph=True)` graph; while compiling, the undecorated function runs.
    Each distinct call signature (see `_signature`) is checked once, on its first call: the
    check costs hundreds of microseconds, more than the loss itself at small batches.
    """
    checked = jaxtyped(typechecker=beartype)(fn)
    passed: set[tuple] = set()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        key = _signature(args, kwargs)
        if key in passed:
            return fn(*args, **kwargs)
        try:
            out = checked(*args, **kwargs)
        except BeartypeCallHintViolation as e:  # a plain TypeError is what callers catch
            raise TypeError(str(e)) from None
        if len(passed) < CHECKED_SIGNATURES_MAX:
            passed.add(key)
        return out

    return wrapper  # type: ignore[return-value]
