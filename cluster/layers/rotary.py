"""Rotary embedding from a stored inverse-frequency vector, so every rope scaling (Llama 3, linear, YaRN...) is
computed once at conversion time by transformers and the engine only needs the resulting frequencies."""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, attention_scaling: float = 1.0):
        super().__init__()
        self.max_positions = max_positions
        self.attention_scaling = attention_scaling
        self.inv_freq = nn.Parameter(torch.empty(head_dim // 2), requires_grad=False)
        self.cos_sin: torch.Tensor | None = None
        self.mrope_section: list[int] = []  # M-RoPE (Qwen2-VL): frequencies per position id (cluster/layers/mrope.py)

    def build_cache(self, max_positions: int | None = None) -> None:
        """Precompute [max_pos, head_dim] = [cos | sin] in fp32 on the weights' device (after loading)."""
        inv = self.inv_freq.float()
        t = torch.arange(max_positions or self.max_positions, dtype=torch.float32, device=inv.device)
        freqs = torch.outer(t, inv)
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling

    def per_token(self, positions3: torch.Tensor) -> "TokenRotary":
        """For a step with M-RoPE position ids [3, T]: a table of one cos/sin row per token, read at arange(T)."""
        from cluster.layers.mrope import mrope_table

        return TokenRotary(mrope_table(self.cos_sin, positions3, self.mrope_section))


class TokenRotary:
    """What the attention layers read of a Rotary (its cos/sin table), one row per token of a step."""

    def __init__(self, cos_sin: torch.Tensor):
        self.cos_sin = cos_sin
