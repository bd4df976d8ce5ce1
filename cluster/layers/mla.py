"""Multi-head latent attention (DeepSeek-V2/V3) over the paged cache, in the absorbed form.

The cache holds what DeepSeek's kv_a_proj_with_mqa makes of each token: the latent c (kv_lora_rank values, after
kv_a_layernorm) and one rope key shared by all heads (qk_rope_head_dim, rotated), one row per token and layer, the
same on every tensor-parallel rank. Per-head K and V are never formed: kv_b_proj's rows for a head are W_UK
[nope, L] and W_UV [v, L], so q_nope . (W_UK c) = (q_nope W_UK) . c, and the head's output W_UV (sum p c). The query
becomes [q_nope W_UK | q_rope] and attention is multi-query over the cache rows (cluster/kernels/mla*.py); prefill
and decode both use this form. Under tensor parallelism each rank holds its heads' rows of q_proj / q_b_proj and
kv_b_proj and its columns of o_proj (all-reduced); q_a_proj, kv_a_proj_with_mqa and the two norms are replicated.

Engine names (under self_attn.): q_proj.weight, or q_a_proj.weight, q_a_layernorm.weight, q_b_proj.weight;
kv_a_proj_with_mqa.weight, kv_a_layernorm.weight, kv_b_proj.weight, o_proj.weight (see cluster/convert/mla.py)."""
from __future__ import annotations

import torch
from torch import nn

from cluster import kernels
from cluster.kernels.reference import apply_rotary
from cluster.layers.attention import AttnMetadata
from cluster.layers.linear import ColumnLinear, RowLinear
from cluster.layers.norm import RMSNorm
from cluster.layers.rotary import Rotary
from cluster.models.config import ModelConfig

LORA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: DeepSeek's RMSNorm default, not rms_norm_eps


def latent_dim(cfg: ModelConfig) -> int:
    """Values a token's cache row holds in an MLA layer: the latent, then the shared rope key."""
    return cfg.kv_lora_rank + cfg.head_dim


class LatentCache(nn.Module):
    """One layer's paged latent cache [num_blocks, block_size, 1, L + R], set by the model runner. k_cache and
    v_cache are the one tensor (the value is the key's first L dims), so the runner's init/free treat it as
    PagedAttention's."""

    def __init__(self, kv_lora_rank: int, scale: float):
        super().__init__()
        self.kv_lora_rank, self.scale = kv_lora_rank, scale
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = None  # no quantized latent cache

    def forward(self, q: torch.Tensor, latent: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Store latent [T, L + R], then attend with q [T, H, L + R] -> the heads' latent outputs [T, H, L]."""
        kernels.store_latent(latent, self.k_cache, meta.slot_mapping)
        if meta.decode_only:
            return kernels.mla_decode_attention(q, self.k_cache, meta.block_tables, meta.context_lens, self.scale,
                                                self.kv_lora_rank, meta.max_context_len)
        return kernels.mla_attention(q, self.k_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                                     self.scale, self.kv_lora_rank)


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        self.heads = cfg.num_heads // tp
        self.nope, self.rope, self.v, self.lora = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_out = self.heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.q_a_proj = ColumnLinear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = ColumnLinear(cfg.q_lora_rank, q_out)
        else:
            self.q_proj = ColumnLinear(cfg.hidden_size, q_out)
        self.kv_a_proj_with_mqa = ColumnLinear(cfg.hidden_size, self.lora + self.rope)
        self.kv_a_layernorm = RMSNorm(self.lora, LORA_NORM_EPS)
        # read as W_UK / W_UV per head, never multiplied as a linear (so not packed on the CPU)
        self.kv_b_proj = nn.Linear(self.lora, self.heads * (self.nope + self.v), bias=False).requires_grad_(False)
        self.o_proj = RowLinear(self.heads * self.v, cfg.hidden_size)
        self.attn = LatentCache(self.lora, cfg.attn_scale)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttnMetadata, rotary: Rotary) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(t, self.heads, -1).split([self.nope, self.rope], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.lora, self.rope], dim=-1)
        q_rope, k_rope = apply_rotary(q_rope, k_rope.unsqueeze(1), positions, rotary.cos_sin)
        latent = torch.cat([self.kv_a_layernorm(c.contiguous()), k_rope.squeeze(1)], dim=-1)
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v, self.lora)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :self.nope]).transpose(0, 1)  # [T, H, L]: q_nope W_UK
        o_lat = self.attn(torch.cat([q_lat, q_rope], dim=-1), latent, meta)  # [T, H, L]
        o = torch.bmm(o_lat.transpose(0, 1), w[:, self.nope:].transpose(1, 2))  # [H, T, v]: W_UV per head
        return self.o_proj(o.transpose(0, 1).reshape(t, self.heads * self.v))
