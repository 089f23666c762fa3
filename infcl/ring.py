"""Across devices: key shards travel around a ring of ranks, torch tiles at every step."""

from __future__ import annotations

import torch.distributed as dist

from infcl import ops
from infcl._spec import contract, describe
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

    Memory per rank beyond the inputs and their gradients: one strip of `chunk_size x N_max`
    logits and O((M_r + N_max) * D) for two key blocks in flight, the fp32 dq and travelling
    key-gradient accumulators and the column statistics (N_max: the largest key shard). With
    `group=None` (the default) or a group of one rank this is `chunked_loss`: distribution is
    opt-in, so a loss computed on one rank alone (validation, say) never joins a collective.

    Errors: a rank whose own arguments are rejected raises at once, and tells the group first,
    so every other rank raises ValueError with the reason instead of waiting in the ring. Ranks
    that disagree on D, dtype, scale, symmetric or labels=None, and a global batch that breaks
    the contract, fail on every rank with the same message.

    Communication: W - 1 key-block transfers forward and backward (`batch_isend_irecv`, posted
    before each step's compute), plus the column LSEs (symmetric) and the key gradients, which
    follow their block one step behind and arrive home after the last step. Symmetric mode
    uses the same single ring.

    Args:
        group: the process group of the ring, e.g. `torch.distributed.group.WORLD` (None:
            this process alone).
        chunk_size: rows of q per strip at every ring step (see `chunked_loss`).
    """,
)
