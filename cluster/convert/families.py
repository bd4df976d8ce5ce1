"""The model families the converter reads, one declarative entry each (cluster/convert/family.py says what the
fields mean). Adding a family is adding an entry here; a feature the engine lacks is a ModelConfig field and a
layer, not a string check in the converter.
"""
from __future__ import annotations

import math

from cluster.convert.family import Experts, Family, Tensors
from cluster.convert.rope import rope_type

LLAMA_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
               "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}


QK_NORM_LAYER = {**LLAMA_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def _llama_bias(view: dict) -> dict:
    """attention_bias (Llama, Qwen3) or bias (InternLM, InternLM2) puts biases on q, k, v and o alike."""
    if view.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias: true) are not supported; supported: biases on q, k, v and o")
    bias = bool(view.get("attention_bias") or view.get("bias"))
    return {"attention_bias": bias, "o_bias": bias}


def _mixtral(view: dict) -> dict:
    return dict(num_experts=view["num_local_experts"], num_experts_per_tok=view["num_experts_per_tok"],
                moe_intermediate_size=view["intermediate_size"], norm_topk_prob=True,
                sparse_layers=list(range(view["num_hidden_layers"])))


def qwen_moe_fields(view: dict) -> dict:
    """Qwen2-MoE / Qwen3-MoE: experts every decoder_sparse_step layers except mlp_only_layers."""
    layers = view["num_hidden_layers"]
    step, dense = view.get("decoder_sparse_step", 1) or 1, set(view.get("mlp_only_layers") or [])
    sparse = [i for i in range(layers) if i not in dense and (i + 1) % step == 0] if view.get("num_experts") else []
    return dict(num_experts=view.get("num_experts", 0) if sparse else 0,
                num_experts_per_tok=view.get("num_experts_per_tok", 0),
                moe_intermediate_size=view["moe_intermediate_size"],
                norm_topk_prob=bool(view.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=view.get("shared_expert_intermediate_size", 0) or 0,
                sparse_layers=sparse)


def _phi3(view: dict) -> dict:
    kind = rope_type(view)
    if kind not in ("default", "longrope"):
        raise ValueError(f"Phi-3 rope scaling {kind!r} is not supported; supported: default, longrope (its short "
                         "factors, served up to original_max_position_embeddings)")
    return {}


def _gemma(view: dict) -> dict:
    return {"hidden_act": "gelu_tanh", "embed_scale": math.sqrt(view["hidden_size"]),
            "tie_word_embeddings": bool(view.get("tie_word_embeddings", True))}


def _plus_one(t: Tensors, keys: tuple[str, ...]) -> None:
    """Gemma's RMSNorm scales by (1 + weight): folded into the weight once, here."""
    for k in keys:
        t[k] = t[k].float() + 1.0


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama", "mistral", "smollm"), LLAMA_LAYER, config_hook=_llama_bias),
    Family("InternLM", ("internlm",), LLAMA_LAYER, config_hook=_llama_bias),
    Family("Qwen2", ("qwen2",), LLAMA_LAYER, fields={"attention_bias": True}),
    Family("Qwen3", ("qwen3",), QK_NORM_LAYER, fields={"qk_norm": True}, config_hook=_llama_bias),
    Family("Qwen3-MoE", ("qwen3_moe",), QK_NORM_LAYER, fields={"qk_norm": True},
           keys={"num_experts": ("num_experts", "num_local_experts")},  # transformers 5 saves the latter
           config_hook=lambda v: {**qwen_moe_fields(v), **_llama_bias(v)}, experts=Experts()),
    Family("Phi-3", ("phi3",),
           {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj", "ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
           config_hook=_phi3),
    Family("Gemma", ("gemma",), LLAMA_LAYER, config_hook=_gemma,
           layer_hook=lambda t, cfg, i: _plus_one(t, ("ln1", "ln2")), model_hook=lambda t, cfg: _plus_one(t, ("norm",))),
    Family("InternLM2", ("internlm2",),
           {"qkv_grouped": "attention.wqkv", "o": "attention.wo", "gate": "feed_forward.w1",
            "up": "feed_forward.w3", "down": "feed_forward.w2", "ln1": "attention_norm", "ln2": "ffn_norm"},
           embed="model.tok_embeddings", head="output", config_hook=_llama_bias),
    Family("Mixtral", ("mixtral",), LLAMA_LAYER, config_hook=_mixtral,
           experts=Experts(prefix=("block_sparse_moe.", "mlp."), names=("w1", "w3", "w2"))),
    Family("Qwen2-MoE", ("qwen2_moe",), LLAMA_LAYER,
           config_hook=lambda v: {**qwen_moe_fields(v), "attention_bias": bool(v.get("qkv_bias", True))},
           experts=Experts(shared="shared_expert.", shared_gate="shared_expert_gate")),
)

# Families whose attention the paged kernels (cluster/kernels/attention.py) cannot compute yet, and what they lack.
_GEMMA3 = ("sliding-window attention (5 of every 6 layers attend only to the last sliding_window keys, with their own "
           "rope base) in the paged attention kernels")
REFUSED = {
    "gemma2": ("attention-logit soft-capping (scores become tanh(s / cap) * cap before the softmax) and sliding-window "
               "attention on every other layer in the paged attention kernels"),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
}

BY_MODEL_TYPE: dict[str, Family] = {t: fam for fam in FAMILIES for t in fam.model_types}
SUPPORTED = sorted(BY_MODEL_TYPE) + ["llava"]  # llava: a Llama-family language model (cluster/convert/llava.py)


def family_for(model_type: str) -> Family:
    """The family of an HF model_type, or one line naming the supported ones."""
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} is not supported: it needs {REFUSED[model_type]}; supported: "
                         f"{', '.join(SUPPORTED)}")
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return BY_MODEL_TYPE[model_type]
