"""The op layer: block ops, their autograd, and the one prologue/epilogue every loss runs.

A block op pair computes one block of logits `scale * q @ k.T` without storing it:

* `infcl::<block>_fwd(q, k, scale, labels, col_offset, symmetric, chunk_size, precision)
  -> (row_lse [M], col_lse [N] or [0], pos [M])`: the row log-sum-exp, the column one when
  symmetric, and the positive logit `S[i, labels[i] - col_offset]` (0 where it is not in the
  block);
* `infcl::<block>_bwd(q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos,
  chunk_size, precision) -> (dq, dk, dscale)`.

The sigmoid (SigLIP) loss has its own pairs, `infcl::<block>_sigmoid_fwd(q, k, scale, bias,
labels, col_offset, chunk_size, precision) -> per_row [M]` (the row's loss over the block's
columns) and `infcl::<block>_sigmoid_bwd(..., g_row, chunk_size, precision) -> (dq, dk, dscale,
dbias)`: no statistics, so blocks simply add.

Two blocks exist: `"chunked"` (torch tiles, below) and `"inf"` (Triton tiles, `infcl/kernels/`).
Each takes both tuning arguments and uses its own (`chunk_size`: torch tiles; `precision`:
Triton), so the ring (`infcl/dist/ring.py`) runs either by name. `loss` is the shared
prologue (scale, targets), one call into a block or the ring, and epilogue (`assemble`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from infcl.dist.ring import NO_IGNORE, group_size, ring_fwd, ring_sigmoid_fwd
from infcl.kernels.numerics import LSE_DTYPE, acc_dtype, autocast_off, split_lse

try:
    from infcl.kernels.configs import INTERPRET
    from infcl.kernels.lse_bwd import ds_bwd, inf_bwd
    from infcl.kernels.lse_fwd import inf_fwd, lse_fwd
    from infcl.kernels.sigmoid_bwd import (  # noqa: F401
        inf_sigmoid_bwd,
        inf_sigmoid_fused,
        scale_pair_,
        scaled,
        sigmoid_ds_bwd,
    )
    from infcl.kernels.sigmoid_fwd import inf_sigmoid_fwd

    HAS_TRITON = True
except ImportError:  # no triton on this platform: CPU tensors still work through torch tiles
    HAS_TRITON, INTERPRET = False, False



DEFAULT_TILE_ELEMENTS = 1 << 22
"""Default strip: about 4M logits (16 MiB in float32) per tile of `chunk_size` rows by N columns."""


def default_chunk_size(m: int, n: int) -> int:
    """Rows per strip when the caller gives none: a strip of about 4M logits, at least one row."""
    return max(1, min(m, DEFAULT_TILE_ELEMENTS // max(n, 1)))


def _strip_pos(st: Tensor, y: Tensor, n: int) -> Tensor:
    """S[i, y_i] for the rows of a strip, 0 where y_i is not a column of this block (no OOB read)."""
    hit = (y >= 0) & (y < n)
    picked = st.gather(1, y.clamp(0, max(n - 1, 0))[:, None]).squeeze(1)
    return torch.where(hit, picked, torch.zeros_like(picked))


def _lse(st: Tensor, dim: int) -> Tensor:
    """log-sum-exp along `dim` as `max + log(sum(exp(st - max)))`, summed in float64."""
    mx = st.amax(dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # all -inf or inf: no NaN
    total = torch.exp(st - mx).sum(dim).to(LSE_DTYPE)
    return mx.squeeze(dim).to(LSE_DTYPE) + torch.log(total)


@torch.library.custom_op("infcl::chunked_fwd", mutates_args=())
@autocast_off
def chunked_fwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int, symmetric: bool,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row LSE [M], column LSE [N] (or [0] unless symmetric) and positive logit [M] of one block.

    `labels` are column indices shifted by `col_offset` (the block's first global column).
    `precision` is the Triton tiles' argument, unused here (every block op takes the same).
    """
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s = scale.to(acc)
    kt = k.to(acc).T
    y = labels - col_offset
    lse = dict(dtype=LSE_DTYPE, device=q.device)
    row = torch.empty(m, **lse)
    pos = torch.empty(m, dtype=acc, device=q.device)
    col = torch.full((n if symmetric else 0,), float("-inf"), **lse)
    if m == 0 or n == 0:
        return row.fill_(float("-inf")), col, pos.zero_()
    for a in range(0, m, cs):
        b = min(a + cs, m)
        st = (q[a:b].to(acc) @ kt) * s
        row[a:b] = _lse(st, 1)
        pos[a:b] = _strip_pos(st, y[a:b], n)
        if symmetric:
            col = torch.logaddexp(col, _lse(st, 0))
    return row, col, pos


