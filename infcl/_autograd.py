"""Autograd glue shared by the block ops (`chunked_*`, `inf_*`).

A block forward op has the signature `(q, k, scale, labels, col_offset, want_col, extra)` and
returns `(row_lse, col_lse, pos)`; its backward op has the signature
`(q, k, scale, labels, col_offset, row_lse, col_lse, g_row, g_col, g_pos, extra)` and returns
`(dq, dk, dscale)`. `extra` is the op's own tuning argument (chunk size, matmul precision).
"""

from __future__ import annotations

import torch


def register_block_autograd(fwd_op, bwd_op) -> None:
    """Make `fwd_op` differentiable in q, k and scale through `bwd_op` (no double backward)."""

    def setup_context(ctx, inputs, output):
        q, k, scale, labels, col_offset, _want_col, extra = inputs
        row, col, _ = output
        ctx.save_for_backward(q, k, scale, labels, row, col)
        ctx.col_offset, ctx.extra = col_offset, extra

    def backward(ctx, g_row, g_col, g_pos):
        q, k, scale, labels, row, col = ctx.saved_tensors
        g_row = torch.zeros_like(row) if g_row is None else g_row
        g_col = torch.zeros_like(col) if g_col is None else g_col
        g_pos = torch.zeros_like(row) if g_pos is None else g_pos
        dq, dk, ds = bwd_op(
            q, k, scale, labels, ctx.col_offset, row, col, g_row, g_col, g_pos, ctx.extra
        )
        return dq, dk, ds, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
