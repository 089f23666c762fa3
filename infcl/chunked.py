"""One device, plain PyTorch tiles with recomputation: O((M + N) * chunk_size) memory."""

from __future__ import annotations

from infcl import ops
from infcl._spec import SIGMOID_SPEC_DOC, contract, describe
from infcl._typing import Cols, Labels, Loss, Rows, Scale


@contract
def chunked_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    *,
    labels: Labels | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Loss:
    """Contrastive loss from strips of logits recomputed in backward, in plain PyTorch."""
    return ops.loss(
        q, k, scale, labels, symmetric, reduction, ignore_index, block="chunked",
        chunk_size=chunk_size or 0,
    )


describe(
    chunked_loss,
    extra="""
    Memory: O((M + N) * chunk_size) beyond the inputs and their gradients; no `[M, N]` tensor is
    ever held, in forward or in what autograd saves (backward recomputes each strip). Runs on any
    device, CPU included, and under `torch.compile(fullgraph=True)`: the strips are
    `torch.library` ops (`infcl::chunked_fwd`, `infcl::chunked_bwd`), so the compiler never
    unrolls the strip loop and a new batch size marked dynamic does not recompile.

    Args:
        chunk_size: rows of q per strip of `chunk_size x N` logits. None picks about 4M logits
            a strip (`DEFAULT_TILE_ELEMENTS // N` rows, at least 1).
    """,
)


@contract
def chunked_sigmoid_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    bias: Scale = 0.0,
    *,
    labels: Labels | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Loss:
    """Sigmoid (SigLIP) loss from strips of logits recomputed in backward, in plain PyTorch."""
    return ops.sigmoid_loss(
        q, k, scale, bias, labels, reduction, block="chunked", chunk_size=chunk_size or 0
    )


describe(
    chunked_sigmoid_loss,
    spec=SIGMOID_SPEC_DOC,
    extra="""
    Memory: O((M + N) * chunk_size) beyond the inputs and their gradients, as `chunked_loss`
    (`infcl::chunked_sigmoid_fwd` / `_bwd`); any device, and `torch.compile(fullgraph=True)`.

    Args:
        chunk_size: rows of q per strip of `chunk_size x N` logits (None: about 4M logits).
    """,
)
