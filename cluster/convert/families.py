"""The model families the converter reads, one declarative entry each (cluster/convert/family.py says what the
fields mean). Adding a family is adding an entry here; a feature the engine lacks is a ModelConfig field and a
layer, not a string check in the converter.
"""
from __future__ import annotations

import math

from cluster.convert import mla
from cluster.convert.family import Experts, Family, Tensors
from cluster.convert.rope import rope_type

LLAMA_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
               "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
QK_NORM_LAYER = {**LLAMA_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
MLA_LAYER = {"wq": "self_attn.q_proj", "wq_a": "self_attn.q_a_proj", "q_a_norm": "self_attn.q_a_layernorm",
             "wq_b": "self_attn.q_b_proj", "wkv_a": "self_attn.kv_a_proj_with_mqa",
             "kv_a_norm": "self_attn.kv_a_layernorm", "wkv_b": "self_attn.kv_b_proj", "o": "self_attn.o_proj",
             **{k: v for k, v in LLAMA_LAYER.items() if k not in ("q", "k", "v", "o")}}
MLA_Q = ("wq", "wq_a", "q_a_norm", "wq_b")  # q_proj (q_lora_rank null: V2-Lite) or q_a_proj, its norm, q_b_proj
# Gemma 2 / 3's four norms: input, post_attention (on the attention's output), pre_feedforward, post_feedforward
GEMMA2_LAYER = {**LLAMA_LAYER, "ln2": "pre_feedforward_layernorm", "post_ln1": "post_attention_layernorm",
                "post_ln2": "post_feedforward_layernorm"}
GEMMA3_LAYER = {**GEMMA2_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
GLM_LAYER = {**{k: v for k, v in LLAMA_LAYER.items() if k not in ("gate", "up")}, "gate_up": "mlp.gate_up_proj"}
BAICHUAN2_VOCAB = 125696


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


def _gemma2(view: dict, pattern: int = 2) -> dict:
    """Gemma 2 / 3: soft-capped attention logits and LM head, query_pre_attn_scalar as the softmax scale, and a
    sliding window on the layers layer_types names (configs without it: all but every `pattern`-th layer)."""
    if view.get("use_bidirectional_attention"):
        raise ValueError("Gemma with use_bidirectional_attention (an embedding model) is not supported; supported: "
                         "the causal language models")
    n = view["num_hidden_layers"]
    pattern = view.get("sliding_window_pattern") or pattern
    types = view.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                        for i in range(n)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"Gemma layer types {sorted(unknown)} are not supported; supported: sliding_attention, "
                         "full_attention")
    window = int(view.get("sliding_window") or 0)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    return {**_gemma(view), "sandwich_norms": True,
            "query_pre_attn_scalar": float(view.get("query_pre_attn_scalar") or 0.0),
            "attn_logit_softcapping": float(view.get("attn_logit_softcapping") or 0.0),
            "final_logit_softcapping": float(view.get("final_logit_softcapping") or 0.0),
            "sliding_window": window if sliding else 0, "sliding_layers": sliding}


def _gemma3_view(view: dict) -> None:
    """Gemma 3's two rope tables: transformers 5 saves rope_parameters per layer type; older configs have rope_theta
    (+ rope_scaling) for the full layers and rope_local_base_freq for the sliding ones. The view keeps the full
    layers' as its rope (what rope.inv_freq reads) and the sliding layers' as local_rope_parameters."""
    rp = view.get("rope_parameters") or {}
    if "full_attention" in rp:
        view["rope_parameters"] = dict(rp["full_attention"])
        view["local_rope_parameters"] = dict(rp.get("sliding_attention") or {"rope_type": "default"})
    else:
        if not rp:
            view.setdefault("rope_theta", 1_000_000.0)
        view["local_rope_parameters"] = {"rope_type": "default"}
    view["local_rope_parameters"].setdefault("rope_theta", float(view.get("rope_local_base_freq") or 10_000.0))


def _gemma3(view: dict) -> dict:
    """Gemma 2's features with 5 sliding layers to 1 full by default, and the sliding layers' own rope table.
    transformers' Gemma 3 never applies attn_logit_softcapping (its configs leave it null), so neither does this."""
    fields = _gemma2(view, pattern=6)
    return {**fields, "attn_logit_softcapping": 0.0, "local_rope": bool(fields["sliding_layers"])}


def _qwen_v1(view: dict) -> dict:
    """QWen (v1): c_attn always has a bias; w1 / w2 are each half of intermediate_size; past seq_length its dynamic
    NTK and log-n attention change the model, so the context stops there."""
    if not view.get("no_bias", True):
        raise ValueError("QWen with no_bias: false (biases on c_proj and the MLP) is not supported")
    long = view.get("use_dynamic_ntk") or view.get("use_logn_attn")
    seq = view.get("seq_length") or view.get("max_position_embeddings", 2048)
    return {"attention_bias": True, "intermediate_size": view["intermediate_size"] // 2,
            "num_kv_heads": view["num_attention_heads"],
            "max_position_embeddings": seq if long else view.get("max_position_embeddings") or seq}


def _baichuan(view: dict) -> dict:
    """Baichuan / Baichuan2-13B name only model_max_length (the 7B ones max_position_embeddings too): they use
    ALiBi position biases instead of a rotary, over model_max_length tokens."""
    if not view.get("max_position_embeddings"):
        return {"alibi": True, "max_position_embeddings": int(view.get("model_max_length") or 4096)}
    return {}


def _baichuan2_head(t: Tensors, cfg) -> None:
    """Baichuan2's NormHead divides each LM-head row by its L2 norm at run time; done once here. Baichuan2 is told
    from Baichuan by its vocabulary (125696), as its configs say nothing else."""
    import torch.nn.functional as F

    if cfg.vocab_size == BAICHUAN2_VOCAB and "head" in t:
        t["head"] = F.normalize(t["head"].float(), dim=-1)


def _chatglm(view: dict) -> dict:
    """ChatGLM2/3: RMSNorm, multi-query groups, a qkv bias, and rotary on the first half of each head in
    interleaved pairs with base 10000 * rope_ratio."""
    if view.get("position_encoding_2d") or "kv_channels" not in view:
        raise ValueError("ChatGLM-6B (v1: 2D positions, GLM blocks) is not supported; supported: ChatGLM2-6B, "
                         "ChatGLM3-6B (and GLM-4-9B as model type 'glm')")
    want = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
            "apply_residual_connection_post_layernorm": False}
    other = {k: view[k] for k, v in want.items() if k in view and bool(view[k]) != v}
    if other:
        raise ValueError(f"ChatGLM with {other} is not supported; supported: the ChatGLM2/3 layout ({want})")
    heads = view["num_attention_heads"]
    return {"attention_bias": bool(view.get("add_qkv_bias", True)),
            "num_kv_heads": view.get("multi_query_group_num", heads) if view.get("multi_query_attention") else heads,
            "rotary_dim": view["kv_channels"] // 2, "rope_interleaved": True}


def _chatglm_view(view: dict) -> None:
    view["rope_theta"] = 10000.0 * float(view.get("rope_ratio", 1.0))


def _deepseek(view: dict) -> dict:
    """DeepSeek-MoE (v1): softmax routing, q/k/v attention."""
    if view.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"DeepSeek-MoE scoring_func {view['scoring_func']!r} is not supported; supported: softmax")
    return {**_deepseek_experts(view), **_llama_bias(view)}