@chunked_fwd.register_fake
def chunked_fwd_fake(q, k, scale, labels, col_offset, symmetric, chunk_size, precision):
    n_col = k.shape[0] if symmetric else 0
    return (
        q.new_empty(q.shape[0], dtype=LSE_DTYPE),
        q.new_empty(n_col, dtype=LSE_DTYPE),
        q.new_empty(q.shape[0], dtype=acc_dtype(q)),
    )


@torch.library.custom_op("infcl::chunked_bwd", mutates_args=())
@autocast_off
def chunked_bwd(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of `sum(g_row * row_lse + g_col * col_lse + g_pos * pos)` for one block.

    The LSEs may be global ones (merged over other blocks): the softmax uses them as given. The
    loss is symmetric when `col_lse` is not empty.
    """
    acc = acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dscale = chunked_bwd_into(
        q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, chunk_size,
        precision, dq, dk,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dscale.to(scale.dtype)


@chunked_bwd.register_fake
def chunked_bwd_fake(
    q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, chunk_size, precision
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


@torch.library.custom_op("infcl::chunked_bwd_into", mutates_args=("dq", "dk"))
@autocast_off
def chunked_bwd_into(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, col_offset: int,
    row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor, g_pos: Tensor,
    chunk_size: int, precision: str, dq: Tensor, dk: Tensor,
) -> Tensor:
    """`infcl::chunked_bwd` that adds the block's dq and dk into `dq` [M, D] and `dk` [N, D]
    (contiguous, in the accumulation dtype) and returns its dscale in that dtype: the ring adds
    every step's gradients into one fp32 buffer each, with no block gradient of its own."""
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s = scale.to(acc)
    kf = k.to(acc)
    symmetric = col_lse.numel() > 0
    r_hi, r_lo = split_lse(row_lse, acc)
    c_hi, c_lo = split_lse(col_lse, acc)
    g_row, g_col, g_pos = g_row.to(acc), g_col.to(acc), g_pos.to(acc)
    y = labels - col_offset
    hit = (y >= 0) & (y < n)
    yc = y.clamp(0, max(n - 1, 0))
    dscale = torch.zeros((), dtype=acc, device=q.device)
    for a in range(0, m if n > 0 else 0, cs):
        b = min(a + cs, m)
        qc = q[a:b].to(acc)
        gc = qc @ kf.T
        st = gc * s
        ds = g_row[a:b, None] * torch.exp((st - r_hi[a:b, None]) - r_lo[a:b, None])
        if symmetric:
            ds = ds + g_col[None, :] * torch.exp((st - c_hi[None, :]) - c_lo[None, :])
        gp = torch.where(hit[a:b], g_pos[a:b], torch.zeros_like(g_pos[a:b]))
        ds = ds.scatter_add(1, yc[a:b, None], gp[:, None])  # [rows, N]: the logits' gradient
        dscale += (ds * gc).sum()  # elementwise, as the kernels do: <q, dS k> loses digits
        ds = ds.mul_(s)  # scaled before the products: the accumulators hold other blocks' sums
        dq[a:b].addmm_(ds, kf)
        dk.addmm_(ds.T, qc)
    return dscale


@chunked_bwd_into.register_fake
def chunked_bwd_into_fake(
    q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, chunk_size,
    precision, dq, dk,
):
    return q.new_empty((), dtype=acc_dtype(q))


def _register_block_autograd(fwd_op, bwd_op) -> None:
    """Make `fwd_op` differentiable in q, k and scale through `bwd_op` (no double backward)."""

    def setup_context(ctx, inputs, output):
        q, k, scale, labels, col_offset, _symmetric, chunk_size, precision = inputs
        row, col, _ = output
        ctx.save_for_backward(q, k, scale, labels, row, col)
        ctx.args = (col_offset, chunk_size, precision)

    def backward(ctx, g_row, g_col, g_pos):
        q, k, scale, labels, row, col = ctx.saved_tensors
        col_offset, chunk_size, precision = ctx.args
        g_row = torch.zeros_like(row) if g_row is None else g_row
        g_col = torch.zeros_like(col) if g_col is None else g_col
        g_pos = torch.zeros_like(row) if g_pos is None else g_pos
        dq, dk, dscale = bwd_op(
            q, k, scale, labels, col_offset, row, col, g_row, g_col, g_pos, chunk_size, precision
        )
        return dq, dk, dscale, None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_block_autograd(chunked_fwd, chunked_bwd)
if HAS_TRITON:
    _register_block_autograd(inf_fwd, inf_bwd)


def check_targets(labels: Tensor, n: int, ignore_index: int) -> Tensor:
    """`labels` as int64 column indices, after checking that each lies in [0, n) or is ignored
    (the body of `infcl::targets`, which eager calls straight)."""
    y = labels.to(torch.long, copy=True)  # a fresh tensor: an op's output may not alias its input
    bad = (y < 0) | (y >= n)
    if ignore_index != NO_IGNORE:  # the sentinel is not a value to skip, not even -2**63
        bad &= y != ignore_index
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        # inside a CUDA graph no value can reach the host: the check runs on the device, and a
        # bad label stops the graph's replay with a device-side assert
        torch._assert_async(~bad.any(), "labels out of range (checked inside a CUDA graph)")
        return y
    if bool(bad.any()):
        allowed = "" if ignore_index == NO_IGNORE else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"labels must lie in [0, {n}){allowed}; got {y[bad][:5].tolist()}")
    return y


