"""DeepSeek-V2/V3 expert routing: which k experts each token goes to and with what weight.

DeepSeek-V2 scores by softmax and picks the top k (greedy), or first the topk_group groups whose best expert scores
highest, then the top k inside them (group_limited_greedy). DeepSeek-V3 scores by sigmoid and chooses by score plus
a learnt per-expert bias (e_score_correction_bias), groups ranked by the sum of their two best (noaux_tc); the
weights are the unbiased scores of the chosen experts. Both may renormalize the k weights (norm_topk_prob) and then
scale them (routed_scaling_factor). Everything runs in fp32, as transformers and DeepSeek's code do; no host sync,
so decode steps with it are captured in CUDA graphs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    top_k: int
    method: str = "greedy"
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    normalize: bool = False
    scale: float = 1.0
    bias: bool = False  # a correction bias is added to the scores for the choice (noaux_tc)

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.scoring not in SCORING:
            raise ValueError(f"routing {self.method!r} / {self.scoring!r} is not supported; supported: "
                             f"{', '.join(METHODS)} with {' or '.join(SCORING)} scores")

    def __call__(self, x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, experts [T, k]) for tokens x [T, H] and the router's weight [E, H]."""
        logits = F.linear(x.float(), gate_weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if bias is None else scores + bias.float()
        if self.method != "greedy" and self.n_group > 1:
            choice = self._in_best_groups(choice)
        experts = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, experts

    def _in_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice with every expert outside the topk_group best groups at -inf."""
        t, e = choice.shape
        groups = choice.view(t, self.n_group, e // self.n_group)
        if self.method == "group_limited_greedy":  # a group ranks by its best expert
            group_scores = groups.max(dim=-1).values
        else:  # noaux_tc: by the sum of its two best
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        best = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
