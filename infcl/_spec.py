"""The contract every loss shares: its docstring and its argument checks, eager and compiled.

`contract` wraps each public loss. It looks for the first argument the contract rejects and
raises its TypeError / ValueError. The checks read only static facts (types, shapes, dtypes,
options), so under `torch.compile` they run while Dynamo traces; a rejected call then compiles
to one `infcl::reject` op that raises the very same error when the graph runs (Dynamo cannot
raise from a `fullgraph=True` trace). Across ranks a rejected call first tells every peer why,
so no rank waits in a collective for one that has already failed.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from infcl._typing import typechecked
from infcl.dist.ring import group_size, share_status
from infcl.kernels.configs import PRECISIONS
from infcl.kernels.numerics import FLOAT_DTYPES

REDUCTIONS = ("mean", "sum", "none")

SPEC_PROSE = """
    Computes the contrastive (InfoNCE / CLIP) loss on `S = scale * q @ k.T` with float32
    accumulation (float64 for float64 inputs). For row i with positive column `y_i`
    (`labels[i]`, or `i` when labels is None) the q->k loss is

        l_i = logsumexp_j S[i, j] - S[i, y_i]

    and the result equals, in exact arithmetic,
    `F.cross_entropy(scale * q.double() @ k.double().T, labels, reduction=reduction,
    ignore_index=ignore_index)`. With `symmetric=True` it is the CLIP loss
    `(mean_i l_i(q->k) + mean_j l_j(k->q)) / 2` with diagonal positives, and
    `reduction="none"` returns the per-pair average `(l_i(q->k) + l_i(k->q)) / 2`.
"""
"""The function every softmax loss computes (the prose of `SPEC_DOC`, written once on the API
page of the docs site)."""

SPEC_DOC = SPEC_PROSE + """
    Args:
        q: `[M, D]` rows (e.g. image embeddings); float16, bfloat16, float32 or float64.
            The loss does not normalise them.
        k: `[N, D]` columns (e.g. text embeddings), same dtype and device as `q`.
        scale: Python number or 0-dim floating tensor (e.g. `logit_scale.exp()`); it may
            require grad, and its gradient is returned.
        labels: tensor `[M]` of any integer dtype holding column indices, or None for the
            diagonal (then M == N). Rows whose label equals `ignore_index` contribute nothing
            and leave the mean's count (with labels None no row is ignored).
        symmetric: the two-directional CLIP loss; needs M == N and `labels=None`.
        reduction: `"mean"` (default), `"sum"` or `"none"` (a vector of per-row losses).
        ignore_index: the label value that marks a row to skip.

    Returns:
        The loss in float32 (float64 for float64 inputs), whatever the input dtype; gradients
        come back in the input dtype.

    Raises:
        TypeError: for an argument of the wrong type or dtype.
        ValueError: for shapes that do not fit, unknown options, an empty batch, or labels
            outside `[0, N)` that are not `ignore_index`. The same errors, with the same
            messages, come from a `torch.compile`d call (raised when the compiled code runs;
            the label range is checked on the labels' values, which costs one device sync
            when labels are given).