def _deepseek_experts(view: dict) -> dict:
    """DeepSeek-MoE, -V2, -V3: experts from layer first_k_dense_replace on, every moe_layer_freq; the
    n_shared_experts always-on experts run as one MLP of their summed width, ungated."""
    layers, n = view["num_hidden_layers"], view.get("n_routed_experts")
    first, freq = view.get("first_k_dense_replace", 0), view.get("moe_layer_freq", 1) or 1
    sparse = [i for i in range(layers) if n and i >= first and i % freq == 0]
    return dict(num_experts=n if sparse else 0, num_experts_per_tok=view.get("num_experts_per_tok", 0),
                moe_intermediate_size=view["moe_intermediate_size"],
                norm_topk_prob=bool(view.get("norm_topk_prob", False) and view.get("num_experts_per_tok", 1) > 1),
                shared_expert_intermediate_size=view["moe_intermediate_size"] * (view.get("n_shared_experts") or 0),
                shared_expert_gate=False, sparse_layers=sparse)


def _deepseek_mla(view: dict, method: str, scoring: str, interleaved: bool) -> dict:
    """DeepSeek-V2/V3: multi-head latent attention (convert/mla.py), DeepSeek-MoE's experts, and routing by
    `method` and `scoring` unless the config names its own (cluster/layers/routing.py)."""
    method, scoring = view.get("topk_method") or method, view.get("scoring_func") or scoring
    if method not in ("greedy", "group_limited_greedy", "noaux_tc") or scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"DeepSeek routing {method!r} with {scoring!r} scores is not supported; supported: greedy, "
                         "group_limited_greedy, noaux_tc with softmax or sigmoid scores")
    if view.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias: true) are not supported; supported: mlp_bias false")
    return {**_deepseek_experts(view), **mla.config_fields(view, interleaved),
            "topk_method": method, "scoring_func": scoring, "n_group": view.get("n_group") or 1,
            "topk_group": view.get("topk_group") or 1, "router_bias": method == "noaux_tc",
            "routed_scaling_factor": float(view.get("routed_scaling_factor") or 1.0)}


