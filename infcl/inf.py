"""The fast path: Triton tiles (CUDA, or the Triton interpreter on CPU), torch tiles otherwise."""

from __future__ import annotations

import torch
import torch.distributed as dist

from infcl._spec import (
    assemble,
    checked,
    describe,
    group_size,
    scale_tensor,
    target_columns,
)
from infcl._typing import Cols, Labels, Loss, Rows, Scale, typechecked
from infcl.chunked import chunked_fwd
from infcl.dist.ring import register_block, ring_loss_impl

try:
    from infcl.kernels.configs import INTERPRET
    from infcl.kernels.lse_bwd import inf_bwd  # noqa: F401  (registers the autograd)
    from infcl.kernels.lse_fwd import inf_fwd

    HAS_TRITON = True
    register_block("inf", inf_fwd, inf_bwd, str)
except ImportError:  # no triton on this platform: CPU tensors still work through torch tiles
    HAS_TRITON, INTERPRET = False, False

PRECISIONS = ("tf32", "ieee")


def _use_triton(q: torch.Tensor) -> bool:
    if q.dtype == torch.float64:
        return False
    if q.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError("inf_loss on CUDA needs triton; install it or use chunked_loss")
        return True
    return HAS_TRITON and INTERPRET and q.device.type == "cpu"


@checked
@typechecked
def inf_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    *,
    labels: Labels | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    precision: str = "tf32",
) -> Loss:
    """Contrastive loss from fused Triton tiles: the fastest exact path, memory linear in B."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if group_size(group) > 1:
        block = "inf" if _use_triton(q) else "chunked"
        extra = precision if block == "inf" else "0"
        return ring_loss_impl(
            q, k, scale, labels, symmetric, reduction, ignore_index, group, block, extra
        )
    s = scale_tensor(scale, q)
    y = target_columns(labels, q.shape[0], q.device)
    if _use_triton(q):
        row, col, pos = inf_fwd(q, k, s, y, 0, symmetric, precision)
    else:
        row, col, pos = chunked_fwd(q, k, s, y, 0, symmetric, 0)
    valid = None if labels is None else labels != ignore_index
    return assemble(row, col, pos, valid, symmetric, reduction)


describe(
    inf_loss,
    extra="""
    Memory: the inputs' gradients, an fp32 key-gradient accumulator, one block of at most
    8192 x 8192 logit gradients in the input dtype (128 MiB in bf16) and O(M + N) statistics.
    The forward never stores logits; the backward recomputes them block by block.

    Devices: CUDA tensors run the Triton kernels (bf16 and fp16 straight to the tensor cores,
    fp32 statistics); CPU tensors run the same kernels through the Triton interpreter when
    `TRITON_INTERPRET=1` is set before import, and plain torch tiles otherwise. float64 inputs
    always take the torch tiles.

    Across ranks (a process group of more than one rank): the same contract and gradient
    convention as `ring_loss` (each rank passes its shard, labels are global, each rank returns
    the reduction of its own rows), with these kernels at every ring step.

    Args:
        group: process group for the ring across devices (None: the default group when one is
            initialised; no group, or a group of one, runs on this device alone).
        precision: float32 inputs only: `"tf32"` (default, tensor cores, about 1e-3 relative
            error on logits) or `"ieee"` (full fp32 products, several times slower).
    """,
)
