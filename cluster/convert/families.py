"""The model families the converter reads, one declarative entry each (cluster/convert/family.py says what the
fields mean). Adding a family is adding an entry here; a feature the engine lacks is a ModelConfig field and a
layer, not a string check in the converter.
"""
from __future__ import annotations

from cluster.convert.family import Experts, Family

LLAMA_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
               "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}


def _llama_bias(view: dict) -> dict:
    return {"attention_bias": bool(view.get("attention_bias") or view.get("bias"))}


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


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama", "mistral", "smollm"), LLAMA_LAYER, config_hook=_llama_bias),
    Family("Qwen2", ("qwen2",), LLAMA_LAYER, fields={"attention_bias": True}),
    Family("InternLM2", ("internlm2", "internlm"),
           {"qkv_grouped": "attention.wqkv", "o": "attention.wo", "gate": "feed_forward.w1",
            "up": "feed_forward.w3", "down": "feed_forward.w2", "ln1": "attention_norm", "ln2": "ffn_norm"},
           embed="model.tok_embeddings", head="output", config_hook=_llama_bias),
    Family("Mixtral", ("mixtral",), LLAMA_LAYER, config_hook=_mixtral,
           experts=Experts(prefix=("block_sparse_moe.", "mlp."), names=("w1", "w3", "w2"))),
    Family("Qwen2-MoE", ("qwen2_moe",), LLAMA_LAYER,
           config_hook=lambda v: {**qwen_moe_fields(v), "attention_bias": bool(v.get("qkv_bias", True))},
           experts=Experts(shared="shared_expert.", shared_gate="shared_expert_gate")),
)

BY_MODEL_TYPE: dict[str, Family] = {t: fam for fam in FAMILIES for t in fam.model_types}
SUPPORTED = sorted(BY_MODEL_TYPE) + ["llava"]  # llava: a Llama-family language model (cluster/convert/llava.py)


def family_for(model_type: str) -> Family:
    """The family of an HF model_type, or one line naming the supported ones."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return BY_MODEL_TYPE[model_type]
