"""infcl: exact contrastive (InfoNCE / CLIP) losses at batch sizes that no longer fit as B x B."""

from infcl.chunked import chunked_loss, chunked_sigmoid_loss
from infcl.compat import ClipLoss, SigLipLoss
from infcl.gradcache import grad_cache_step
from infcl.inf import inf_loss, inf_sigmoid_loss
from infcl.naive import naive_loss, naive_sigmoid_loss
from infcl.ring import ring_loss, ring_sigmoid_loss

__all__ = [
    "naive_loss",
    "chunked_loss",
    "ring_loss",
    "inf_loss",
    "naive_sigmoid_loss",
    "chunked_sigmoid_loss",
    "ring_sigmoid_loss",
    "inf_sigmoid_loss",
    "ClipLoss",
    "SigLipLoss",
    "grad_cache_step",
]
__version__ = "0.1.0"
