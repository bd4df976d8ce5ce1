"""The Llama-shaped decoder every converted family runs as (cluster/convert/families.py), built from
tensor-parallel layers; what differs between families are ModelConfig's feature fields (per-head q/k norms, o_proj
bias, the MLP's activation, scaled embeddings, expert MLPs).

Parameter names are the engine format's names (see cluster/convert/hf.py); each rank builds its own slice."""
from __future__ import annotations

import functools

import torch
from torch import nn

from cluster.layers import activation
from cluster.layers.attention import AttnMetadata, PagedAttention
from cluster.layers.embedding import LMHead, VocabEmbedding
from cluster.layers.linear import ColumnLinear, RowLinear
from cluster.layers.mla import MLAAttention
from cluster.layers.moe import SparseMoE
from cluster.layers.norm import RMSNorm, make_norm
from cluster.layers.rotary import Rotary
from cluster.layers.routing import Routing
from cluster.models.config import ModelConfig


def shard_sizes(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Per-rank sizes; KV heads fewer than ranks are replicated (each rank keeps the head its q heads use)."""
    return {
        "heads": cfg.num_heads // tp,
        "kv_heads": max(1, cfg.num_kv_heads // tp),
        "ffn": cfg.intermediate_size // tp,
        "expert_ffn": cfg.moe_intermediate_size // tp,
        "shared_ffn": cfg.shared_expert_intermediate_size // tp,
        "vocab": -(-cfg.vocab_size // tp),
    }


@functools.cache
def embed_scale(scale: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(scale, dtype=dtype))


def softmax_scale(cfg: ModelConfig) -> float:
    """query_pre_attn_scalar ** -0.5 where the family sets it (Gemma 2 / 3), else the checkpoint head's own."""
    return (cfg.query_pre_attn_scalar or cfg.src_head_dim) ** -0.5


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, layer: int = 0):
        super().__init__()
        s = shard_sizes(cfg, tp)
        self.q_size = s["heads"] * cfg.head_dim
        self.kv_size = s["kv_heads"] * cfg.head_dim
        self.src_head_dim = cfg.src_head_dim  # o_proj reads these dims of each head (the rest are padding)
        group, fp8 = cfg.quant.get("group_size", 0), cfg.quant.get("method") == "fp8"
        self.qkv_proj = ColumnLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, group, fp8)
        self.o_proj = RowLinear(s["heads"] * cfg.src_head_dim, cfg.hidden_size, group, fp8, cfg.o_bias)
        self.attn = PagedAttention(s["heads"], s["kv_heads"], cfg.head_dim, softmax_scale(cfg),
                                   cfg.attn_logit_softcapping, cfg.window(layer), cfg.alibi)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's dims, before the rotary
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.clip = cfg.clip_qkv

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttnMetadata, rotary: Rotary) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        self.o_proj.prefetch(x.shape[0], "o")  # pulled into L2 during rotary and attention
        if self.clip:  # Dbrx
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        a = self.attn
        if hasattr(self, "q_norm"):
            q = self.q_norm(q.reshape(-1, a.head_dim))
            k = self.k_norm(k.reshape(-1, a.head_dim))
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        o = a(q, k, v, meta, positions, None if a.alibi_slopes is not None else rotary)  # ALiBi: no rotary
        if self.src_head_dim != a.head_dim:
            o = o[..., : self.src_head_dim]
        return self.o_proj(o.reshape(-1, a.num_heads * self.src_head_dim))