def _deepseek_v3(view: dict) -> dict:
    """transformers' V3 normalizes the k weights at any k (V2 and DeepSeek-MoE only from k = 2)."""
    return {**_deepseek_mla(view, "noaux_tc", "sigmoid", bool(view.get("rope_interleave", True))),
            "norm_topk_prob": bool(view.get("norm_topk_prob", True))}


def _falcon(view: dict) -> dict:
    """Falcon: LayerNorms with biases, a plain gelu MLP, and (parallel_attn) attention and MLP side by side, from one
    norm (7B) or two (ln_attn / ln_mlp: 40B, 180B); multi-query, grouped KV (new_decoder_architecture) or MHA."""
    if view.get("alibi"):
        raise ValueError("Falcon with alibi: true (falcon-rw) is not supported: its ALiBi biases are scaled with the "
                         "scores, unlike the ones the paged attention kernels add (Baichuan-13B's); supported: the "
                         "rotary Falcon models (7B, 40B, 180B, Falcon2-11B)")
    if view.get("bias"):
        raise ValueError("Falcon with bias: true (biases on every linear) is not supported; supported: bias: false")
    if view.get("activation", "gelu") != "gelu":
        raise ValueError(f"Falcon activation {view['activation']!r} is not supported; supported: gelu")
    new = view.get("new_decoder_architecture", view.get("model_type") == "RefinedWeb")
    heads = view["num_attention_heads"]
    kv = (view.get("num_kv_heads") or heads) if new else (1 if view.get("multi_query", True) else heads)
    parallel = bool(view.get("parallel_attn", True))
    return {"num_kv_heads": kv, "norm": "layer", "norm_bias": True, "gated_mlp": False, "hidden_act": "gelu",
            "parallel_attn": parallel,
            "mlp_norm": not parallel or (view.get("num_ln_in_parallel_attn") or (2 if new else 1)) == 2,
            "tie_word_embeddings": bool(view.get("tie_word_embeddings", True))}


def _falcon_view(view: dict) -> None:
    view["intermediate_size"] = view.get("ffn_hidden_size") or 4 * view["hidden_size"]  # older configs: 4 x hidden


