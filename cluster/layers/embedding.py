"""Vocabulary-parallel embedding and LM head: each rank holds rows [rank*V/tp, (rank+1)*V/tp) of the padded vocab."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.layers.linear import PackableLinear, matmul
from cluster.layers.parallel import all_gather_last_dim, all_reduce, tp


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_per_rank: int, hidden: int):
        super().__init__()
        self.vocab_per_rank = vocab_per_rank
        self.weight = nn.Parameter(torch.empty(vocab_per_rank, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        state = tp()
        if state.size == 1:
            return F.embedding(ids, self.weight)
        start = state.rank * self.vocab_per_rank
        local = ids - start
        inside = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class LMHead(PackableLinear):
    """Logits over the full (unpadded) vocab on every rank; shares the embedding's weight when tied."""

    def __init__(self, vocab_per_rank: int, hidden: int, vocab_size: int, tied: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self._tied = [tied] if tied is not None else []  # a list, so the shared weight is not a second parameter
        self.weight = None if tied is not None else nn.Parameter(torch.empty(vocab_per_rank, hidden), requires_grad=False)

    def matmul_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(matmul(hidden, self.matmul_weight(), None, self.packed))[..., : self.vocab_size]
