"""The contract every loss shares: its docstring, its argument checks and the loss assembly.

Each loss computes three per-row / per-column pieces (row log-sum-exp, column log-sum-exp and the
positive logit) however it likes; `assemble` turns them into the loss the same way for all of them.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

SPEC_DOC = """
    Computes the contrastive (InfoNCE / CLIP) loss on `S = scale * q @ k.T` with float32
    accumulation (float64 for float64 inputs). For row i with positive column `y_i`
    (`labels[i]`, or `i` when labels is None) the q->k loss is

        l_i = logsumexp_j S[i, j] - S[i, y_i]

    and the result equals, in exact arithmetic,
    `F.cross_entropy(scale * q.double() @ k.double().T, labels, reduction=reduction,
    ignore_index=ignore_index)`. With `symmetric=True` it is the CLIP loss
    `(mean_i l_i(q->k) + mean_j l_j(k->q)) / 2` with diagonal positives, and
    `reduction="none"` returns the per-pair average `(l_i(q->k) + l_i(k->q)) / 2`.

    Args:
        q: `[M, D]` rows (e.g. image embeddings); float16, bfloat16, float32 or float64.
            The loss does not normalise them.
        k: `[N, D]` columns (e.g. text embeddings), same dtype and device as `q`.
        scale: Python number or 0-dim tensor (e.g. `logit_scale.exp()`); it may require grad,
            and its gradient is returned.
        labels: int tensor `[M]` of column indices, or None for the diagonal (then M == N).
            Rows whose label equals `ignore_index` contribute nothing and leave the mean's count
            (with labels None no row is ignored).
        symmetric: the two-directional CLIP loss; needs M == N and `labels=None`.
        reduction: `"mean"` (default), `"sum"` or `"none"` (a vector of per-row losses).
        ignore_index: the label value that marks a row to skip.

    Returns:
        The loss in float32 (float64 for float64 inputs), whatever the input dtype; gradients
        come back in the input dtype.

    Raises:
        TypeError: for an argument of the wrong type or dtype.
        ValueError: for shapes that do not fit, unknown options, labels out of range (checked
            outside `torch.compile`) or an empty batch.
"""

F = TypeVar("F", bound=Callable[..., Any])


def describe(fn: F, *, extra: str) -> F:
    """Attach the shared spec plus this loss's own memory bound and arguments to its docstring."""
    summary = (fn.__doc__ or "").strip()
    # Indent `extra` like SPEC_DOC so that `inspect.cleandoc` (help(), mkdocstrings) dedents both.
    fn.__doc__ = f"{summary}\n{SPEC_DOC}\n{textwrap.indent(inspect.cleandoc(extra), '    ')}\n"
    return fn


