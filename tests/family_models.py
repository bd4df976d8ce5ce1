"""Tiny random-weight checkpoints of the families beyond Llama (conftest.build_tiny hands these kinds here): each
built from its transformers config and saved by transformers, so conversion reads what the family really ships.

Norm weights and biases are randomized (transformers initializes them to ones / zeros), so a converter that drops or
misreads one changes the tokens."""
from __future__ import annotations

from pathlib import Path

import torch

SEEDS = {"qwen3": 11, "qwen3_moe": 12, "phi3": 13, "phi3_longrope": 14, "gemma": 15, "glm": 16, "glm4": 17,
         "qwen_v1": 18, "baichuan": 19, "baichuan2": 20, "chatglm": 21, "deepseek_moe": 22, "falcon7b": 23,
         "falcon40b": 24, "falcon_seq": 25, "dbrx": 26, "internlm": 27, "gemma2": 28, "gemma3_text": 29,
         "baichuan13b": 30}
KINDS = tuple(SEEDS)
# the tiny shape every family test starts from (conftest's Llama-family kinds too)
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08)
# tiny enough that each changes the tokens (test_families checks); the final cap is monotonic, so it changes greedy
# tokens only under a repetition penalty (test_families' GEMMA_GREEDY)
GEMMA_WINDOW, GEMMA_ATTN_CAP, GEMMA_FINAL_CAP = 8, 1.0, 2.0
BAICHUAN2_VOCAB = 125696  # what tells Baichuan2 (normalized LM head) from Baichuan


