"""The gated MLP's activations. SwiGLU goes through kernels.silu_and_mul (fused into the one-row GEMV on CUDA);
the others are plain torch on every device, as cheap as one elementwise kernel beside the matmuls."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster import kernels

ACTIVATIONS = ("silu", "gelu_tanh")


def gated(x: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2N] = [gate | up] -> act(gate) * up."""
    if act == "silu":
        return kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    if act == "gelu_tanh":  # Gemma's GeGLU: transformers' gelu_pytorch_tanh
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"MLP activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
