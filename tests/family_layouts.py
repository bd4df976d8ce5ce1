"""Checkpoints of families that ship remote code (InternLM v1, QWen v1, Baichuan/Baichuan2, ChatGLM2/3, DeepSeek-MoE v1), made
by rewriting a native transformers model's weights into the family's published tensor names and config keys (as
conftest._repack_internlm2 does for InternLM2). The native model is the reference: the same function, so the same
greedy tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch

Tensors = dict[str, torch.Tensor]


def write_checkpoint(out: Path, tensors: Tensors, config: dict, tokenizer_dir: Path,
                     generation: dict | None = None) -> Path:
    """A remote-code family's checkpoint dir: its tensors and config.json, and a transformers tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


def native_tensors(model, scratch: Path) -> Tensors:
    """The model's tensors as transformers saves them (per-expert names, whatever it holds in memory)."""
    from safetensors.torch import load_file

    model.save_pretrained(scratch)
    return {k: v for f in sorted(scratch.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _cat(sd: Tensors, p: str, names: tuple[str, ...], suffix: str = ".weight") -> torch.Tensor:
    return torch.cat([sd[f"{p}{n}{suffix}"] for n in names])


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def internlm(sd: Tensors, cfg) -> tuple[Tensors, dict]:
    """A Llama model with attention_bias (q, k, v and o biases) as InternLM (v1): the same names, its config keys."""
    config = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True,
              **{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_hidden_layers", "max_position_embeddings", "rms_norm_eps",
                                               "vocab_size", "tie_word_embeddings")}}
    return dict(sd), config


def qwen_v1(sd: Tensors, cfg) -> tuple[Tensors, dict]:
    """A Qwen2 model (MHA, untied) in QWen (v1)'s layout: transformer.h.N.attn.c_attn (fused qkv + bias),
    mlp.w1 (up) / w2 (gate) / c_proj, ln_1 / ln_2, wte, ln_f. Context capped at seq_length (dynamic NTK, log-n)."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out.update({q + "attn.c_attn.weight": _cat(sd, p, QKV), q + "attn.c_attn.bias": _cat(sd, p, QKV, ".bias"),
                    q + "attn.c_proj.weight": sd[p + "self_attn.o_proj.weight"],
                    q + "mlp.w1.weight": sd[p + "mlp.up_proj.weight"], q + "mlp.w2.weight": sd[p + "mlp.gate_proj.weight"],
                    q + "mlp.c_proj.weight": sd[p + "mlp.down_proj.weight"],
                    q + "ln_1.weight": sd[p + "input_layernorm.weight"],
                    q + "ln_2.weight": sd[p + "post_attention_layernorm.weight"]})
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
              "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                           "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
              "hidden_size": cfg.hidden_size, "intermediate_size": 2 * cfg.intermediate_size,
              "kv_channels": cfg.hidden_size // cfg.num_attention_heads, "layer_norm_epsilon": cfg.rms_norm_eps,
              "max_position_embeddings": cfg.max_position_embeddings, "seq_length": cfg.max_position_embeddings // 2,
              "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
              "no_bias": True, "rotary_emb_base": 10000, "rotary_pct": 1.0, "use_dynamic_ntk": True,
              "use_logn_attn": True, "vocab_size": cfg.vocab_size, "tie_word_embeddings": False}
    return out, config


def baichuan(sd: Tensors, cfg, head_scales: torch.Tensor | None = None, alibi: bool = False) -> tuple[Tensors, dict]:
    """A Llama model (MHA) in Baichuan-7B's layout: self_attn.W_pack = [q; k; v]. head_scales: Baichuan2 (its
    NormHead normalizes each LM-head row at run time), so the stored rows may have any length. alibi: the 13B
    models' config, which names model_max_length only."""
    out = {k: v for k, v in sd.items() if not any(n in k for n in QKV)}
    if head_scales is not None:
        out["lm_head.weight"] = sd["lm_head.weight"] * head_scales[:, None]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.W_pack.weight"] = _cat(sd, p, QKV)
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
              "model_max_length": cfg.max_position_embeddings, "num_attention_heads": cfg.num_attention_heads,
              "num_hidden_layers": cfg.num_hidden_layers, "rms_norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    if alibi:
        del config["max_position_embeddings"]
    return out, config


