"""The spec: materialised logits and `F.cross_entropy`. O(M * N) memory; use it to check the others."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infcl._spec import SIGMOID_SPEC_DOC, contract, describe
from infcl._typing import Cols, Labels, Loss, Rows, Scale
from infcl.kernels.numerics import acc_dtype
from infcl.ops import NO_IGNORE, scale_tensor, targets


@contract
def naive_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    *,
    labels: Labels | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Loss:
    """Contrastive loss from the materialised `[M, N]` logit matrix (the reference)."""
    acc = acc_dtype(q)
    logits = (q.to(acc) @ k.to(acc).T) * scale_tensor(scale, q)
    diag = torch.arange(q.shape[0], device=q.device)
    if not symmetric:
        if labels is None:  # diagonal positives: ignore_index only ever applies to given labels
            return F.cross_entropy(logits, diag, reduction=reduction)
        y = targets(labels, k.shape[0], ignore_index)
        return F.cross_entropy(logits, y, reduction=reduction, ignore_index=ignore_index)
    per = 0.5 * (
        F.cross_entropy(logits, diag, reduction="none")
        + F.cross_entropy(logits.T, diag, reduction="none")
    )
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


describe(
    naive_loss,
    extra="""
    Memory: O(M * N) for the logits (and the same again for their gradient). This is the
    specification the other losses are tested against, not a path for large batches.
    """,
)


@contract
def naive_sigmoid_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    bias: Scale = 0.0,
    *,
    labels: Labels | None = None,
    reduction: str = "mean",
) -> Loss:
    """Sigmoid (SigLIP) loss from the materialised `[M, N]` logit matrix (the reference)."""
    acc = acc_dtype(q)
    logits = (q.to(acc) @ k.to(acc).T) * scale_tensor(scale, q) + scale_tensor(bias, q)
    if labels is None:
        y = torch.arange(q.shape[0], device=q.device)
    else:
        y = targets(labels, k.shape[0], NO_IGNORE)
    z = torch.full_like(logits, -1.0).scatter(1, y[:, None], 1.0)  # +1 at the positives
    per = -F.logsigmoid(z * logits).sum(1)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / per.shape[0]


describe(
    naive_sigmoid_loss,
    spec=SIGMOID_SPEC_DOC,
    extra="""
    Memory: O(M * N) for the logits (and the same again for their gradient): the
    specification the other sigmoid losses are tested against.
    """,
)
