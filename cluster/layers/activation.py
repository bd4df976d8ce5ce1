"""The MLP's activations. The gated ones go through kernels.act_and_mul (SwiGLU and GeGLU fused into the one-row
GEMV on CUDA); elsewhere they are plain torch, one elementwise kernel beside the matmuls."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster import kernels

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """A plain (ungated) MLP's activation (Falcon: exact gelu)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"MLP activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")


def gated(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., 2N] = [gate | up] -> act(gate) * up (Gemma's GeGLU: gelu_tanh, transformers' gelu_pytorch_tanh)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"MLP activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return kernels.act_and_mul(x, name)