@torch.library.custom_op("infcl::targets", mutates_args=())
def targets(labels: Tensor, n: int, ignore_index: int) -> Tensor:
    """`check_targets` as an op, so that the check on the labels' values runs when a compiled
    graph runs too."""
    return check_targets(labels, n, ignore_index)


@targets.register_fake
def targets_fake(labels, n, ignore_index):
    return torch.empty_like(labels, dtype=torch.long)


def scale_tensor(scale: float | Tensor, like: Tensor) -> Tensor:
    """The scale as a 0-dim tensor on `like`'s device (differentiable when it is a tensor)."""
    if isinstance(scale, Tensor):
        return scale.to(like.device)
    # a fill on the device, not a copy from the host: no sync, and CUDA graphs can capture it
    return torch.full((), float(scale), dtype=acc_dtype(like), device=like.device)


def assemble(
    row_lse: Tensor, col_lse: Tensor, pos: Tensor, valid: Tensor | None, symmetric: bool,
    reduction: str,
) -> Tensor:
    """Turn the pieces into the loss; autograd carries the gradients back to the pieces.

    `valid` marks the rows that count (None: all). `col_lse` is used only when symmetric. The
    LSEs are float64 (`LSE_DTYPE`), and so is the reduction: the loss is rounded once to the
    dtype of `pos` (an fp32 sum of fp32 rows would err by several ulps at large B).
    """
    if symmetric:
        per = 0.5 * ((row_lse - pos) + (col_lse - pos))
    else:
        per = row_lse - pos
        if valid is not None:
            per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per.to(pos.dtype)
    total = per.sum()
    if reduction == "mean":
        total = total / (per.shape[0] if valid is None or symmetric else valid.sum())
    return total.to(pos.dtype)