"""

SIGMOID_SPEC_PROSE = """
    Computes the sigmoid (SigLIP) loss on `S = scale * q @ k.T + bias` with float32
    accumulation (float64 for float64 inputs). Row i's positive is column `y_i` (`labels[i]`,
    or `i` when labels is None); every other pair is a negative. With `z_ij = +1` at the
    positive and `-1` elsewhere, the row loss is

        l_i = -sum_j log sigmoid(z_ij * S[i, j])

    computed without overflow for logits of any size. `reduction="mean"` returns
    `sum_i l_i / M` (divided by the number of rows, as open_clip's `SigLipLoss` is), `"sum"`
    the sum and `"none"` the vector `[M]`. In exact arithmetic it equals
    `-F.logsigmoid(z * (scale * q.double() @ k.double().T + bias)).sum(1)` reduced.
"""
"""The function every sigmoid loss computes (the prose of `SIGMOID_SPEC_DOC`)."""

SIGMOID_SPEC_DOC = SIGMOID_SPEC_PROSE + """
    Args:
        q: `[M, D]` rows (e.g. image embeddings); float16, bfloat16, float32 or float64.
        k: `[N, D]` columns (e.g. text embeddings), same dtype and device as `q`.
        scale: Python number or 0-dim floating tensor (e.g. `logit_scale.exp()`); it may
            require grad, and its gradient is returned.
        bias: Python number or 0-dim floating tensor (e.g. `logit_bias`); it may require grad,
            and its gradient is returned.
        labels: tensor `[M]` of any integer dtype holding each row's positive column in
            `[0, N)`, or None for the diagonal (then M == N).
        reduction: `"mean"` (default), `"sum"` or `"none"`.

    Returns:
        The loss in float32 (float64 for float64 inputs); gradients come back in the input
        dtype.

    Raises:
        TypeError: for an argument of the wrong type or dtype.
        ValueError: for shapes that do not fit, unknown options, an empty batch, or labels
            outside `[0, N)`; from a `torch.compile`d call too, as for the softmax losses.
"""

F = TypeVar("F", bound=Callable[..., Any])


def describe(fn: F, *, extra: str, spec: str = SPEC_DOC) -> F:
    """Attach the shared spec (`SPEC_DOC`, or `SIGMOID_SPEC_DOC`) plus this loss's own memory
    bound and arguments to its docstring."""
    summary = (fn.__doc__ or "").strip()
    # Indent `extra` like the spec so that `inspect.cleandoc` (help(), mkdocstrings) dedents both.
    fn.__doc__ = f"{summary}\n{spec}\n{textwrap.indent(inspect.cleandoc(extra), '    ')}\n"
    return fn


Part = str | int | tuple[int, ...]


@dataclass(frozen=True)
class Problem:
    """A rejected argument: the error type and the message, kept as parts (text, ints, shapes).

    Dynamo can carry strings and integers into an op but cannot turn an integer into text, so
    the message is joined only when the error is raised, in eager code.
    """

    kind: str  # "TypeError" or "ValueError": a name, which Dynamo carries into an op as a constant
    parts: tuple[Part, ...]

    def raise_(self, group_name: str = "") -> Tensor:
        """Raise the error (after telling the group's peers, if any); under compile, return the
        op that raises it when the compiled graph runs."""
        texts, nums, layout = _flatten(self.parts)
        if torch.compiler.is_compiling():
            return torch.ops.infcl.reject(self.kind, texts, nums, layout, group_name)
        _raise(self.kind, texts, nums, layout, group_name)


_SEP = "\x1f"  # ASCII unit separator: op schemas take one str, not a list of them


def _flatten(parts: tuple[Part, ...]) -> tuple[str, list[int], list[int]]:
    """Parts as op arguments: the texts joined by `_SEP`, all integers in order, and per part
    -1 (text), -2 (an int) or the length of a shape."""
    texts, nums, layout = [], [], []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            layout.append(-1)
        elif isinstance(part, tuple):
            nums.extend(part)
            layout.append(len(part))
        else:
            nums.append(part)
            layout.append(-2)
    return _SEP.join(texts), nums, layout


def _join(texts: str, nums: list[int], layout: list[int]) -> str:
    out, t, n = [], iter(texts.split(_SEP)), 0
    for width in layout:
        if width == -1:
            out.append(next(t))
        elif width == -2:
            out.append(str(nums[n]))
            n += 1
        else:
            out.append(str(tuple(nums[n : n + width])))
            n += width
    return "".join(out)


_KINDS = {"TypeError": TypeError, "ValueError": ValueError}


def _raise(kind: str, texts: str, nums: list[int], layout: list[int], group_name: str) -> NoReturn:
    """Raise `kind(message)`; across a group (`group_name` not empty) every rank learns of it."""
    message = _join(texts, nums, layout)
    if group_name:
        share_status(group_name, message)
    raise _KINDS[kind](message)


@torch.library.custom_op("infcl::reject", mutates_args=())
def reject(kind: str, texts: str, nums: list[int], layout: list[int], group_name: str) -> Tensor:
    """The compiled form of a rejected call: raises when the graph runs (see `Problem`)."""
    _raise(kind, texts, nums, layout, group_name)


@reject.register_fake
def reject_fake(kind, texts, nums, layout, group_name):
    return torch.empty((), dtype=torch.float32)


def _desc(x: Tensor) -> tuple[Part, ...]:
    return ("shape ", tuple(x.shape), ", dtype " + str(x.dtype) + ", device " + str(x.device))


def _type_name(x: Any) -> str:
    return type(x).__name__


def _show(x: Any) -> Part:
    """A value in a message: strings quoted, ints as numbers, anything else by its type."""
    if isinstance(x, str):
        return "'" + x + "'"
    if isinstance(x, bool) or x is None:
        return "True" if x is True else "False" if x is False else "None"
    if isinstance(x, int):
        return x
    return "a " + _type_name(x)


def find_problem(
    q: Any,
    k: Any,
    scale: Any = 1.0,
    bias: Any = 0.0,
    *,
    labels: Any = None,
    symmetric: Any = False,
    reduction: Any = "mean",
    ignore_index: Any = -100,
    chunk_size: Any = None,
    group: Any = None,
    precision: Any = None,
) -> Problem | None:
    """The first argument of a loss call that the contract rejects, or None.

    With a group of more than one rank, `q`, `k` and `labels` are this rank's shard: empty
    shards are allowed, and the rules about the global batch (diagonal shapes, label range) are
    left to the ring, which checks them on every rank at once.
    """
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        return Problem("TypeError", ("group must be None or a torch.distributed.ProcessGroup, got ",
                                   _show(group)))
    shard = group_size(group) > 1
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            return Problem("TypeError", (name + " must be a torch.Tensor, got " + _type_name(x),))
        if x.ndim != 2:
            return Problem("ValueError", (name + " must be 2-D [rows, D], got ", *_desc(x)))
        if x.dtype not in FLOAT_DTYPES:
            return Problem(
                "TypeError", (name + " must be float16, bfloat16, float32 or float64, got ", *_desc(x))
            )
    if q.dtype != k.dtype:
        return Problem("TypeError", ("q and k must share a dtype: q ", *_desc(q), "; k ", *_desc(k)))
    if q.device != k.device:
        return Problem("ValueError", ("q and k must share a device: q ", *_desc(q), "; k ", *_desc(k)))
    if q.shape[1] != k.shape[1]:
        return Problem("ValueError", ("q and k must share D: q ", *_desc(q), "; k ", *_desc(k)))
    if not shard and (q.shape[0] == 0 or k.shape[0] == 0):
        return Problem("ValueError", ("empty batch: q ", *_desc(q), "; k ", *_desc(k)))
    if q.shape[1] == 0:
        return Problem("ValueError", ("D must be at least 1: q ", *_desc(q)))
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        return Problem(
            "TypeError", ("scale must be a Python number or a 0-dim tensor, got " + _type_name(scale),)
        )
    if isinstance(scale, Tensor):
        if scale.ndim != 0:
            return Problem("ValueError", ("scale must be a 0-dim tensor, got ", *_desc(scale)))
        if not scale.dtype.is_floating_point:
            return Problem("TypeError", ("scale must be a floating tensor, got ", *_desc(scale)))
    if isinstance(bias, bool) or not isinstance(bias, (int, float, Tensor)):
        return Problem(
            "TypeError", ("bias must be a Python number or a 0-dim tensor, got " + _type_name(bias),)
        )
    if isinstance(bias, Tensor):
        if bias.ndim != 0:
            return Problem("ValueError", ("bias must be a 0-dim tensor, got ", *_desc(bias)))
        if not bias.dtype.is_floating_point:
            return Problem("TypeError", ("bias must be a floating tensor, got ", *_desc(bias)))
    if not isinstance(symmetric, bool):
        return Problem("TypeError", ("symmetric must be a bool, got " + _type_name(symmetric),))
    if not isinstance(reduction, str):
        return Problem("TypeError", ("reduction must be a str, got " + _type_name(reduction),))
    if reduction not in REDUCTIONS:
        return Problem(
            "ValueError", ("reduction must be one of 'mean', 'sum', 'none', got ", _show(reduction))
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        return Problem("TypeError", ("ignore_index must be an int, got " + _type_name(ignore_index),))
    if not -(1 << 63) <= ignore_index < (1 << 63):
        return Problem("ValueError", ("ignore_index must fit in int64",))
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            return Problem(
                "TypeError", ("chunk_size must be None or an int, got ", _show(chunk_size))
            )
        if chunk_size < 1:
            return Problem("ValueError", ("chunk_size must be at least 1, got ", chunk_size))
    if precision is not None and not isinstance(precision, str):
        return Problem("TypeError", ("precision must be None or a str, got " + _type_name(precision),))
    if precision is not None and precision not in PRECISIONS:
        return Problem(
            "ValueError", ("precision must be None, 'ieee', 'tf32x3' or 'tf32', got ", _show(precision))
        )
    m, n = q.shape[0], k.shape[0]
    if labels is None:
        if m != n and not shard:
            return Problem("ValueError", (
                "without labels the positives are the diagonal, so q and k need as many rows: q ",
                *_desc(q), "; k ", *_desc(k),
            ))
        return None
    if symmetric:
        return Problem("ValueError", ("symmetric=True uses the diagonal as positives; pass labels=None",))
    if not isinstance(labels, Tensor):
        return Problem(
            "TypeError", ("labels must be an integer tensor or None, got " + _type_name(labels),)
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return Problem("TypeError", ("labels must be an integer tensor, got ", *_desc(labels)))
    if labels.ndim != 1 or labels.shape[0] != m:
        return Problem("ValueError", (
            "labels must have shape ", (m,), " to match q, got ", *_desc(labels),
        ))
    if labels.device != q.device:
        return Problem("ValueError", (
            "labels must be on q's device " + str(q.device) + ", got ", *_desc(labels),
        ))
    return None


def _call_problem(
    name: str, params: Any, n_positional: int, args: tuple, kwargs: dict
) -> Problem | None:
    """Python's own TypeError for a call `fn` cannot take, before any check reads its arguments
    (find_problem takes the union of every loss's arguments)."""
    if len(args) > n_positional:
        return Problem("TypeError", (
            name + "() takes at most ", n_positional, " positional arguments but ", len(args),
            " were given",
        ))
    for key in kwargs:
        if key not in params:
            return Problem("TypeError", (name + "() got an unexpected keyword argument '" + key + "'",))
    return None


def contract(fn: F) -> F:
    """The public loss `fn`: the contract's checks first, then beartype (eager only), then `fn`."""
    typed = typechecked(fn)
    params = inspect.signature(fn).parameters
    n_positional = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        problem = _call_problem(fn.__name__, params, n_positional, args, kwargs)
        problem = problem or find_problem(*args, **kwargs)
        if problem is not None:
            group = kwargs.get("group")
            shared = isinstance(group, dist.ProcessGroup) and group_size(group) > 1
            return problem.raise_(group.group_name if shared else "")
        return typed(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