def paper_alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes as Press et al. (2022) define them: for n heads a power of two, the geometric sequence
    2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the closest power of two's, then every other one of twice as many."""
    if n & (n - 1) == 0:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    m = 1 << (n.bit_length() - 1)
    return paper_alibi_slopes(m) + paper_alibi_slopes(2 * m)[0::2][: n - m]


ALIBI_ATTENTION = "cluster_test_alibi"


def alibi_llama(model) -> None:
    """Make a transformers Llama (MHA or GQA) Baichuan-13B's function, in place: no rotary (zero frequencies: cos 1,
    sin 0) and attention scores q k^T / sqrt(d) + slope_h * (key - query position) (ALiBi, the paper's slopes),
    under the causal mask, as Baichuan-13B's modeling code computes them. One unpadded sequence at a time."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import repeat_kv

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
        kpos = torch.arange(k_len, device=query.device)
        slopes = torch.tensor(paper_alibi_slopes(heads), dtype=torch.float32, device=query.device)
        bias = slopes[:, None, None] * (kpos[None, None, :] - kpos[-q_len:][None, :, None])
        s = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling + bias
        s = s.masked_fill(kpos[None, None, :] > kpos[-q_len:][None, :, None], float("-inf"))
        w = torch.softmax(s, dim=-1).to(query.dtype)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    AttentionInterface.register(ALIBI_ATTENTION, attention)
    AttentionMaskInterface.register(ALIBI_ATTENTION, eager_mask)
    model.config._attn_implementation = ALIBI_ATTENTION
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.zero_()
        if hasattr(model.model.rotary_emb, "original_inv_freq"):
            model.model.rotary_emb.original_inv_freq.zero_()


def chatglm(sd: Tensors, cfg, rope_ratio: float) -> tuple[Tensors, dict]:
    """A GLM model (GQA, qkv bias, half-head interleaved rotary) in ChatGLM2/3's layout: transformer.encoder.layers.N.
    self_attention.query_key_value (+ bias) / dense, mlp.dense_h_to_4h ([gate; up]) / dense_4h_to_h."""
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out.update({q + "self_attention.query_key_value.weight": _cat(sd, p, QKV),
                    q + "self_attention.query_key_value.bias": _cat(sd, p, QKV, ".bias"),
                    q + "self_attention.dense.weight": sd[p + "self_attn.o_proj.weight"],
                    q + "mlp.dense_h_to_4h.weight": sd[p + "mlp.gate_up_proj.weight"],
                    q + "mlp.dense_4h_to_h.weight": sd[p + "mlp.down_proj.weight"],
                    q + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"]})
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": cfg.num_hidden_layers,
              "padded_vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "ffn_hidden_size": cfg.intermediate_size, "kv_channels": cfg.head_dim,
              "num_attention_heads": cfg.num_attention_heads, "seq_length": cfg.max_position_embeddings,
              "multi_query_attention": True, "multi_query_group_num": cfg.num_key_value_heads,
              "layernorm_epsilon": cfg.rms_norm_eps, "rmsnorm": True, "post_layer_norm": True,
              "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
              "original_rope": True, "rope_ratio": rope_ratio, "tie_word_embeddings": False}
    return out, config


def deepseek_moe(sd: Tensors, cfg) -> tuple[Tensors, dict]:
    """A Qwen2-MoE model (layer 0 dense, its shared expert's sigmoid gate all zeros: a constant 1/2, so the shared
    expert's down_proj is halved here) in DeepSeek-MoE v1's layout: mlp.shared_experts, no gate,
    first_k_dense_replace 1, n_shared_experts = shared width / expert width."""
    out = {}
    for k, v in sd.items():
        if ".mlp.shared_expert_gate." in k:
            continue
        if ".mlp.shared_expert." in k:
            k = k.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
            v = v * 0.5 if k.endswith("down_proj.weight") else v
        out[k] = v
    config = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
              "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
              "n_shared_experts": cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size,
              "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
              "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
              "num_hidden_layers": cfg.num_hidden_layers, "max_position_embeddings": cfg.max_position_embeddings,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
    return out, config