def _tensor_desc(x: Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def validate(
    q: Any,
    k: Any,
    scale: Any,
    labels: Any,
    symmetric: Any,
    reduction: Any,
    ignore_index: Any,
    *,
    allow_empty: bool = False,
    check_label_range: bool = True,
    shard: bool = False,
) -> None:
    """Raise a clear TypeError/ValueError for every input the contract rejects.

    `shard=True` checks one rank's shard of a distributed call: empty shards are allowed, and the
    rules that concern the global batch (diagonal shapes, label range) are left to the ring,
    which checks them on every rank at once.
    """
    if shard:
        allow_empty, check_label_range = True, False
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got {_tensor_desc(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {_tensor_desc(x)}"
            )
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype: q {_tensor_desc(q)}; k {_tensor_desc(k)}")
    if q.device != k.device:
        raise ValueError(f"q and k must share a device: q {_tensor_desc(q)}; k {_tensor_desc(k)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must share D: q {_tensor_desc(q)}; k {_tensor_desc(k)}")
    if not allow_empty and (q.shape[0] == 0 or k.shape[0] == 0):
        raise ValueError(f"empty batch: q {_tensor_desc(q)}; k {_tensor_desc(k)}")
    if q.shape[1] == 0:
        raise ValueError(f"D must be at least 1: q {_tensor_desc(q)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        raise TypeError(f"scale must be a Python number or a 0-dim tensor, got {type(scale).__name__}")
    if isinstance(scale, Tensor):
        if scale.ndim != 0:
            raise ValueError(f"scale must be a 0-dim tensor, got {_tensor_desc(scale)}")
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scale must be a floating tensor, got {_tensor_desc(scale)}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    m, n = q.shape[0], k.shape[0]
    if labels is None:
        if m != n and not shard:
            raise ValueError(
                f"without labels the positives are the diagonal, so q and k need as many rows: "
                f"q {_tensor_desc(q)}; k {_tensor_desc(k)}"
            )
        return
    if symmetric:
        raise ValueError("symmetric=True uses the diagonal as positives; pass labels=None")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be an integer tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {_tensor_desc(labels)}")
    if labels.shape != (m,):
        raise ValueError(f"labels must have shape ({m},) to match q, got {_tensor_desc(labels)}")
    if labels.device != q.device:
        raise ValueError(f"labels must be on q's device {q.device}, got {_tensor_desc(labels)}")
    if check_label_range and m > 0 and not torch.compiler.is_compiling():
        bad = ((labels < 0) | (labels >= n)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad][:5].tolist()
            raise ValueError(
                f"labels must lie in [0, {n}) or equal ignore_index={ignore_index}; got {first}"
            )


def checked(fn: F) -> F:
    """Validate the shared arguments (skipped while compiling), then run `fn`."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            validate(
                a["q"], a["k"], a["scale"], a["labels"], a["symmetric"], a["reduction"],
                a["ignore_index"], shard="group" in a and group_size(a["group"]) > 1,
            )
            if "chunk_size" in a:
                cs = a["chunk_size"]
                if cs is not None and (isinstance(cs, bool) or not isinstance(cs, int) or cs < 1):
                    raise ValueError(f"chunk_size must be None or an int >= 1, got {cs!r}")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def group_size(group: Any) -> int:
    """Ranks in `group` (None: the default group, or 1 when no process group is initialised)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


LSE_DTYPE = torch.float64
"""Every op returns its log-sum-exp statistics in float64, whatever the input dtype: `max + log(sum)`
formed from the fp32 pieces without rounding, so the backward's `exp(S - lse)` and the loss's
`lse - S[i, y_i]` lose no digits to the size of the logits (naive's `S - max` is exact too).
The cost is O(M + N) doubles."""


def split_lse(lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`lse` as `hi + lo` in `dtype`: `(S - hi) - lo` is then accurate where `S - lse` matters."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


def acc_dtype(x: Tensor) -> torch.dtype:
    """Logits and statistics are float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scale_tensor(scale: float | Tensor, like: Tensor) -> Tensor:
    """The scale as a 0-dim tensor on `like`'s device (differentiable when it is a tensor)."""
    if isinstance(scale, Tensor):
        return scale.to(like.device)
    return torch.tensor(float(scale), dtype=acc_dtype(like), device=like.device)


def target_columns(labels: Tensor | None, m: int, device: torch.device) -> Tensor:
    """Positive column of every row: the labels, or the diagonal."""
    if labels is None:
        return torch.arange(m, device=device)
    return labels.long()


def assemble(
    row_lse: Tensor,
    col_lse: Tensor,
    pos: Tensor,
    valid: Tensor | None,
    symmetric: bool,
    reduction: str,
) -> Tensor:
    """Turn the pieces into the loss; autograd carries the gradients back to the pieces.

    `valid` marks the rows that count (None: all). `col_lse` is used only when symmetric. The
    LSEs are float64 (`LSE_DTYPE`); the loss comes out in the dtype of `pos`.
    """
    if symmetric:
        per = (0.5 * ((row_lse - pos) + (col_lse - pos))).to(pos.dtype)
    else:
        per = (row_lse - pos).to(pos.dtype)
        if valid is not None:
            per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    if valid is None or symmetric:
        return total / per.shape[0]
    return total / valid.sum()