def _randomize(model, names: tuple[str, ...], std: float) -> None:
    """Parameters whose name ends in one of `names` drawn around their init (ones for norms, zeros for biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.add_(torch.randn_like(p) * std)


def _config(kind: str):
    import transformers as tf

    if kind == "qwen3":  # head_dim 32 apart from hidden / heads; q, k, v and o biases
        return tf.Qwen3Config(**TINY, head_dim=32, attention_bias=True)
    if kind == "qwen3_moe":  # layer 0 experts (normalized top-k), layer 1 a dense MLP
        return tf.Qwen3MoeConfig(**TINY, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                 norm_topk_prob=True, mlp_only_layers=[1])
    if kind == "phi3":  # head_dim 24: padded to 32 for the kernels
        return tf.Phi3Config(**{**TINY, "hidden_size": 96}, pad_token_id=0)
    if kind == "phi3_longrope":  # LongRoPE's short factors, served up to original_max_position_embeddings
        half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
        rope = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * j for j in range(half)],
                "long_factor": [4.0 + j for j in range(half)], "original_max_position_embeddings": 64}
        return tf.Phi3Config(**{**TINY, "max_position_embeddings": 256}, original_max_position_embeddings=64,
                             rope_scaling=rope, pad_token_id=0)
    if kind == "gemma":  # head_dim 32 apart from hidden / heads, one KV head, tied embeddings
        return tf.GemmaConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=32)
    if kind == "gemma2":  # window 8 on layer 0 (prompt + output is ~34 tokens), caps that change the tokens
        return tf.Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=24, sliding_window=GEMMA_WINDOW,
                               attn_logit_softcapping=GEMMA_ATTN_CAP, final_logit_softcapping=GEMMA_FINAL_CAP)
    if kind == "gemma3_text":  # layer 0 windowed with its own rope base, layer 1 global with linear scaling 8
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}
        return tf.Gemma3TextConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=48,
                                   sliding_window=GEMMA_WINDOW, layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters=rope, final_logit_softcapping=GEMMA_FINAL_CAP)
    if kind in ("glm", "chatglm"):  # rotary on half of each head, interleaved pairs; a qkv bias
        return tf.GlmConfig(**TINY, head_dim=16, rope_theta=50000.0, attention_bias=True, pad_token_id=0)
    if kind == "glm4":  # + sandwich norms
        return tf.Glm4Config(**TINY, head_dim=16, attention_bias=True, pad_token_id=0)
    if kind == "qwen_v1":  # the native model behind the QWen v1 layout: MHA, untied, qkv bias
        return tf.Qwen2Config(**{**TINY, "num_key_value_heads": 4}, tie_word_embeddings=False)
    if kind == "internlm":  # MHA Llama with q, k, v and o biases
        return tf.LlamaConfig(**{**TINY, "num_key_value_heads": 4}, attention_bias=True)
    if kind == "baichuan13b":  # MHA Llama; 6 heads: ALiBi's slopes for a head count not a power of two
        return tf.LlamaConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6})
    if kind in ("baichuan", "baichuan2"):  # MHA Llama
        vocab = BAICHUAN2_VOCAB if kind == "baichuan2" else TINY["vocab_size"]
        return tf.LlamaConfig(**{**TINY, "num_key_value_heads": 4, "vocab_size": vocab})
    if kind == "deepseek_moe":  # Qwen2-MoE: layer 0 dense, layer 1 experts + a shared expert of two experts' width
        return tf.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, mlp_only_layers=[0], qkv_bias=False)
    falcon = {k: TINY[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                                   "max_position_embeddings", "initializer_range")}
    if kind == "falcon7b":  # multi-query, attention and MLP in parallel from one LayerNorm, tied embeddings
        return tf.FalconConfig(**falcon, ffn_hidden_size=128, new_decoder_architecture=False, multi_query=True,
                               parallel_attn=True)
    if kind == "falcon40b":  # new_decoder_architecture: 2 KV heads, ln_attn and ln_mlp
        return tf.FalconConfig(**falcon, ffn_hidden_size=128, new_decoder_architecture=True, num_kv_heads=2)
    if kind == "falcon_seq":  # MHA, attention then MLP (per head [q, k, v] rows)
        return tf.FalconConfig(**falcon, ffn_hidden_size=128, new_decoder_architecture=False, multi_query=False,
                               parallel_attn=False)
    if kind == "dbrx":  # LayerNorms without bias, q/k/v clipped, 4 experts in every layer
        return tf.DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=TINY["vocab_size"],
                             initializer_range=0.08, attn_config={"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 10000.0},
                             ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2})
    raise ValueError(kind)


def native_model(kind: str):
    """The transformers model of a kind in KINDS, seeded, norms and biases randomized (not saved: also what
    benchmarks/gpu_paths.py runs through the GPU path)."""
    import transformers as tf

    torch.manual_seed(SEEDS[kind])
    # Gemma 2 / 3: eager attention, transformers' one path with attention soft-capping (SDPA refuses it)
    kw = {"attn_implementation": "eager"} if kind in ("gemma2", "gemma3_text") else {}
    model = tf.AutoModelForCausalLM.from_config(_config(kind), **kw).eval()
    _randomize(model, ("norm.weight", "layernorm.weight", "ln_f.weight", "ln_attn.weight", "ln_mlp.weight",
                       "norm_1.weight", "norm_2.weight", "norm_f.weight"), 0.3 if kind.startswith("gemma") else 0.1)
    _randomize(model, ("layernorm.bias", "ln_f.bias", "ln_attn.bias", "ln_mlp.bias"), 0.1)
    _randomize(model, ("proj.bias",), 0.5)
    return model


def build_family(kind: str, tokenizer_dir: Path, out: Path):
    """(checkpoint dir, the transformers model to compare with) for a kind in KINDS."""
    from conftest import _save

    model = native_model(kind)
    if kind in REMOTE:
        return _remote(kind, model, tokenizer_dir, out), model
    _save(model, tokenizer_dir, out)
    return out, model


REMOTE = ("internlm", "qwen_v1", "baichuan", "baichuan2", "baichuan13b", "chatglm", "deepseek_moe")
QWEN_V1_GENERATION = {"eos_token_id": 2, "stop_words_ids": [[3]], "chat_format": "chatml"}


def _remote(kind: str, model, tokenizer_dir: Path, out: Path) -> Path:
    """The native model's weights in the remote-code family's layout (tests/family_layouts.py)."""
    import family_layouts as fl

    cfg = model.config
    with torch.no_grad():
        if kind == "baichuan2":  # the reference uses unit rows; the checkpoint stores them at any length
            model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight, dim=-1))
        if kind == "deepseek_moe":  # sigmoid(0) = 1/2 exactly: an ungated shared expert at half its output
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "shared_expert_gate", None)
                if gate is not None:
                    gate.weight.zero_()
    sd = fl.native_tensors(model, out.with_name(out.name + "-native"))
    generation = None
    if kind == "qwen_v1":
        tensors, config = fl.qwen_v1(sd, cfg)
        generation = QWEN_V1_GENERATION
    elif kind == "internlm":
        tensors, config = fl.internlm(sd, cfg)
    elif kind == "baichuan":
        tensors, config = fl.baichuan(sd, cfg)
    elif kind == "baichuan2":
        tensors, config = fl.baichuan(sd, cfg, torch.rand(cfg.vocab_size) * 1.5 + 0.5)
    elif kind == "baichuan13b":  # the reference: the native model with ALiBi for its rotary
        tensors, config = fl.baichuan(sd, cfg, alibi=True)
        fl.alibi_llama(model)
    elif kind == "chatglm":
        tensors, config = fl.chatglm(sd, cfg, rope_ratio=5.0)
    else:
        tensors, config = fl.deepseek_moe(sd, cfg)
    return fl.write_checkpoint(out, tensors, config, tokenizer_dir, generation)
