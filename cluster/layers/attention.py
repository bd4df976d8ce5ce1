"""Attention over the paged KV cache: store this step's K/V into their slots, then attend over the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cluster import kernels
from cluster.layers.rotary import Rotary


@dataclass
class AttnMetadata:
    """What every layer's attention needs about the step; built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, cached tokens after this step
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    max_context_len: int
    decode_only: bool  # every sequence has exactly one new token


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 softcap: float = 0.0, window: int = 0, alibi: bool = False):
        """scale: the softmax scale, when not head_dim ** -0.5 (a head padded to a power of two keeps its own).
        softcap: attention-logit soft-capping (0: off); window: this layer's sliding window (0: none); alibi: ALiBi
        position biases, this rank's heads' fp32 slopes loaded with the weights (`alibi_slopes`)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale or head_dim ** -0.5
        self.softcap, self.window = softcap, window
        self.alibi_slopes = nn.Parameter(torch.empty(num_heads), requires_grad=False) if alibi else None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale: torch.Tensor | None = None  # quantized cache (quant_policy 8 or 4): each row's scale(s)
        self.v_scale: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata,
                positions: torch.Tensor | None = None, rotary: Rotary | None = None) -> torch.Tensor:
        """With `rotary`, q and k are rotated at `positions` first, in the same kernel as the K/V store."""
        if rotary is not None:
            q = kernels.rotary_and_store(q, k, v, positions, rotary.cos_sin, self.k_cache, self.v_cache,
                                         meta.slot_mapping, self.k_scale, self.v_scale)
        else:
            kernels.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if meta.decode_only:
            return kernels.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                                  meta.context_lens, self.scale, meta.max_context_len,
                                                  self.k_scale, self.v_scale, self.softcap, self.window,
                                                  self.alibi_slopes)
        return kernels.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                       meta.cu_seqlens_q, self.scale, self.k_scale, self.v_scale, self.softcap,
                                       self.window, self.alibi_slopes)
