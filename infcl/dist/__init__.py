"""The ring across ranks: `torch.library` ops that run a whole ring, and the group helpers."""

from infcl.dist.ring import (
    group_name,
    register_block,
    resolve_group,
    ring_bwd,
    ring_fwd,
    ring_loss_impl,
    ring_pieces,
    validate_shard,
)

__all__ = [
    "group_name",
    "register_block",
    "resolve_group",
    "ring_bwd",
    "ring_fwd",
    "ring_loss_impl",
    "ring_pieces",
    "validate_shard",
]