def _dbrx_view(view: dict) -> None:
    """Dbrx keeps its attention and FFN sizes in nested attn_config / ffn_config."""
    attn, ffn = view.get("attn_config") or {}, view.get("ffn_config") or {}
    view["num_key_value_heads"] = attn.get("kv_n_heads", view.get("num_key_value_heads"))
    if not view.get("rope_parameters"):
        view["rope_theta"] = attn.get("rope_theta", 10000.0)
    view["intermediate_size"] = ffn["ffn_hidden_size"]


def _dbrx(view: dict) -> dict:
    attn, ffn = view.get("attn_config") or {}, view["ffn_config"]
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    p = ffn.get("moe_normalize_expert_weights", 1)
    if act != "silu" or p not in (None, 1, 1.0):
        raise ValueError(f"Dbrx with ffn_act_fn {act!r} and moe_normalize_expert_weights {p!r} is not supported; "
                         "supported: silu experts, weights normalized by their sum (1) or not (null)")
    return dict(norm="layer", norm_bias=False, rms_norm_eps=1e-5, clip_qkv=float(attn.get("clip_qkv") or 0.0),
                num_experts=ffn["moe_num_experts"], num_experts_per_tok=ffn["moe_top_k"],
                moe_intermediate_size=ffn["ffn_hidden_size"], norm_topk_prob=p is not None,
                sparse_layers=list(range(view["num_hidden_layers"])))


def _dbrx_experts(get, cfg, p: str) -> Tensors:
    """Every expert's w1 (gate), v1 (up), w2 (down, stored [F, H] per expert) as one [E * F, H] tensor each."""
    e, f, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    m = p + "ffn.experts.mlp."
    return {"router": get(p + "ffn.router.layer.weight"), "e_gate": get(m + "w1").view(e, f, h),
            "e_up": get(m + "v1").view(e, f, h), "e_down": get(m + "w2").view(e, f, h).transpose(1, 2)}


