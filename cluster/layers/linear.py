"""Linear layers over tensor-parallel ranks. Converted shards are already sliced per rank, so these only
need the per-rank shapes and the communication: column-parallel needs none, row-parallel all-reduces."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.layers.parallel import all_reduce


class ColumnLinear(nn.Module):
    """Output features split over ranks (fused qkv, fused gate/up): each rank computes its own slice."""

    def __init__(self, in_features: int, out_features_per_rank: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features_per_rank, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features_per_rank), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowLinear(nn.Module):
    """Input features split over ranks (o_proj, down_proj): partial sums all-reduced into the full output."""

    def __init__(self, in_features_per_rank: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features_per_rank), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight))
