"""Gradient cache: a contrastive step over a global batch with encoder memory of one micro-batch.

A contrastive loss couples every pair in the batch, so it cannot be split into independent
micro-batch losses the way a per-sample loss can. The gradient cache (Gao et al., 2021) splits the
step instead:

1. encode every micro-batch without grad, keeping only the embeddings (and each micro-batch's RNG
   state, taken just before its forward);
2. run the loss once on all embeddings, as leaves, to get each embedding's gradient (and the
   gradient of anything else the loss depends on, such as a learnable logit scale);
3. re-encode each micro-batch with grad under its restored RNG state and back-propagate the cached
   embedding gradients into the encoder.

The parameter gradients are those of one step on the whole batch: the re-run draws the same dropout
masks as the first pass, so the embeddings it differentiates are the ones the loss saw. Encoder
memory is that of one micro-batch; the loss memory is the loss's own (O(B) with `infcl.inf_loss`).

`mode="accumulate"` is open_clip's `accum_freq` scheme, also exact here: each micro-batch is
re-encoded with grad and the loss is recomputed on the whole batch with that micro-batch's
embeddings live and the others cached. It runs the loss once per micro-batch instead of once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["grad_cache_step", "split_batch"]

Embeddings = Float[Tensor, "b d"]
Encoder = Callable[[Any], Embeddings]
LossFn = Callable[[Embeddings, Embeddings], Float[Tensor, ""]]
PairEncoder = Callable[[tuple[Any, Any]], tuple[Embeddings, Embeddings]]
NoSync = Callable[[], AbstractContextManager[Any]]
MODES = ("cache", "accumulate")


def _batch_size(batch: Any, name: str) -> int:
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-dim tensor")
        return batch.shape[0]
    if isinstance(batch, dict) and batch:
        sizes = {k: _batch_size(v, f"{name}[{k!r}]") for k, v in batch.items()}
    elif isinstance(batch, (list, tuple)) and batch:
        sizes = {i: _batch_size(v, f"{name}[{i}]") for i, v in enumerate(batch)}
    else:
        raise TypeError(
            f"{name} must be a tensor or a non-empty tuple/list/dict of tensors, "
            f"got {type(batch).__name__}"
        )
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the parts of {name} have different batch sizes: {sizes}")
    return next(iter(sizes.values()))


def _take(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: _take(v, start, stop) for k, v in batch.items()}
    return type(batch)(_take(v, start, stop) for v in batch)


def split_batch(batch: Any, micro_batch_size: int, *, name: str = "batch") -> list[Any]:
    """Split a global batch into micro-batches of `micro_batch_size` along dim 0.

    `batch` is a tensor or a tuple/list/dict of tensors sharing their first dimension (e.g.
    `(pixels, tokens)`); each micro-batch has the same structure.

    Raises:
        ValueError: when the batch size is not a positive multiple of `micro_batch_size`.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(f"micro_batch_size must be an int, got {type(micro_batch_size).__name__}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    n = _batch_size(batch, name)
    if n == 0 or n % micro_batch_size:
        raise ValueError(
            f"{name} has {n} samples, which is not a positive multiple of micro_batch_size="
            f"{micro_batch_size}: pick a global batch divisible by the micro-batch size"
        )
    return [_take(batch, a, a + micro_batch_size) for a in range(0, n, micro_batch_size)]


class _RngState:
    """CPU and (when initialised) CUDA generator states, taken at construction."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _other_leaves(loss: Tensor, exclude: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that `loss` depends on, besides `exclude` (e.g. the logit scale)."""
    skip = {id(t) for t in exclude}
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad: the node that feeds a leaf's .grad
        if isinstance(var, Tensor) and id(var) not in skip:
            found[id(var)] = var
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


@contextlib.contextmanager
def _maybe_no_sync(factories: Sequence[NoSync], active: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if active:
            for factory in factories:
                stack.enter_context(factory())
        yield


def _detached_leaf(parts: list[Tensor], requires_grad: bool) -> Tensor:
    return torch.cat(parts).detach().requires_grad_(requires_grad)


def grad_cache_step(
    encode_a: Encoder | PairEncoder,
    encode_b: Encoder | None,
    batch_a: Any,
    batch_b: Any,
    loss_fn: LossFn,
    *,
    micro_batch_size: int,
    mode: Literal["cache", "accumulate"] = "cache",
    no_sync: NoSync | Sequence[NoSync] | None = None,
    frozen_a: bool = False,
) -> Tensor:
    """Accumulate into `.grad` the gradients of `loss_fn(encode_a(batch_a), encode_b(batch_b))`.

    Computes the same parameter gradients as

        loss = loss_fn(torch.cat([encode_a(a) for a in micro_a]),
                       torch.cat([encode_b(b) for b in micro_b]))
        loss.backward()

    (micro-batch `i` of both sides encoded in turn, a then b, with the RNG as it comes), but holds
    the encoders' activations for one micro-batch at a time. Gradients are added to `.grad` as
    `backward()` does, so zero them before the step; the RNG is left as the plain step leaves it.

    Args:
        encode_a: micro-batch of `batch_a` -> embeddings `[b, d]` (e.g. `model.encode_image`
            followed by normalisation).
        encode_b: micro-batch of `batch_b` -> embeddings `[b, d]`; or None, and then
            `encode_a` takes the pair `(micro_a, micro_b)` and returns both embeddings in one
            call. Under DDP use that form with the wrapped model's forward (DDP prepares its
            gradient reduction in forward, once per backward).
        batch_a: the global batch for `encode_a`: a tensor, or a tuple/list/dict of tensors
            whose first dimension is the batch.
        batch_b: the global batch for `encode_b`, with as many samples as `batch_a`.
        loss_fn: `(emb_a [B, d], emb_b [B, d]) -> scalar`, e.g.
            `lambda a, b: infcl.inf_loss(a, b, model.logit_scale.exp(), symmetric=True)`.
            Anything else it depends on that requires grad (the logit scale) gets its gradient
            too, once, in the same backward as the last micro-batch (so DDP reduces it).
        micro_batch_size: samples per encoder forward; must divide the global batch.
        mode: `"cache"` (gradient cache: the loss runs once) or `"accumulate"` (open_clip's
            `accum_freq`: the loss runs once per micro-batch, with that micro-batch live).
        no_sync: context factories entered around every micro-batch but the last, e.g.
            `ddp_model.no_sync`, so DDP all-reduces once per step. One or a sequence.
        frozen_a: side a has no trainable parameters (a locked image tower, LiT): its
            embeddings are computed once, without grad, and (with two encoders) never re-run.

    Returns:
        The loss, detached.

    Raises:
        ValueError: when the global batch is not a multiple of `micro_batch_size`, the two
            batches differ in size, or `mode` is unknown.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    micro_a = split_batch(batch_a, micro_batch_size, name="batch_a")
    micro_b = split_batch(batch_b, micro_batch_size, name="batch_b")
    if len(micro_a) != len(micro_b):
        raise ValueError(
            f"batch_a and batch_b must hold as many samples: {len(micro_a) * micro_batch_size} vs "
            f"{len(micro_b) * micro_batch_size}"
        )
    if no_sync is None:
        factories: Sequence[NoSync] = ()
    elif callable(no_sync):
        factories = (no_sync,)
    else:
        factories = tuple(no_sync)
    n_micro = len(micro_a)

    # Each side's RNG state is kept, not only the micro-batch's: with `frozen_a` the re-run skips
    # encode_a, and encode_b must still see the state it saw in the first pass.
    states: list[tuple[_RngState, _RngState]] = []
    cached_a: list[Tensor] = []
    cached_b: list[Tensor] = []
    joint = encode_b is None
    with torch.no_grad():
        for a, b in zip(micro_a, micro_b, strict=True):
            state_a = _RngState()
            if joint:
                ea, eb = encode_a((a, b))
                state_b = state_a
            else:
                ea = encode_a(a)
                state_b = _RngState()
                eb = encode_b(b)
            cached_a.append(ea.detach())
            cached_b.append(eb.detach())
            states.append((state_a, state_b))
    after = _RngState()

    def encode_live(i: int) -> tuple[Tensor, Tensor]:
        state_a, state_b = states[i]
        if joint:
            state_a.restore()
            ea, eb = encode_a((micro_a[i], micro_b[i]))
            return (cached_a[i] if frozen_a else ea), eb
        if frozen_a:
            ea = cached_a[i]
        else:
            state_a.restore()
            ea = encode_a(micro_a[i])
        state_b.restore()
        return ea, encode_b(micro_b[i])

    if mode == "cache":
        emb_a = _detached_leaf(cached_a, not frozen_a)
        emb_b = _detached_leaf(cached_b, True)
        loss = loss_fn(emb_a, emb_b)
        leaves = [emb_b] if frozen_a else [emb_a, emb_b]
        others = _other_leaves(loss, leaves)
        grads = torch.autograd.grad(loss, leaves + others, allow_unused=True)
        g_b = grads[len(leaves) - 1].split(micro_batch_size)
        g_a = None if frozen_a else grads[0].split(micro_batch_size)
        g_others = [(t, g) for t, g in zip(others, grads[len(leaves):], strict=True) if g is not None]
        loss_value = loss.detach()
        del emb_a, emb_b, loss, grads
        for i in range(n_micro):
            last = i == n_micro - 1
            with _maybe_no_sync(factories, not last):
                ea, eb = encode_live(i)
                outs, grads_i = [eb], [g_b[i]]
                if g_a is not None:
                    outs.append(ea)
                    grads_i.append(g_a[i])
                if last:  # the scale's gradient joins the synchronised backward
                    outs += [t for t, _ in g_others]
                    grads_i += [g for _, g in g_others]
                torch.autograd.backward(outs, grads_i)
        after.restore()
        return loss_value

    loss_i = None
    for i in range(n_micro):
        last = i == n_micro - 1
        with _maybe_no_sync(factories, not last):
            ea, eb = encode_live(i)
            full_a = torch.cat(cached_a[:i] + [ea] + cached_a[i + 1 :])
            full_b = torch.cat(cached_b[:i] + [eb] + cached_b[i + 1 :])
            loss_i = loss_fn(full_a, full_b)
            if last:
                loss_i.backward()  # the scale's gradient, once, with the last micro-batch's
            else:
                live = [eb] if frozen_a else [ea, eb]
                live_grads = torch.autograd.grad(loss_i, live)
                torch.autograd.backward(live, list(live_grads))
    after.restore()
    assert loss_i is not None
    return loss_i.detach()

