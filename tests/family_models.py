"""Tiny random-weight checkpoints of the families beyond Llama (conftest.build_tiny hands these kinds here): each
built from its transformers config and saved by transformers, so conversion reads what the family really ships.

Norm weights and biases are randomized (transformers initializes them to ones / zeros), so a converter that drops or
misreads one changes the tokens."""
from __future__ import annotations

from pathlib import Path

import torch

SEEDS = {"qwen3": 11, "qwen3_moe": 12, "phi3": 13, "phi3_longrope": 14, "gemma": 15}
KINDS = tuple(SEEDS)


def _randomize(model, names: tuple[str, ...], std: float) -> None:
    """Parameters whose name ends in one of `names` drawn around their init (ones for norms, zeros for biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.add_(torch.randn_like(p) * std)


def _config(kind: str):
    import transformers as tf

    from conftest import TINY

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
    raise ValueError(kind)


def build_family(kind: str, tokenizer_dir: Path, out: Path):
    """(checkpoint dir, the transformers model to compare with) for a kind in KINDS."""
    import transformers as tf

    from conftest import _save

    torch.manual_seed(SEEDS[kind])
    model = tf.AutoModelForCausalLM.from_config(_config(kind)).eval()
    _randomize(model, ("norm.weight", "layernorm.weight"), 0.3 if kind == "gemma" else 0.1)
    _randomize(model, ("proj.bias",), 0.5)
    _save(model, tokenizer_dir, out)
    return out, model
