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
The re-run also repeats the first pass's in-place buffer updates (BatchNorm's running statistics),
so each first-pass forward that will be re-run is undone on the buffers of the encoders' modules
(argument `modules`): they end as the plain step leaves them, updated once per micro-batch.

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
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

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


def _buffers(
    encoders: Sequence[Callable[..., Any] | None], modules: nn.Module | Sequence[nn.Module]
) -> list[Tensor]:
    """The buffers of `modules` and of each encoder that is a module or a module's bound method."""
    found = [modules] if isinstance(modules, nn.Module) else list(modules)
    for encoder in encoders:
        owner = getattr(encoder, "__self__", encoder)  # model.encode_image -> model
        if isinstance(owner, nn.Module):
            found.append(owner)
    return list({id(b): b for m in found for b in m.buffers()}.values())


@contextlib.contextmanager
def _undone(buffers: Sequence[Tensor]) -> Iterator[None]:
    """Put `buffers` back as they were on entry, for a forward that the re-run will repeat."""
    saved = [b.clone() for b in buffers]
    yield
    for b, old in zip(buffers, saved, strict=True):
        b.copy_(old)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} items"
    return f"a {type(x).__name__}"


def _checked_embeddings(emb: Any, name: str, rows: int) -> Embeddings:
    if not isinstance(emb, Tensor) or not emb.is_floating_point():
        raise TypeError(
            f"{name} must return a floating-point tensor [{rows}, d], got {_describe(emb)}"
        )
    if emb.ndim != 2 or emb.shape[0] != rows:
        raise ValueError(
            f"{name} must return a tensor [{rows}, d] for a micro-batch of {rows} samples, "
            f"got {_describe(emb)}"
        )
    return emb


def _checked_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    if loss.numel() != 1:  # what backward() accepts without an explicit gradient
        raise ValueError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    return loss


def _backward(pairs: Sequence[tuple[Tensor, Tensor | None]]) -> None:
    """Back-propagate each gradient into its tensor; a None gradient (a side the loss does not use)
    is skipped, so that encoder's `.grad` stays None, as after a plain step."""
    live = [(t, g) for t, g in pairs if g is not None]
    if live:
        torch.autograd.backward([t for t, _ in live], [g for _, g in live])


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
    modules: nn.Module | Sequence[nn.Module] = (),
) -> Tensor:
    """Accumulate into `.grad` the gradients of `loss_fn(encode_a(batch_a), encode_b(batch_b))`.

    Computes the same parameter gradients as

        loss = loss_fn(torch.cat([encode_a(a) for a in micro_a]),
                       torch.cat([encode_b(b) for b in micro_b]))
        loss.backward()

    (micro-batch `i` of both sides encoded in turn, a then b, with the RNG as it comes), but holds
    the encoders' activations for one micro-batch at a time. Gradients are added to `.grad` as
    `backward()` does, so zero them before the step; the RNG and the buffers of `modules` are left
    as the plain step leaves them.

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
        modules: the modules whose buffers the encoders update in place (BatchNorm's running
            statistics), e.g. the model; an encoder that is a module, or a module's bound method
            (`model.encode_image`), counts without being named. Each first-pass forward that
            the re-run repeats is undone on them (one copy of the buffers at a time), so each
            update happens once, in the re-run, as in the plain step; with `frozen_a` and two
            encoders, side a is not re-run and keeps its first-pass updates. This is exact for
            buffers that the forward updates but does not read, as BatchNorm's in training; the
            buffers of modules left out are updated twice per micro-batch.

    Returns:
        The loss, detached.

    Raises:
        ValueError: when the global batch is not a multiple of `micro_batch_size`, the two
            batches differ in size, `mode` is unknown, an encoder's embeddings are not 2-D
            with one row per sample, or the loss is not a scalar.
        TypeError: when an encoder returns something other than a floating-point tensor (a
            pair of them when `encode_b` is None), or `loss_fn` something other than a tensor.
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
    buffers = _buffers([encode_a, encode_b], modules)

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
                with _undone(buffers):
                    pair = encode_a((a, b))
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(
                        f"encode_a must return a pair (emb_a, emb_b) when encode_b is None, "
                        f"got {_describe(pair)}"
                    )
                ea = _checked_embeddings(pair[0], "encode_a(...)[0]", micro_batch_size)
                eb = _checked_embeddings(pair[1], "encode_a(...)[1]", micro_batch_size)
                state_b = state_a
            else:
                with _undone([] if frozen_a else buffers):  # a frozen side a is not re-run
                    ea = _checked_embeddings(encode_a(a), "encode_a", micro_batch_size)
                state_b = _RngState()
                with _undone(buffers):
                    eb = _checked_embeddings(encode_b(b), "encode_b", micro_batch_size)
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
        loss = _checked_loss(loss_fn(emb_a, emb_b))
        leaves = [emb_b] if frozen_a else [emb_a, emb_b]
        others = _other_leaves(loss, leaves)
        grads = list(torch.autograd.grad(loss, leaves + others, allow_unused=True))
        g_a = None if frozen_a else grads.pop(0)
        g_b = grads.pop(0)
        g_others = list(zip(others, grads, strict=True))
        loss_value = loss.detach()
        del emb_a, emb_b, loss, grads

        # [B, d] -> [micro-batch, row, d]: micro-batch i's gradient rows are g[i]
        g_a, g_b = (None if g is None else rearrange(g, "(n b) d -> n b d", n=n_micro)
                    for g in (g_a, g_b))

        for i in range(n_micro):
            last = i == n_micro - 1
            with _maybe_no_sync(factories, not last):
                ea, eb = encode_live(i)
                pairs = [(ea, None if g_a is None else g_a[i]), (eb, None if g_b is None else g_b[i])]
                _backward(pairs + g_others if last else pairs)  # the scale's joins the synced one
        after.restore()
        return loss_value

    loss_i = None
    for i in range(n_micro):
        last = i == n_micro - 1
        with _maybe_no_sync(factories, not last):
            ea, eb = encode_live(i)
            full_a = torch.cat(cached_a[:i] + [ea] + cached_a[i + 1 :])
            full_b = torch.cat(cached_b[:i] + [eb] + cached_b[i + 1 :])
            loss_i = _checked_loss(loss_fn(full_a, full_b))
            if last:
                loss_i.backward()  # the scale's gradient, once, with the last micro-batch's
            else:
                live = [eb] if frozen_a else [ea, eb]
                live_grads = torch.autograd.grad(loss_i, live, allow_unused=True)
                _backward(list(zip(live, live_grads, strict=True)))
    after.restore()
    assert loss_i is not None
    return loss_i.detach()

