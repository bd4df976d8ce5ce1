"""Plain-torch multi-head latent attention (MLA) over the paged latent cache: the CPU path and the Triton kernels'
ground truth.

An MLA layer's cache holds one row of kv_lora_rank + qk_rope_head_dim values per token (the normed latent c, then
the rotated shared rope key): cache [num_blocks, block_size, 1, L + R]. With kv_b_proj absorbed into the query
(q_lat = q_nope @ W_UK per head) attention is multi-query attention with one KV head: the key is the whole row, the
value its first L dims (c), and each head's latent output goes through W_UV afterwards (cluster/layers/mla.py).
So these are reference.py's paged attention with that one head as both K and V, the output's rope dims dropped.
"""
from __future__ import annotations

import torch

from cluster.kernels import reference


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's rows latent [T, L + R] into their slots of cache [nb, bs, 1, L + R] (slot -1 skips)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        latent, slot_mapping = latent[keep], slot_mapping[keep]
    nb, bs, _, d = cache.shape
    cache.view(nb * bs, d).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """Causal attention of q [T, H, L + R] ([q_lat | q_rope]) over each sequence's cached rows -> [T, H, v_dim]
    (v_dim = L: the latent output)."""
    return reference.paged_attention(q, cache, cache, block_tables, context_lens, cu_seqlens_q, scale)[..., :v_dim]


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, scale: float, v_dim: int,
                         max_context_len: int | None = None) -> torch.Tensor:
    """One query row per sequence, q [B, H, L + R] -> [B, H, v_dim]."""
    out = reference.paged_decode_attention(q, cache, cache, block_tables, context_lens, scale, max_context_len)
    return out[..., :v_dim]
