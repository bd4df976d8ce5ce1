"""The decoder's norms. Each takes an optional residual and then returns (norm(x + residual), x + residual), so
the residual add rides along with the norm (one kernel on the GPU for RMSNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, pre: RMSNorm | None = None):
        """With `residual`: returns (norm(x + residual), x + residual), fused in one kernel on the GPU; with `pre`
        too (a sandwich norm of the same eps), x is pre(x) first, in the same kernel."""
        if pre is None:
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        assert pre.eps == self.eps and residual is not None
        return kernels.rms_norm(x, self.weight, self.eps, residual, pre.weight)


class LayerNorm(nn.Module):
    """LayerNorm (Falcon's with a bias, Dbrx's without) under RMSNorm's residual contract, in plain torch: one
    fused op on every device, as transformers runs it."""

    def __init__(self, hidden: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, pre: RMSNorm | None = None):
        if pre is not None:
            x = pre(x)
        if residual is not None:
            x = x + residual
            residual = x
        out = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return out if residual is None else (out, residual)


NORMS = ("rms", "layer")


def make_norm(kind: str, hidden: int, eps: float, bias: bool = False) -> nn.Module:
    if kind == "rms":
        return RMSNorm(hidden, eps)
    if kind == "layer":
        return LayerNorm(hidden, eps, bias)
    raise ValueError(f"norm {kind!r} is not supported; supported: {', '.join(NORMS)}")