def _prologue(q: Tensor, k: Tensor, precision: str | None) -> tuple[Tensor, Tensor, str]:
    """Under autocast, fp32 features in the autocast dtype; `precision=None` as "default"."""
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):
        low = torch.get_autocast_dtype(q.device.type)
        q, k = q.to(low), k.to(low)
    return q, k, "default" if precision is None else precision


def loss(
    q: Tensor, k: Tensor, scale: float | Tensor, labels: Tensor | None, symmetric: bool,
    reduction: str, ignore_index: int, *, block: str, group: dist.ProcessGroup | None = None,
    chunk_size: int = 0, precision: str | None = None,
) -> Tensor:
    """The loss through block op pair `block`: on this device, or around `group`'s ring when it
    has more than one rank (arguments already validated by the front door).

    Under autocast, fp32 features are computed in the autocast dtype (as autocast runs a matmul;
    the loss stays fp32 and their gradients come back fp32). `precision=None` follows PyTorch's
    float32 matmul precision, read when the op runs."""
    q, k, precision = _prologue(q, k, precision)
    s = scale_tensor(scale, q)
    if group_size(group) > 1:
        diagonal = labels is None
        y = q.new_empty(0, dtype=torch.long) if diagonal else labels
        valid = None if diagonal else labels.to(torch.long) != ignore_index  # any int dtype
        row, col, pos, _ = ring_fwd(
            q, k, s, y, diagonal, symmetric, ignore_index, group.group_name, block, chunk_size,
            precision,
        )
    else:
        eager = _eager(q, k, s)
        if labels is None:
            y, valid = torch.arange(q.shape[0], device=q.device), None
        else:
            y = (check_targets if eager else targets)(labels, k.shape[0], ignore_index)
            valid = y != ignore_index
        if eager and _held(block, reduction, q, k, s):
            sweep = _softmax_sweep(symmetric, reduction, precision)
            return _Held.apply(sweep, "inf_loss", 3, q, k, s, y, valid)
        fwd = getattr(torch.ops.infcl, f"{block}_fwd")
        row, col, pos = fwd(q, k, s, y, 0, symmetric, chunk_size, precision)
    return assemble(row, col, pos, valid, symmetric, reduction)