class LlamaMLP(nn.Module):
    """Gated ([gate; up] fused, column-parallel) or plain (up alone: Falcon); down row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        ffn = shard_sizes(cfg, tp)["ffn"]
        group, fp8 = cfg.quant.get("group_size", 0), cfg.quant.get("method") == "fp8"
        if cfg.gated_mlp:
            self.gate_up_proj = ColumnLinear(cfg.hidden_size, 2 * ffn, group=group, fp8=fp8)
        else:
            self.up_proj = ColumnLinear(cfg.hidden_size, ffn, group=group, fp8=fp8)
        self.down_proj = RowLinear(ffn, cfg.hidden_size, group, fp8)
        self.act, self.gated = cfg.hidden_act, cfg.gated_mlp
        activation.check(self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(activation.act(self.up_proj(x), self.act))
        # the activation-and-multiply inside the matmul where a kernel fuses it
        return self.down_proj(self.gate_up_proj(x, gated=True, act=self.act))


def make_mlp(cfg: ModelConfig, tp: int, layer: int) -> nn.Module:
    if not cfg.is_sparse(layer):
        return LlamaMLP(cfg, tp)
    s = shard_sizes(cfg, tp)
    routing = None if not cfg.topk_method else Routing(  # DeepSeek-V2/V3
        cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
        cfg.routed_scaling_factor, cfg.router_bias)
    return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, s["expert_ffn"], cfg.norm_topk_prob,
                     s["shared_ffn"], cfg.shared_expert_gate, routing)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, layer: int = 0):
        super().__init__()
        norm = functools.partial(make_norm, cfg.norm, cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_bias)
        self.input_layernorm = norm()
        self.self_attn = MLAAttention(cfg, tp) if cfg.kv_lora_rank else LlamaAttention(cfg, tp, layer)
        self.parallel = cfg.parallel_attn
        if not self.parallel or cfg.mlp_norm:  # in parallel: the MLP's own norm, of the same input as ln1's
            self.post_attention_layernorm = norm()
        self.mlp = make_mlp(cfg, tp, layer)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # GLM-4-0414, Gemma 2 / 3: each block's output normed before it joins the residual
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, meta, rotary, pending: RMSNorm | None = None):
        """Returns (the block's output, the residual). With sandwich norms the output is not yet normed by
        post_mlp_layernorm: that norm rides in the next norm's kernel (`pending`), as post_self_attn_layernorm
        rides in post_attention_layernorm's."""
        if isinstance(self.self_attn, LlamaAttention):  # during the input norm
            self.self_attn.qkv_proj.prefetch(x.shape[0], "qkv")
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual, pending)
        if self.parallel:  # Falcon: x + attn(ln1(x)) + mlp(ln2(x) or ln1(x))
            h = self.post_attention_layernorm(residual) if hasattr(self, "post_attention_layernorm") else x
            return self.self_attn(positions, x, meta, rotary) + self.mlp(h), residual
        x = self.self_attn(positions, x, meta, rotary)
        if isinstance(self.mlp, LlamaMLP) and self.mlp.gated:  # during the post-attention norm
            self.mlp.gate_up_proj.prefetch(x.shape[0], "gate_up", parts=2)
        x, residual = self.post_attention_layernorm(x, residual, self.post_self_attn_layernorm if self.sandwich
                                                    else None)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.embed_scale = cfg.embed_scale
        s = shard_sizes(cfg, tp)
        self.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_attention_scaling)
        self.rotary.mrope_section = list(cfg.vision.get("mrope_section") or [])
        if cfg.local_rope:  # Gemma 3: the windowed layers' own frequencies (another rope base)
            self.rotary_local = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.local_rope_attention_scaling)
        self.final_softcap = cfg.final_logit_softcapping
        self.embed_tokens = VocabEmbedding(s["vocab"], cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_bias)
        self.lm_head = LMHead(s["vocab"], cfg.hidden_size, cfg.vocab_size,
                              tied=self.embed_tokens if cfg.tie_word_embeddings else None)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def rotaries(self) -> list[Rotary]:
        """Every rotary table (the model runner builds their cos/sin caches)."""
        return [self.rotary] + ([self.rotary_local] if hasattr(self, "rotary_local") else [])

    def _rotary_of(self, layer: LlamaDecoderLayer) -> Rotary:
        return self.rotary_local if hasattr(self, "rotary_local") and layer.self_attn.attn.window else self.rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                embeds: torch.Tensor | None = None, embed_rows: torch.Tensor | None = None,
                mrope: torch.Tensor | None = None) -> torch.Tensor:
        """embeds/embed_rows: image embeddings (LLaVA, Qwen2-VL) that take the place of the image tokens'
        embeddings. mrope: [3, T] M-RoPE position ids (Qwen2-VL) of a step with image tokens; `positions` then
        goes unread."""
        rotary = self.rotary
        if mrope is not None:
            rotary = self.rotary.per_token(mrope)
            positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:  # Gemma: sqrt(hidden), rounded to the activations' dtype as transformers does
            x = x * embed_scale(self.embed_scale, x.dtype)  # a Python float: nothing copied inside a CUDA graph
        if embeds is not None:
            x[embed_rows] = embeds.to(x.dtype)
        residual = pending = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta, rotary if mrope is not None else self._rotary_of(layer),
                                pending)
            pending = layer.post_mlp_layernorm if layer.sandwich else None
        x, _ = self.norm(x, residual, pending)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap:  # Gemma 2: cap * tanh(logits / cap), in the logits' dtype as transformers does
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
