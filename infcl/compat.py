"""Drop-in replacements for open_clip's `ClipLoss` and inf_cl's `cal_*_loss`, on infcl's losses.

Each keeps the caller's arguments and the original's value; what differs is said where it
differs. `docs/migrating.md` is the user-facing version of these notes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from infcl.inf import inf_loss, inf_sigmoid_loss
from infcl.ops import NO_IGNORE, targets
from infcl.ring import ring_loss

__all__ = ["ClipLoss", "SigLipLoss", "cal_inf_loss", "cal_ring_loss", "cal_flash_loss"]


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _default_group() -> dist.ProcessGroup | None:
    """The default process group when it has more than one rank (inf_cl's ring), else None."""
    return dist.group.WORLD if _process_group()[0] > 1 else None


def _check_world(name: str, world_size: int, rank_arg: int) -> int:
    """open_clip's `world_size` and `rank` against the default process group: 1 for this
    process alone (world_size=1), the group's size when they match, else ValueError."""
    if world_size == 1:
        return 1
    world, rank = _process_group()
    if (world_size, rank_arg) != (world, rank):
        found = (
            f"a default process group of {world} ranks in which this is rank {rank}"
            if dist.is_available() and dist.is_initialized()
            else "no initialised process group (world_size 1, rank 0)"
        )
        raise ValueError(
            f"{name} was built with world_size={world_size}, rank={rank_arg}, but "
            f"there is {found}. With world_size > 1 infcl computes across the default "
            "process group; pass its world size and rank (or world_size=1 for this "
            "process alone)."
        )
    return world


class ClipLoss(nn.Module):
    """open_clip's `ClipLoss` with the same arguments and value, computed by `infcl.inf_loss`.

    `forward` returns `(CE(S, y) + CE(S.T, y)) / 2` for `S = logit_scale * image_features @
    text_features.T` and diagonal positives `y`, as open_clip does, without materialising `S`:
    Triton tiles on CUDA, torch tiles on CPU. `logit_scale` is the multiplier itself, already
    exponentiated (open_clip's models return `self.logit_scale.exp()`).

    With `world_size=1` (open_clip's default) it computes this process's batch alone, even when
    a process group is initialised. With `world_size > 1` the key shards of the default process
    group's ranks travel around a ring. The value and gradients on every rank are those of open_clip's
    `ClipLoss(local_loss=True, gather_with_grad=True)`: the loss of this rank's rows against
    the global batch, and feature gradients of the sum of all ranks' losses, so that DDP's
    averaging yields the gradient of the global loss. The scale's gradient is this rank's share
    of the total, with no all-reduce of its own; the shares are split otherwise than open_clip's
    per-rank gradients but have the same mean over ranks, which is what DDP applies.

    Args:
        local_loss: across ranks, False returns the loss of the global batch on every rank (as
            open_clip does); the gradients are the same as with True, which equal open_clip's
            for the features, and for the scale after DDP's averaging. True returns this
            rank's loss. No effect in one process.
        gather_with_grad: must be True across ranks: infcl always back-propagates through every
            rank's features. open_clip's False drops that part of the gradient, which infcl does
            not reproduce, so it is rejected rather than silently changed.
        cache_labels: accepted and ignored (no label tensor is built).
        rank, world_size: as in open_clip. With `world_size > 1` they must match the default
            process group, else `forward` raises ValueError.
        use_horovod: not supported (True raises ValueError); use torch.distributed.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError(
                "infcl.compat.ClipLoss does not support Horovod: its ring runs on "
                "torch.distributed process groups (NCCL, gloo). Pass use_horovod=False."
            )
        if world_size > 1 and not gather_with_grad:
            raise ValueError(
                "infcl.compat.ClipLoss always back-propagates through the features of every "
                "rank, which is open_clip's gather_with_grad=True (--gather-with-grad); its "
                "gather_with_grad=False drops that gradient. Pass gather_with_grad=True."
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self._warned_bias = False

    def _check_group(self) -> int:
        return _check_world(type(self).__name__, self.world_size, self.rank)

    def _bias_term(self, logit_bias: float | Tensor) -> float | Tensor:
        """Zero (NaN for a NaN bias), in the graph of `logit_bias` so that DDP sees it used (its
        gradient is 0)."""
        if isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float, Tensor)):
            raise TypeError(
                f"logit_bias must be None, a number or a one-element tensor, got "
                f"{type(logit_bias).__name__}"
            )
        if isinstance(logit_bias, Tensor) and (
            logit_bias.numel() != 1 or not logit_bias.dtype.is_floating_point
        ):
            raise ValueError(
                f"logit_bias must be a floating scalar (one element), got shape "
                f"{tuple(logit_bias.shape)}, dtype {logit_bias.dtype}"
            )
        if not self._warned_bias and not torch.compiler.is_compiling():
            warnings.warn(
                "ClipLoss: a scalar logit_bias shifts every logit of a row equally, so it "
                "cancels in the softmax: the loss is the same without it and its gradient is 0. "
                "It is accepted for open_clip compatibility and otherwise ignored.",
                UserWarning,
                stacklevel=3,
            )
            self._warned_bias = True
        if isinstance(logit_bias, Tensor):
            return (logit_bias.sum() * 0.0).float()  # the loss keeps its dtype, as open_clip's
        return 0.0 if math.isfinite(logit_bias) else math.nan  # inf - inf: NaN, as open_clip

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        world = self._check_group()
        logit_scale = _scalar(logit_scale)
        loss = inf_loss(
            image_features, text_features, logit_scale, symmetric=True,
            group=dist.group.WORLD if world > 1 else None,
        )
        if logit_bias is not None:
            loss = loss + self._bias_term(logit_bias)
        if world > 1 and not self.local_loss:
            loss = loss + (_global_mean(loss.detach(), image_features.shape[0]) - loss).detach()
        return {"contrastive_loss": loss} if output_dict else loss


def _scalar(x: float | Tensor) -> float | Tensor:
    """open_clip takes one-element tensors (`[1]`) where infcl takes 0-dim ones."""
    if isinstance(x, Tensor) and x.ndim > 0 and x.numel() == 1:
        return x.reshape(())
    return x


class SigLipLoss(nn.Module):
    """open_clip's `SigLipLoss` with the same arguments and value, computed by
    `infcl.inf_sigmoid_loss`.

    `forward` returns `-sum log sigmoid(z * S) / B` for `S = logit_scale * image_features @
    text_features.T + logit_bias` with `z = +1` on the diagonal and `-1` elsewhere, as open_clip
    does, without materialising `S`. With `world_size > 1` each rank's images meet every rank's
    texts around a ring (positives on the global diagonal, each rank's sum divided by its own
    batch), which is the value of every one of open_clip's `dist_impl` exchanges; the feature
    gradients include those through the other ranks' texts, as open_clip's exchanges with
    gradient do, and the scale and bias gradients are each rank's own, as open_clip's are.

    Args:
        cache_labels: accepted and ignored (no label tensor is built).
        rank, world_size: as in open_clip; with `world_size > 1` they must match the default
            process group, else `forward` raises ValueError. `world_size=1` is this process
            alone, even inside a process group.
        dist_impl: one of open_clip's `"bidir"`, `"shift"`, `"reduce"`, `"gather"` (or None);
            all compute the same loss, which infcl computes with its ring whichever is named.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
    ) -> None:
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(
                f"dist_impl must be None, 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}"
            )
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        world = _check_world(type(self).__name__, self.world_size, self.rank)
        loss = inf_sigmoid_loss(
            image_features, text_features, _scalar(logit_scale),
            0.0 if logit_bias is None else _scalar(logit_bias),
            group=dist.group.WORLD if world > 1 else None,
        )
        return {"contrastive_loss": loss} if output_dict else loss