def _sigmoid_strip(q: Tensor, kt: Tensor, s: Tensor, b: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unscaled products, `S = scale * q @ k.T + bias` and the positive mask of one strip."""
    gc = q @ kt
    st = gc * s + b
    hit = torch.arange(kt.shape[1], device=q.device)[None, :] == y[:, None]
    return gc, st, hit


@torch.library.custom_op("infcl::chunked_sigmoid_fwd", mutates_args=())
@autocast_off
def chunked_sigmoid_fwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    chunk_size: int, precision: str,
) -> Tensor:
    """Each row's sigmoid loss over this block's columns, `sum_j -log sigmoid(z_ij S_ij)` [M].

    The sign is applied before `logsigmoid` (`-S` for negatives), which is exact at any size;
    `precision` is unused, as in `infcl::chunked_fwd`."""
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s, b = scale.to(acc), bias.to(acc)
    kt = k.to(acc).T
    y = labels - col_offset
    per = torch.zeros(m, dtype=acc, device=q.device)
    for a in range(0, m if n > 0 else 0, cs):
        _, st, hit = _sigmoid_strip(q[a : a + cs].to(acc), kt, s, b, y[a : a + cs])
        per[a : a + cs] = -F.logsigmoid(torch.where(hit, st, -st)).sum(1)
    return per


@chunked_sigmoid_fwd.register_fake
def chunked_sigmoid_fwd_fake(q, k, scale, bias, labels, col_offset, chunk_size, precision):
    return q.new_empty(q.shape[0], dtype=acc_dtype(q))


@torch.library.custom_op("infcl::chunked_sigmoid_bwd", mutates_args=())
@autocast_off
def chunked_sigmoid_bwd(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    g_row: Tensor, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dscale, dbias of `sum(g_row * per_row)` for one block:
    `dS = g_row * (sigmoid(S) - onehot)`, the positive's term as `-sigmoid(-S)` (exact)."""
    acc = acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dscale, dbias = chunked_sigmoid_bwd_into(
        q, k, scale, bias, labels, col_offset, g_row, chunk_size, precision, dq, dk
    )
    return dq.to(q.dtype), dk.to(k.dtype), dscale.to(scale.dtype), dbias.to(bias.dtype)


@chunked_sigmoid_bwd.register_fake
def chunked_sigmoid_bwd_fake(q, k, scale, bias, labels, col_offset, g_row, chunk_size, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale), torch.empty_like(bias)


@torch.library.custom_op("infcl::chunked_sigmoid_bwd_into", mutates_args=("dq", "dk"))
@autocast_off
def chunked_sigmoid_bwd_into(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, col_offset: int,
    g_row: Tensor, chunk_size: int, precision: str, dq: Tensor, dk: Tensor,
) -> tuple[Tensor, Tensor]:
    """`infcl::chunked_sigmoid_bwd` that adds dq and dk into the accumulators `dq` and `dk`
    (as `infcl::chunked_bwd_into`) and returns dscale and dbias in the accumulation dtype."""
    acc = acc_dtype(q)
    m, n = q.shape[0], k.shape[0]
    cs = chunk_size if chunk_size > 0 else default_chunk_size(m, n)
    s, b = scale.to(acc), bias.to(acc)
    kf = k.to(acc)
    g = g_row.to(acc)
    y = labels - col_offset
    dscale = torch.zeros((), dtype=acc, device=q.device)
    dbias = torch.zeros((), dtype=acc, device=q.device)
    for a in range(0, m if n > 0 else 0, cs):
        qc = q[a : a + cs].to(acc)
        gc, st, hit = _sigmoid_strip(qc, kf.T, s, b, y[a : a + cs])
        ds = g[a : a + cs, None] * torch.where(hit, -torch.sigmoid(-st), torch.sigmoid(st))
        dscale += (ds * gc).sum()
        dbias += ds.sum()
        ds = ds.mul_(s)
        dq[a : a + cs].addmm_(ds, kf)
        dk.addmm_(ds.T, qc)
    return dscale, dbias


@chunked_sigmoid_bwd_into.register_fake
def chunked_sigmoid_bwd_into_fake(q, k, scale, bias, labels, col_offset, g_row, chunk_size,
                                  precision, dq, dk):
    acc = acc_dtype(q)
    return q.new_empty((), dtype=acc), q.new_empty((), dtype=acc)


def _register_sigmoid_autograd(fwd_op, bwd_op) -> None:
    """Make a sigmoid block op differentiable in q, k, scale and bias through `bwd_op`."""

    def setup_context(ctx, inputs, output):
        q, k, scale, bias, labels, col_offset, chunk_size, precision = inputs
        ctx.save_for_backward(q, k, scale, bias, labels)
        ctx.args = (col_offset, chunk_size, precision)

    def backward(ctx, g_row):
        q, k, scale, bias, labels = ctx.saved_tensors
        col_offset, chunk_size, precision = ctx.args
        dq, dk, dscale, dbias = bwd_op(
            q, k, scale, bias, labels, col_offset, g_row, chunk_size, precision
        )
        return dq, dk, dscale, dbias, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_sigmoid_autograd(chunked_sigmoid_fwd, chunked_sigmoid_bwd)
if HAS_TRITON:
    _register_sigmoid_autograd(inf_sigmoid_fwd, inf_sigmoid_bwd)


NOT_TWICE = (
    "{name} cannot differentiate its gradients (create_graph=True): its 'mean' and 'sum' "
    "losses form them in the forward; use reduction='none' and reduce it yourself for "
    "higher-order gradients of the loss")


class _FusedSigmoid(torch.autograd.Function):
    """The "mean"/"sum" sigmoid loss of `infcl::inf_sigmoid_fused` under `torch.compile`: the
    gradients are formed with the loss, in one sweep over the tiles instead of two, and the
    backward scales them by the incoming gradient (in fp32, rounded once: `infcl::scaled`).
    Not twice differentiable: `create_graph=True` raises instead of dropping the second-order
    terms. Eager mode takes `_Held` instead."""

    @staticmethod
    def forward(ctx, q, k, s, b, y, mean, precision):
        total, dq, dk, ds, db = torch.ops.infcl.inf_sigmoid_fused(q, k, s, b, y, mean, precision)
        ctx.save_for_backward(dq, dk, ds, db)
        return total / q.shape[0] if mean else total

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the held gradients carry no graph
            raise RuntimeError(NOT_TWICE.format(name="inf_sigmoid_loss"))
        dq, dk, ds, db = ctx.saved_tensors
        scaled = torch.ops.infcl.scaled
        return scaled(dq, g), scaled(dk, g), g * ds, g * db, None, None, None


Sweep = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]
"""`sweep(g, *tensors) -> (loss, gradients)`: the loss and the gradients of its differentiable
inputs (the first ones of `tensors`) for an incoming gradient g (None: 1)."""


