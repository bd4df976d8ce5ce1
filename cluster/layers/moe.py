"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, DeepSeek) over tensor-parallel ranks.

Every rank holds every expert, each sliced along its FFN width like a dense MLP, so one all-reduce per layer
finishes the experts and the shared expert together; the router is replicated and picks the same experts on
every rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster import kernels
from cluster.layers.linear import ColumnLinear
from cluster.layers.parallel import all_reduce
from cluster.layers.routing import Routing


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts and their weights (softmax in fp32 over all experts, then top-k, as transformers
    does; Mixtral renormalizes the k weights, Qwen2-MoE only with norm_topk_prob)."""
    probs = torch.softmax(F.linear(x, gate_weight).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    """Router + experts (+ a shared expert: Qwen2-MoE's gated by a sigmoid, DeepSeek-MoE's not). Engine names: gate.weight [E, H],
    w13 [E, 2 * ffn/tp, H] (gate rows then up rows), w2 [E, H, ffn/tp], shared_expert.{gate_up_proj,down_proj}.weight,
    shared_expert_gate.weight [1, H]. routing: DeepSeek-V2/V3's (cluster/layers/routing.py) instead of route(); with
    its correction bias, e_score_correction_bias [E]."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, ffn_per_rank: int, normalize: bool,
                 shared_ffn_per_rank: int = 0, shared_gate: bool = True, routing: Routing | None = None):
        super().__init__()
        self.top_k, self.normalize, self.routing = top_k, normalize, routing
        self.gate = nn.Linear(hidden, num_experts, bias=False).requires_grad_(False)
        if routing is not None and routing.bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_per_rank, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn_per_rank), requires_grad=False)
        self.shared_expert: nn.ModuleDict | None = None
        if shared_ffn_per_rank:
            self.shared_expert = nn.ModuleDict({  # a dense gated MLP whose down_proj's partial sum is not reduced
                "gate_up_proj": ColumnLinear(hidden, 2 * shared_ffn_per_rank),
                "down_proj": ColumnLinear(shared_ffn_per_rank, hidden)})
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False).requires_grad_(False) if shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is None:
            weights, experts = route(x, self.gate.weight, self.top_k, self.normalize)
        else:
            weights, experts = self.routing(x, self.gate.weight, getattr(self, "e_score_correction_bias", None))
        out = kernels.moe_experts(x, self.w13, self.w2, weights, experts)
        if self.shared_expert is not None:  # a partial sum over this rank's FFN slice, like the experts'
            h = self.shared_expert["down_proj"](self.shared_expert["gate_up_proj"](x, gated=True))
            out = out + (h if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x)) * h)
        return all_reduce(out)
