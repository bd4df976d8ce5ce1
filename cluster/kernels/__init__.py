"""Kernel entry points: Triton on CUDA tensors, the plain-torch reference elsewhere (CPU)."""
from cluster.kernels.reference import (  # noqa: F401
    apply_rotary,
    paged_attention,
    paged_decode_attention,
    rms_norm,
    silu_and_mul,
    store_kvcache,
)
