"""The MLP's activations, by the names ModelConfig.hidden_act uses. A gated MLP's goes through kernels.act_and_mul
(SwiGLU and GeGLU fused into the one-row GEMV on CUDA; see linear.ColumnLinear's `gated`); a plain MLP's (Falcon:
exact gelu) is one torch elementwise op beside the matmuls."""
from __future__ import annotations

import torch

from cluster.kernels import reference


def check(name: str) -> None:
    if name not in reference.ACTIVATIONS:
        raise ValueError(f"MLP activation {name!r} is not supported; supported: {', '.join(reference.ACTIVATIONS)}")


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """A plain (ungated) MLP's activation."""
    check(name)
    return reference.ACTIVATIONS[name](x)
