"""The engine's own model description, written next to converted weights; independent of transformers' classes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    architecture: str  # "llama": every family cluster/convert/families.py reads is converted to it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v biases
    o_bias: bool = False  # o_proj bias
    norm_bias: bool = False  # LayerNorm biases (norm == "layer")
    rope_attention_scaling: float = 1.0  # multiplies cos/sin (YaRN-style scalings); inv_freq is stored in the weights
    # family features (cluster/convert/families.py); the defaults are Llama's
    real_head_dim: int = 0  # the checkpoint's head_dim when head_dim was padded to a power of two (0: not padded)
    rotary_dim: int = 0  # dims of a head the checkpoint rotates (0: all); at conversion, cluster/convert/head_layout.py
    rope_interleaved: bool = False  # the checkpoint rotates pairs (2j, 2j + 1); conversion reorders them
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (Qwen3)
    hidden_act: str = "silu"  # the MLP's activation: silu (SwiGLU), gelu_tanh (Gemma's GeGLU), gelu (Falcon)
    gated_mlp: bool = True  # act(gate) * up; False: act(up) (Falcon's dense_h_to_4h)
    norm: str = "rms"  # "rms", or "layer": LayerNorm (Falcon with norm_bias, Dbrx without); eps is rms_norm_eps
    parallel_attn: bool = False  # attention and MLP both read the layer's input, their sums join the residual (Falcon)
    mlp_norm: bool = True  # with parallel_attn: the MLP has its own norm (Falcon-40B's ln_mlp), else it shares ln1's
    clip_qkv: float = 0.0  # q, k, v clamped to +-clip_qkv (Dbrx); 0: not clamped
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    sandwich_norms: bool = False  # RMSNorm on the attention's and the MLP's outputs too (GLM-4-0414, Gemma 2 / 3)
    query_pre_attn_scalar: float = 0.0  # softmax scale query_pre_attn_scalar ** -0.5 (Gemma 2 / 3); 0: src_head_dim's
    attn_logit_softcapping: float = 0.0  # scores become cap * tanh(scores / cap) before the mask (Gemma 2); 0: off
    final_logit_softcapping: float = 0.0  # the LM head's logits likewise (Gemma 2); 0: off
    sliding_window: int = 0  # keys a query of a windowed layer sees, itself included (q - k < window); 0: none
    sliding_layers: list[int] = field(default_factory=list)  # the layers with that window (Gemma 2: every other)
    local_rope: bool = False  # the windowed layers rotate by their own table, rotary_local.inv_freq (Gemma 3)
    local_rope_attention_scaling: float = 1.0  # that table's rope_attention_scaling
    alibi: bool = False  # ALiBi instead of a rotary: scores + slope_h * (key - query) (Baichuan-13B); slopes stored
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    dtype: str = "float32"
    tp: int = 1
    source: str = ""  # where the checkpoint came from
    hf_model_type: str = ""
    # mixture of experts (Mixtral, Qwen2-MoE); num_experts == 0: every layer has a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # an always-on expert (Qwen2-MoE, DeepSeek-MoE: all shared ones as one)
    shared_expert_gate: bool = True  # Qwen2-MoE gates it by a sigmoid; DeepSeek-MoE adds it as it is
    sparse_layers: list[int] = field(default_factory=list)  # the layers whose MLP is the experts
    # DeepSeek-V2/V3 routing (cluster/layers/routing.py); topk_method "": route() of cluster/layers/moe.py
    topk_method: str = ""  # greedy, group_limited_greedy (V2), noaux_tc (V3: choice by score + correction bias)
    scoring_func: str = "softmax"  # or sigmoid (V3)
    n_group: int = 1  # experts in n_group groups; only the topk_group best groups are chosen from
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this
    router_bias: bool = False  # e_score_correction_bias (V3): added to the scores for the choice only
    # multi-head latent attention (DeepSeek-V2/V3, cluster/layers/mla.py); kv_lora_rank 0: not MLA. The paged cache
    # holds one kv_lora_rank + qk_rope_head_dim row a token; head_dim is qk_rope_head_dim (the rotary's width)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: q_proj from the hidden state (V2-Lite); else q_a_proj, its norm, q_b_proj
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    attn_scale: float = 0.0  # MLA's softmax scale: (nope + rope dims) ** -0.5, times YaRN's mscale ** 2
    # vision-language models: the vision tower's HF config, the image token and how many it stands for (LLaVA,
    # cluster/convert/llava.py); kind "qwen2_vl" / "qwen2_5_vl": also mrope_section (cluster/convert/qwen2_vl.py)
    vision: dict = field(default_factory=dict)
    # 4-bit weights (AWQ): {"method": "awq", "bits": 4, "group_size": G}; empty: weights in `dtype`
    quant: dict = field(default_factory=dict)

    @property
    def src_head_dim(self) -> int:
        """The checkpoint's head_dim (what o_proj reads per head, and what sets the softmax scale)."""
        return self.real_head_dim or self.head_dim

    def window(self, layer: int) -> int:
        """The layer's sliding window (0: it attends to the whole context)."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def is_sparse(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in self.sparse_layers

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_tp(self, tp: int) -> None:
        """Fail early, naming the sizes that work, when heads don't split over `tp` ranks."""
        valid = [n for n in range(1, self.num_heads + 1)
                 if self.num_heads % n == 0 and (self.num_kv_heads % n == 0 or n % self.num_kv_heads == 0)
                 and all(f % n == 0 for f in self.ffn_widths())
                 and self._groups_split(n)]
        if tp not in valid:
            raise ValueError(f"tp={tp} does not divide this model ({self.num_heads} heads, {self.num_kv_heads} KV heads, "
                             f"FFN {'/'.join(map(str, self.ffn_widths()))}); valid tp sizes: {valid}")

    def _groups_split(self, n: int) -> bool:
        """4-bit weights: each rank's share of o_proj's and down_proj's input is whole groups."""
        g = self.quant.get("group_size", 0)
        return not g or all((w // n) % g == 0 for w in (self.num_heads * self.src_head_dim, self.intermediate_size))

    def ffn_widths(self) -> list[int]:
        """Every MLP width that tensor parallelism slices: dense, per expert, shared expert."""
        widths = [self.intermediate_size] if len(self.sparse_layers) < self.num_layers or not self.num_experts else []
        if self.num_experts:
            widths.append(self.moe_intermediate_size)
        if self.shared_expert_intermediate_size:
            widths.append(self.shared_expert_intermediate_size)
        return widths
