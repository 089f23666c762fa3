"""Triton kernels registered as `torch.library` ops in the `infcl::` namespace."""
