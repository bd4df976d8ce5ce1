"""Tiny random-weight DeepSeek-V2 and -V3 checkpoints (multi-head latent attention + DeepSeek's routing), built from
their transformers configs and saved by transformers, for tests/test_mla.py.

deepseek_v2: q_proj straight from the hidden state (q_lora_rank null, as V2-Lite), softmax scores with
group_limited_greedy routing, YaRN with V2-Lite's mscale (the softmax scale changes). deepseek_v3: q_a_proj /
q_b_proj, sigmoid scores with noaux_tc routing and a nonzero e_score_correction_bias, n_group > 1 (deepseek_v3_neox:
the same with rope_interleave false). All: layer 0 dense (first_k_dense_replace 1), layer 1 experts + shared experts,
randomized norm weights."""
from __future__ import annotations

from pathlib import Path

import torch

SEEDS = {"deepseek_v2": 31, "deepseek_v3": 32, "deepseek_v3_neox": 33}
KINDS = tuple(SEEDS)
# kv_lora_rank 32 and rope 16: the Triton decode kernel's powers of two >= 16; v 24 != nope 16
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24)


def config(kind: str):
    import transformers as tf

    from conftest import TINY

    base = {**{k: v for k, v in TINY.items() if k != "num_key_value_heads"}, **MLA, "first_k_dense_replace": 1,
            "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2}
    if kind == "deepseek_v2":
        return tf.DeepseekV2Config(**base, q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1,
                                   topk_method="group_limited_greedy", routed_scaling_factor=3.0,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                                                    "beta_slow": 1, "original_max_position_embeddings": 128})
    if kind in ("deepseek_v3", "deepseek_v3_neox"):  # neox: rope_interleave false (rotate halves)
        return tf.DeepseekV3Config(**base, q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5, norm_topk_prob=True,
                                   rope_interleave=kind == "deepseek_v3")
    raise ValueError(kind)


def build(kind: str, tokenizer_dir: Path, out: Path):
    """(checkpoint dir, the transformers model to compare with)."""
    import transformers as tf

    from conftest import _save
    from family_models import _randomize

    torch.manual_seed(SEEDS[kind])
    model = tf.AutoModelForCausalLM.from_config(config(kind)).eval()
    _randomize(model, ("norm.weight", "layernorm.weight"), 0.1)
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(layer.mlp, "gate", None)
            if bias is not None and hasattr(bias, "e_score_correction_bias"):  # big enough to change the choice
                bias.e_score_correction_bias.copy_(torch.randn_like(bias.e_score_correction_bias) * 0.1)
    _save(model, tokenizer_dir, out)
    return out, model
