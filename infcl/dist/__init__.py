"""The ring across ranks: `torch.library` ops that run a whole ring, and the group helpers."""

from infcl.dist.ring import *  # noqa: F403  (the ring module is this package's whole surface)
from infcl.dist.ring import __all__ as __all__
