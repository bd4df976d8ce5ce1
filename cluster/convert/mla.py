"""DeepSeek-V2/V3's multi-head latent attention at conversion: the ModelConfig fields a checkpoint's config gives
(cluster/layers/mla.py reads them), and its rope rows put in the engine's neox order.

DeepSeek rotates pairs (2j, 2j + 1) of the rope dims (V2 always, V3 with rope_interleave); the engine rotates dim
j with j + R/2. The same permutation of q's rope rows (each head's last R rows of q_proj / q_b_proj) and of the rope
key's rows (kv_a_proj_with_mqa's last R) leaves every q_rope . k_rope unchanged. Imports without torch."""
from __future__ import annotations

import math

from cluster.convert import rope
from cluster.convert.family import Tensors
from cluster.models.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(view: dict) -> float:
    """(qk_nope + qk_rope) ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN, as DeepSeek's code does."""
    scale = (view["qk_nope_head_dim"] + view["qk_rope_head_dim"]) ** -0.5
    p = rope._params(view)
    rp = p.get("rope_parameters") or p.get("rope_scaling") or {}
    if rope.rope_type(view) != "default" and rp.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rp["factor"]), float(rp["mscale_all_dim"])) ** 2
    return scale


def config_fields(view: dict, interleaved: bool) -> dict:
    """MLA's ModelConfig fields. One KV "head" (the latent row), head_dim the rope dims."""
    if view.get("attention_bias"):
        raise ValueError("DeepSeek MLA with attention_bias: true is not supported; supported: attention_bias false")
    return dict(kv_lora_rank=view["kv_lora_rank"], q_lora_rank=view.get("q_lora_rank") or 0,
                qk_nope_head_dim=view["qk_nope_head_dim"], head_dim=view["qk_rope_head_dim"],
                v_head_dim=view["v_head_dim"], num_kv_heads=1, attn_scale=softmax_scale(view),
                rope_interleaved=interleaved)


def rope_rows(t: Tensors, cfg: ModelConfig, i: int) -> None:
    """Layer hook: interleaved rope rows of q and of the shared rope key into the engine's order, in place."""
    from cluster.convert import head_layout  # torch: conversion only

    if not cfg.rope_interleaved:
        return
    r, nope, lora = cfg.head_dim, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    pairs = head_layout.qk_order(r, r, True, r)
    q = "wq_b" if "wq_b" in t else "wq"
    t[q] = head_layout.rows(t[q], cfg.num_heads, nope + r, list(range(nope)) + [nope + j for j in pairs])
    t["wkv_a"] = head_layout.rows(t["wkv_a"], 1, lora + r, list(range(lora)) + [lora + j for j in pairs])
