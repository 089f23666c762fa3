"""The fast path: Triton tiles (CUDA, or the Triton interpreter on CPU), torch tiles otherwise."""

from __future__ import annotations

import torch
import torch.distributed as dist

from infcl import ops
from infcl._spec import SIGMOID_SPEC_DOC, contract, describe
from infcl._typing import Cols, Labels, Loss, Rows, Scale


def _block(q: torch.Tensor) -> str:
    """Triton tiles for CUDA tensors (and CPU ones under the interpreter), else torch tiles."""
    if q.dtype == torch.float64:
        return "chunked"
    if q.is_cuda:
        if not ops.HAS_TRITON:
            raise RuntimeError("inf_loss on CUDA needs triton; install it or use chunked_loss")
        return "inf"
    return "inf" if ops.HAS_TRITON and ops.INTERPRET and q.device.type == "cpu" else "chunked"


@contract
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
    precision: str | None = None,
) -> Loss:
    """Contrastive loss from fused Triton tiles: the fastest exact path, memory linear in B."""
    return ops.loss(
        q, k, scale, labels, symmetric, reduction, ignore_index, block=_block(q), group=group,
        precision=precision,
    )


describe(
    inf_loss,
    extra="""
    Memory: the inputs' gradients, one block of at most 8192 x 8192 logit gradients in the
    input dtype (128 MiB in bf16), O(M + N) statistics, and an fp32 key-gradient accumulator
    while that stays under 256 MiB (N * D <= 2**26); past it the backward recomputes each
    block once more instead (about 30% more backward time), in blocks of 8192 x 4096. The
    forward never stores logits. A "mean" or "sum" loss that needs a gradient forms the
    gradients in its forward (the same work, in one call) and hands them to autograd in the
    backward without a copy; such a loss, if never differentiated, has done the backward's
    work and holds the gradients while it lives, and `create_graph=True` through it raises
    (use `reduction="none"` and reduce it yourself for higher-order gradients).

    Small batches: a call costs host time whatever B (checks, kernel launches, two GEMMs,
    autograd: 1-2 ms on the machine of the Results page, less for a "mean" or "sum" loss in
    eager mode, which makes one forward call and a one-kernel backward); under
    `torch.compile(mode="reduce-overhead")` or a captured `torch.cuda.graph` (both supported,
    forward and backward) only the GPU work remains. Inside a graph the labels' range is
    checked on the device: a bad label fails the replay with a device-side assert, after
    which the process's CUDA context is unusable (restart it).

    Devices: CUDA tensors run the Triton kernels (bf16 and fp16 straight to the tensor cores,
    fp32 statistics); CPU tensors run the same kernels through the Triton interpreter when
    `TRITON_INTERPRET=1` is set before import, and plain torch tiles otherwise. float64 inputs
    always take the torch tiles.

    Across ranks (`group=` a process group of more than one rank): the same contract, errors
    and gradient convention as `ring_loss` (each rank passes its shard, labels are global, each
    rank returns the reduction of its own rows), with these kernels at every ring step.

    Args:
        group: process group for the ring across devices, e.g.
            `torch.distributed.group.WORLD` (None, the default: this device alone, even when
            a process group is initialised).
        precision: how float32 inputs are multiplied (bf16 and fp16 ignore it). None (the
            default) follows `torch.get_float32_matmul_precision()` when the loss runs:
            "highest" (PyTorch's default) takes `"ieee"`, "high" and "medium" take `"tf32"`.
            `"ieee"`: IEEE fp32 products, fp32's accuracy (the slowest: about 1.4x naive
            fp32's time); `"tf32x3"`: three TF32 products per product on the tensor cores,
            fp32's accuracy in the loss and the feature gradients but not in the scale's
            (up to 18x naive's error), about 0.8x naive fp32's time; `"tf32"`: one TF32
            product with inputs rounded to nearest, as cuBLAS does with TF32 allowed (about
            1e-3 relative error per logit, fastest).

    Autocast: inside `torch.autocast`, float32 inputs are computed in the autocast dtype (bf16
    or fp16 tensor cores), as a matmul under autocast is; the loss is float32 and the
    gradients come back in float32.
    """,
)


@contract
def inf_sigmoid_loss(
    q: Rows,
    k: Cols,
    scale: Scale = 1.0,
    bias: Scale = 0.0,
    *,
    labels: Labels | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    precision: str | None = None,
) -> Loss:
    """Sigmoid (SigLIP) loss from fused Triton tiles (where `inf_loss` runs Triton)."""
    return ops.sigmoid_loss(
        q, k, scale, bias, labels, reduction, block=_block(q), group=group,
        precision=precision,
    )


describe(
    inf_sigmoid_loss,
    spec=SIGMOID_SPEC_DOC,
    extra="""
    Memory: the inputs' gradients, one bounded block of logit gradients and O(M) row losses;
    no logit matrix is stored. A "mean" or "sum" loss that needs a gradient forms the gradients
    in the same sweep as the loss (a quarter less work) and holds them until the backward (in
    eager mode they then become the inputs' gradients without a copy; under `torch.compile`
    the backward's peak holds them twice); bf16 and fp32 features take that path, fp16 two
    sweeps. A loss computed with a gradient wanted but never differentiated has done that
    work and holds those gradients for as long as it lives.
    Devices, precision and autocast as `inf_loss`; across ranks (`group=`) as
    `ring_sigmoid_loss`, with these tiles at every ring step.

    Args:
        group: the process group of the ring (None: this device alone).
        precision: how float32 inputs are multiplied, as in `inf_loss`.
    """,
)