def _global_mean(local_mean: Tensor, rows: int) -> Tensor:
    """The mean over all ranks' rows, from each rank's mean over its own (exact for any shards)."""
    both = torch.stack([local_mean.double() * rows, local_mean.new_tensor(rows, dtype=torch.float64)])
    dist.all_reduce(both)
    return (both[0] / both[1]).to(local_mean.dtype)


def _global_labels(
    q: Tensor, k: Tensor, labels: Tensor | None, group: dist.ProcessGroup | None
) -> Tensor:
    """inf_cl's labels (indices into this rank's keys; None: 0..M-1) as global key indices of
    `group`'s ranks (None: this process alone)."""
    n = k.shape[0]
    if group is None:  # one op checks the range, in eager and compiled mode alike
        y = torch.arange(q.shape[0], device=q.device) if labels is None else _integer(labels)
        if labels is None and q.shape[0] > n:
            raise ValueError(f"labels=None means 0..M-1, which needs M <= N; got M={q.shape[0]}, N={n}")
        return targets(y, n, NO_IGNORE)
    # Across ranks every rank learns of any rank's bad labels before anything can block: the
    # all-gather of the key counts carries a flag too.
    try:
        y = torch.arange(q.shape[0], device=q.device) if labels is None else _integer(labels)
        problem = None
        if bool(((y < 0) | (y >= n)).any()):
            bad = y[(y < 0) | (y >= n)][:5].tolist()
            problem = ValueError(
                f"labels index this rank's keys, so they must lie in [0, {n}); got {bad}"
                + (" (labels=None means 0..M-1, which needs M <= N)" if labels is None else "")
            )
    except TypeError as e:
        y, problem = None, e
    mine = torch.tensor([n, problem is not None], dtype=torch.long, device=k.device)
    table = [torch.zeros_like(mine) for _ in range(group.size())]
    dist.all_gather(table, mine, group=group)
    if problem is not None:
        raise problem
    failed = [r for r, row in enumerate(table) if int(row[1])]
    if failed:
        raise ValueError(f"inf_cl-style labels were rejected on rank(s) {failed} of the group")
    return y + int(sum(int(row[0]) for row in table[: dist.get_rank(group)]))