class _Held(torch.autograd.Function):
    """A "mean" or "sum" loss in eager mode whose gradients come from the same sweep as the loss
    (`sweep(None, *tensors)`: the loss and, for an incoming gradient of 1, the gradients of
    the first `n_grads` tensors; the rest, labels and masks, take none).

    The backward scales the held gradients in place by the incoming gradient (fp32, rounded
    once) and lets them go, so that autograd takes them as the inputs' `.grad` without a copy:
    the gradients are never held twice. A second backward over a retained graph finds them
    gone and sweeps again for its own incoming gradient. The inputs are saved as autograd saves
    any (released after the backward; modified in place in between, the backward raises). The
    launchers are called straight, not through the dispatcher: at small B the dispatcher and
    the autograd glue of the ops cost more host time than the kernels take (compiled graphs
    use the ops). `create_graph=True` raises: the held gradients carry no graph."""

    @staticmethod
    def forward(ctx, sweep: Sweep, name: str, n_grads: int, *tensors: Tensor | None) -> Tensor:
        with torch.autocast(tensors[0].device.type, enabled=False):  # the sweeps chose dtypes
            loss, ctx.held = sweep(None, *tensors)
        ctx.sweep, ctx.name, ctx.n_grads = sweep, name, n_grads
        ctx.save_for_backward(*tensors)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(NOT_TWICE.format(name=ctx.name))
        tensors = ctx.saved_tensors  # checks that no input changed in place since the forward
        held, ctx.held = ctx.held, None
        if held is None:  # a retained graph, backward again
            with torch.autocast(tensors[0].device.type, enabled=False):
                grads = ctx.sweep(g, *tensors)[1]
        else:
            dq, dk, *scalars = held  # the feature gradients first, then 0-dim ones
            grads = (*scale_pair_(dq, dk, g), *(x * g for x in scalars))
        return (None, None, None, *grads, *[None] * (len(tensors) - ctx.n_grads))