def _plus_one(t: Tensors, keys: tuple[str, ...]) -> None:
    """Gemma's RMSNorm scales by (1 + weight): folded into the weight once, here."""
    for k in keys:
        t[k] = t[k].float() + 1.0


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama", "mistral", "smollm"), LLAMA_LAYER, config_hook=_llama_bias),
    Family("InternLM", ("internlm",), LLAMA_LAYER, config_hook=_llama_bias),
    Family("InternLM2", ("internlm2",),
           {"qkv_grouped": "attention.wqkv", "o": "attention.wo", "gate": "feed_forward.w1",
            "up": "feed_forward.w3", "down": "feed_forward.w2", "ln1": "attention_norm", "ln2": "ffn_norm"},
           embed="model.tok_embeddings", head="output", config_hook=_llama_bias),
    Family("Qwen2", ("qwen2",), LLAMA_LAYER, fields={"attention_bias": True}),
    Family("Qwen2-MoE", ("qwen2_moe",), LLAMA_LAYER,
           config_hook=lambda v: {**qwen_moe_fields(v), "attention_bias": bool(v.get("qkv_bias", True))},
           experts=Experts(shared="shared_expert.", shared_gate="shared_expert_gate")),
    Family("Qwen3", ("qwen3",), QK_NORM_LAYER, fields={"qk_norm": True}, config_hook=_llama_bias),
    Family("Qwen3-MoE", ("qwen3_moe",), QK_NORM_LAYER, fields={"qk_norm": True},
           keys={"num_experts": ("num_experts", "num_local_experts")},  # transformers 5 saves the latter
           config_hook=lambda v: {**qwen_moe_fields(v), **_llama_bias(v)}, experts=Experts()),
    Family("Mixtral", ("mixtral",), LLAMA_LAYER, config_hook=_mixtral,
           experts=Experts(prefix=("block_sparse_moe.", "mlp."), names=("w1", "w3", "w2"))),
    Family("Phi-3", ("phi3",),
           {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj", "ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
           config_hook=_phi3),
    Family("Gemma", ("gemma",), LLAMA_LAYER, config_hook=_gemma,
           layer_hook=lambda t, cfg, i: _plus_one(t, ("ln1", "ln2")), model_hook=lambda t, cfg: _plus_one(t, ("norm",))),
    Family("Gemma 2", ("gemma2",), GEMMA2_LAYER, config_hook=_gemma2,
           layer_hook=lambda t, cfg, i: _plus_one(t, ("ln1", "ln2", "post_ln1", "post_ln2")),
           model_hook=lambda t, cfg: _plus_one(t, ("norm",))),
    Family("Gemma 3", ("gemma3_text",), GEMMA3_LAYER, fields={"qk_norm": True}, view_hook=_gemma3_view,
           config_hook=_gemma3,
           layer_hook=lambda t, cfg, i: _plus_one(t, ("ln1", "ln2", "post_ln1", "post_ln2", "q_norm", "k_norm")),
           model_hook=lambda t, cfg: _plus_one(t, ("norm",))),
    Family("GLM", ("glm",), GLM_LAYER, fields={"rope_interleaved": True},
           config_hook=lambda v: {"attention_bias": bool(v.get("attention_bias", True))}),
    Family("GLM-4-0414", ("glm4",),
           {**GLM_LAYER, "post_ln1": "post_self_attn_layernorm", "post_ln2": "post_mlp_layernorm"},
           fields={"rope_interleaved": True, "sandwich_norms": True},
           config_hook=lambda v: {"attention_bias": bool(v.get("attention_bias", True))}),
    Family("Falcon", ("falcon", "RefinedWeb", "RefinedWebModel"),
           {"qkv_grouped": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h", "ln1": ("ln_attn", "input_layernorm"),
            "ln2": ("ln_mlp", "post_attention_layernorm")},
           prefix="transformer.h.{i}.", embed="transformer.word_embeddings", norm="transformer.ln_f",
           keys={"num_attention_heads": ("num_attention_heads", "n_head"),
                 "num_hidden_layers": ("num_hidden_layers", "n_layer"), "num_kv_heads": ("num_kv_heads", "n_head_kv"),
                 "rms_norm_eps": "layer_norm_epsilon"},
           view_hook=_falcon_view, config_hook=_falcon),
    Family("Dbrx", ("dbrx",),
           {"qkv": "norm_attn_norm.attn.Wqkv", "o": "norm_attn_norm.attn.out_proj", "ln1": "norm_attn_norm.norm_1",
            "ln2": "norm_attn_norm.norm_2"},
           prefix="transformer.blocks.{i}.", embed="transformer.wte", norm="transformer.norm_f",
           keys={"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                 "max_position_embeddings": "max_seq_len"},
           view_hook=_dbrx_view, config_hook=_dbrx, experts=Experts(read=_dbrx_experts)),
    # Checkpoints that ship remote code: their published tensor names and config keys.
    Family("QWen", ("qwen",),
           {"qkv": "attn.c_attn", "o": "attn.c_proj", "gate": "mlp.w2", "up": "mlp.w1", "down": "mlp.c_proj",
            "ln1": "ln_1", "ln2": "ln_2"},
           prefix="transformer.h.{i}.", embed="transformer.wte", norm="transformer.ln_f",
           keys={"hidden_size": ("hidden_size", "n_embd"), "num_attention_heads": ("num_attention_heads", "n_head"),
                 "num_hidden_layers": ("num_hidden_layers", "n_layer"),
                 "intermediate_size": ("intermediate_size", "ffn_hidden_size"), "head_dim": "kv_channels",
                 "rms_norm_eps": "layer_norm_epsilon", "rope_theta": "rotary_emb_base",
                 "partial_rotary_factor": "rotary_pct"},
           config_hook=_qwen_v1,
           tokenizer_hint="QWen's tiktoken tokenizer is remote code; Qwen1.5's tokenizer files (tokenizer.json, "
                          "tokenizer_config.json) have the same vocabulary and ids and the ChatML template"),
    Family("Baichuan", ("baichuan",),
           {"qkv": "self_attn.W_pack", **{k: v for k, v in LLAMA_LAYER.items() if k not in ("q", "k", "v")}},
           config_hook=_baichuan, model_hook=_baichuan2_head,
           tokenizer_hint="Baichuan's sentencepiece tokenizer is remote code; save a transformers tokenizer of its "
                          "tokenizer.model (e.g. LlamaTokenizerFast) beside the weights"),
    Family("ChatGLM2/3", ("chatglm",),
           {"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "gate_up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h", "ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
           prefix="transformer.encoder.layers.{i}.", embed="transformer.embedding.word_embeddings",
           norm="transformer.encoder.final_layernorm", head="transformer.output_layer",
           keys={"num_hidden_layers": "num_layers", "intermediate_size": "ffn_hidden_size", "head_dim": "kv_channels",
                 "rms_norm_eps": "layernorm_epsilon", "max_position_embeddings": "seq_length",
                 "vocab_size": ("padded_vocab_size", "vocab_size")},
           view_hook=_chatglm_view, config_hook=_chatglm,
           tokenizer_hint="ChatGLM's sentencepiece tokenizer is remote code; save a transformers tokenizer of its "
                          "tokenizer.model beside the weights"),
    Family("DeepSeek-MoE", ("deepseek",), LLAMA_LAYER, keys={"num_experts": "n_routed_experts"},
           config_hook=_deepseek, experts=Experts(shared="shared_experts.")),
    Family("DeepSeek-V2", ("deepseek_v2",), MLA_LAYER, keys={"num_experts": "n_routed_experts"}, optional=MLA_Q,
           config_hook=lambda v: _deepseek_mla(v, "greedy", "softmax", True), layer_hook=mla.rope_rows,
           experts=Experts(shared="shared_experts.")),
    Family("DeepSeek-V3", ("deepseek_v3",), MLA_LAYER, keys={"num_experts": "n_routed_experts"}, optional=MLA_Q,
           config_hook=_deepseek_v3, layer_hook=mla.rope_rows,
           experts=Experts(shared="shared_experts.", router_bias="gate.e_score_correction_bias")),
)

# Families whose attention the paged kernels (cluster/kernels/attention.py) cannot compute yet, and what they lack.
REFUSED = {
    "gemma3": ("its SigLIP vision tower and projector (Gemma3ForConditionalGeneration); only the text model "
               "(model_type gemma3_text) is served"),
}

BY_MODEL_TYPE: dict[str, Family] = {t: fam for fam in FAMILIES for t in fam.model_types}
# vision-language models (cluster/convert/vlm.py): llava and llava_next (a Llama-family language model), qwen2_vl and
# qwen2_5_vl (Qwen2)
SUPPORTED = sorted(BY_MODEL_TYPE) + ["llava", "llava_next", "qwen2_5_vl", "qwen2_vl"]
SUPPORTED += ["deepseek_vl", "deepseek_vl_hybrid"]  # DeepSeek-VL (a Llama language model)
SUPPORTED += ["internvl"]  # InternVL (cluster/convert/internvl.py): a Qwen2 or Llama language model


def check_supported(hf: dict) -> None:
    """Refuse an unsupported model type (a vision-language model: its language model's) in one line, from the config
    alone."""
    from cluster.convert.vlm import text_model_type

    family_for(text_model_type(hf))


def family_for(model_type: str) -> Family:
    """The family of an HF model_type, or one line naming the supported ones."""
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} is not supported: it needs {REFUSED[model_type]}; supported: "
                         f"{', '.join(SUPPORTED)}")
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return BY_MODEL_TYPE[model_type]
