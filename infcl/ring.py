"""Across devices: key shards travel around a ring of ranks, torch tiles at every step."""

from __future__ import annotations

import torch.distributed as dist

from infcl import ops
from infcl._spec import SIGMOID_SPEC_DOC, contract, describe
from infcl._typing import Cols, Labels, Loss, Rows, Scale


@contract
def ring_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    *,
    labels: Labels | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Loss:
    """Contrastive loss on the batch of all ranks, each holding a shard, with torch tiles per step."""
    return ops.loss(
        q, k, scale, labels, symmetric, reduction, ignore_index, block="chunked", group=group,
        chunk_size=chunk_size or 0,
    )


describe(
    ring_loss,
    extra="""
    Across ranks: every rank passes its shard, q `[M_r, D]` and k `[N_r, D]`; the loss is
    defined on the global batch, rows and columns concatenated in rank order. `labels` hold
    GLOBAL column indices (None: the global diagonal, which needs the global M == N; with
    `symmetric=True` every rank needs M_r == N_r). Shards may differ in size, down to zero rows.
    Every rank must call the function (and its backward): it is collective.

    Returns and gradients (the DDP convention): each rank returns the reduction of its OWN rows,
    `"mean"` over its own counted rows (its own pairs when symmetric; NaN for a rank with none,
    as `F.cross_entropy` gives), `"sum"` over them, or `"none"` their `[M_r]` vector. With
    equal shards the mean over ranks of the returned means is the global loss. Each rank's dq,
    dk and dscale are its share of the gradient of the SUM over ranks of the returned losses:
    dq and dk are complete for its own rows and columns, and the dscale shares add up over
    ranks. DistributedDataParallel's averaging then yields the gradient of the mean over ranks,
    the scale's included (no extra all-reduce, so it is not W times too large).

    Memory per rank beyond the inputs: the two gradients, the fp32 dq accumulator (for 16-bit
    inputs; fp32 and fp64 accumulate in dq itself), a few key slices of at most
    `N_max / 8` rows (two in flight, the travelling fp32 key gradient, the block's fp32 copy),
    one strip of `chunk_size` rows of logits and O(M_r + N_max) statistics (N_max: the largest
    key shard; shards of at least 65536 rows are cut into 8 slices, smaller ones into fewer). For
    bf16 with M_r = N_r that is at most about twice the rank's input bytes. With
    `group=None` (the default) or a group of one rank this is `chunked_loss`: distribution is
    opt-in, so a loss computed on one rank alone (validation, say) never joins a collective.

    Errors: a rank whose own arguments are rejected raises at once, and tells the group first,
    so every other rank raises ValueError with the reason instead of waiting in the ring. Ranks
    that disagree on D, dtype, scale, symmetric or labels=None, and a global batch that breaks
    the contract, fail on every rank with the same message.

    Communication: W - 1 key-block transfers forward and backward (`batch_isend_irecv`, posted
    before each step's compute), plus the column LSEs (symmetric) and the key gradients, which
    follow their block one step behind (received between steps) and arrive home after the last
    step; large shards travel in slices, one ring per slice, the same bytes in all. Symmetric
    mode uses the same single ring.

    Args:
        group: the process group of the ring, e.g. `torch.distributed.group.WORLD` (None:
            this process alone).
        chunk_size: rows of q per strip at every ring step (see `chunked_loss`).
    """,
)


@contract
def ring_sigmoid_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    bias: Scale = 0.0,
    *,
    labels: Labels | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Loss:
    """Sigmoid (SigLIP) loss of this rank's rows against every rank's columns, around a ring."""
    return ops.sigmoid_loss(
        q, k, scale, bias, labels, reduction, block="chunked", group=group,
        chunk_size=chunk_size or 0,
    )


describe(
    ring_sigmoid_loss,
    spec=SIGMOID_SPEC_DOC,
    extra="""
    Across ranks (`group=` a process group of more than one rank): every rank passes its
    shard; `labels` are GLOBAL column indices (None: the global diagonal, which needs the
    global M == N). Each rank returns the reduction of its OWN rows against the columns of
    every rank (`"mean"`: divided by its own row count, as open_clip's `SigLipLoss` is on each
    rank). dq and dk are complete for the rank's rows and columns; the dscale and dbias shares
    add up over ranks to the gradient of the sum of the ranks' losses, so DDP's averaging
    gives the gradient of their mean (no collective of their own). Only the keys travel (the
    row losses are sums, no statistics are merged); the key gradients travel home in backward.
    The same opt-in, errors and status exchange as `ring_loss`; ranks must agree on scale and
    bias. With `group=None` this is `chunked_sigmoid_loss`.

    Args:
        group: the process group of the ring (None: this process alone).
        chunk_size: rows of q per strip at every ring step.
    """,
)