def _eager(*tensors: Tensor) -> bool:
    """Whether a call may run the launchers without the dispatcher: eager mode (not traced by
    `torch.compile`), no dispatch mode active (fake tensors, op logs) and plain tensors."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors))


def _held(block: str, reduction: str, *tensors: Tensor) -> bool:
    """Whether a loss on this device forms its gradients with the loss (`_Held`, or under
    compile the sigmoid's `_FusedSigmoid`): Triton tiles, a scalar loss, a gradient wanted
    (without one the forward alone is a third of the work), and bf16 or fp32 features. fp16
    keeps two sweeps: gradients formed for an incoming gradient of 1 would sit in fp16's
    subnormals and overflow under a loss scale, where the two-sweep backward scales dS by the
    real incoming gradient first."""
    return (block == "inf" and reduction != "none" and tensors[0].dtype != torch.float16
            and torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _row_weight(g: Tensor | None, w: float | Tensor, m: int, device: torch.device) -> Tensor:
    """The row gradient [m] `g * w` of a loss whose rows weigh `w` (a number: a stride-0 view
    of one element; a tensor [m]), for an incoming gradient g (None: 1)."""
    if isinstance(w, Tensor):
        return w if g is None else w * g
    one = torch.full((1,), w, dtype=torch.float32, device=device)
    return (one if g is None else one * g).expand(m)


def _softmax_sweep(symmetric: bool, reduction: str, precision: str) -> Sweep:
    """The softmax loss and its dq, dk, dscale from the Triton launchers: the statistics, then
    the backward's dS and GEMMs for the loss's own row weights (times g when given).
    `sweep(g, q, k, s, y, valid)`."""

    def sweep(g: Tensor | None, q: Tensor, k: Tensor, s: Tensor, y: Tensor,
              valid: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        m, dev = q.shape[0], q.device
        row, col, pos = lse_fwd(q, k, s, y, 0, symmetric, precision)
        w: float | Tensor = 1.0 / m if reduction == "mean" else 1.0
        if symmetric:
            w = 0.5 * w
        elif valid is not None:  # labels: the ignored rows weigh nothing and leave the count
            w = valid.float()
            if reduction == "mean":  # all ignored: the loss is NaN (0 / 0), the gradients 0
                w = w / valid.sum().clamp_min(1)
        g_row = _row_weight(g, w, m, dev)
        g_pos = _row_weight(g, -2 * w if symmetric else -w, m, dev)
        g_col = g_row if symmetric else col  # col is empty unless symmetric
        dq, dk, dscale = ds_bwd(q, k, s, y, 0, row, col, g_row, g_col, g_pos, precision)
        return assemble(row, col, pos, valid, symmetric, reduction), (dq, dk, dscale)

    return sweep


def _sigmoid_sweep(reduction: str, precision: str) -> Sweep:
    """The sigmoid loss and its dq, dk, dscale, dbias from one sweep of the Triton launcher.
    `sweep(g, q, k, s, b, y)`."""

    def sweep(g: Tensor | None, q: Tensor, k: Tensor, s: Tensor, b: Tensor,
              y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        m = q.shape[0]
        unit = 1.0 / m if reduction == "mean" else 1.0
        *grads, total = sigmoid_ds_bwd(
            q, k, s, b, y, 0, _row_weight(g, unit, m, q.device), precision, with_loss=True
        )
        return (total / m if reduction == "mean" else total), tuple(grads)

    return sweep


def sigmoid_loss(
    q: Tensor, k: Tensor, scale: float | Tensor, bias: float | Tensor, labels: Tensor | None,
    reduction: str, *, block: str, group: dist.ProcessGroup | None = None, chunk_size: int = 0,
    precision: str | None = None,
) -> Tensor:
    """The sigmoid loss through block `block`, on this device or around `group`'s ring; the
    prologue (autocast, scale and bias, targets) and epilogue (reduction) of every sigmoid loss."""
    q, k, precision = _prologue(q, k, precision)
    s, b = scale_tensor(scale, q), scale_tensor(bias, q)
    if group_size(group) > 1:
        diagonal = labels is None
        y = q.new_empty(0, dtype=torch.long) if diagonal else labels
        per, _ = ring_sigmoid_fwd(
            q, k, s, b, y, diagonal, group.group_name, block, chunk_size, precision
        )
    else:
        eager = _eager(q, k, s, b)
        if labels is None:
            y = torch.arange(q.shape[0], device=q.device)
        else:
            y = (check_targets if eager else targets)(labels, k.shape[0], NO_IGNORE)
        if _held(block, reduction, q, k, s, b):
            if eager:
                sweep = _sigmoid_sweep(reduction, precision)
                return _Held.apply(sweep, "inf_sigmoid_loss", 4, q, k, s, b, y)
            return _FusedSigmoid.apply(q, k, s, b, y, reduction == "mean", precision)
        fwd = getattr(torch.ops.infcl, f"{block}_sigmoid_fwd")
        per = fwd(q, k, s, b, y, 0, chunk_size, precision)
    if reduction == "none":
        return per
    total = per.to(LSE_DTYPE).sum()  # rounded once, as the softmax losses' `assemble`
    return (total if reduction == "sum" else total / per.shape[0]).to(per.dtype)