def _integer(labels: Any) -> Tensor:
    """`labels` as int64, or TypeError for anything but an integer tensor."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be an integer tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be an integer tensor, got shape {tuple(labels.shape)}, dtype "
            f"{labels.dtype}"
        )
    return labels.long()


def cal_inf_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None = None,
    scale: float | Tensor | None = None,
    head_dim: int | None = None,
) -> Tensor:
    """inf_cl's `cal_inf_loss`: the one-direction q -> k loss, this rank's mean, on `inf_loss`.

    As in inf_cl 1.2.1: each rank passes its shard of q and k; `labels` index this rank's own
    keys (None: row i's positive is local key i); the loss of each row runs over the keys of all
    ranks of the default process group; each rank returns the mean over its own rows. `scale`
    multiplies the logits (None: 1). Gradients follow infcl's DDP convention.

    Differences from inf_cl: `head_dim` is accepted and ignored (any D works); it runs without a
    process group and with a group of one rank; a learnable scale's gradient is this rank's
    share, with no all-reduce, so it needs no process group and is not W times too large once
    DDP averages it; shards may differ in size; inputs of any float dtype are computed in it
    (bf16 and fp16 on the tensor cores), not upcast to fp32 copies.
    """
    del head_dim
    group = _default_group()
    y = _global_labels(q, k, labels, group)
    return inf_loss(
        q, k, 1.0 if scale is None else scale, labels=y, group=group, ignore_index=NO_IGNORE
    )


def cal_ring_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None = None,
    scale: float | Tensor | None = None,
    head_dim: int | None = None,
) -> Tensor:
    """inf_cl's `cal_ring_loss` (torch tiles around the ring): `cal_inf_loss` on `ring_loss`.

    The same contract and differences as `cal_inf_loss`. Unlike inf_cl's, the log-sum-exp
    subtracts its maximum, so logits beyond about 88 do not overflow to inf.
    """
    del head_dim
    group = _default_group()
    y = _global_labels(q, k, labels, group)
    return ring_loss(
        q, k, 1.0 if scale is None else scale, labels=y, group=group, ignore_index=NO_IGNORE
    )


def cal_flash_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None = None,
    scale: float | Tensor | None = None,
    head_dim: int | None = None,
) -> Tensor:
    """inf_cl's `cal_flash_loss`: one device, the per-row losses `[M]` (no reduction).

    As in inf_cl it ignores any process group: q's rows against this device's k only, labels
    into k (None: 0..M-1), checked as `cal_inf_loss` checks them. `head_dim` is accepted and
    ignored.
    """
    del head_dim
    y = _global_labels(q, k, labels, None)
    s = 1.0 if scale is None else scale
    return inf_loss(q, k, s, labels=y, reduction="none", ignore_index=NO_IGNORE)
