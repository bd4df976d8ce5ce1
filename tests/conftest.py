"""Shared fixtures: tiny random-weight checkpoints in real HF format (saved by transformers itself), so the loading
and conversion code is the real one, checked against transformers on the same weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from family_models import TINY  # noqa: E402 (the tiny shape; mla_models and the kinds below read it from here)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2 converted to the engine format (cached across runs in ~/.cache/cluster)."""
    from cluster.convert.cache import ensure_converted

    return ensure_converted(None, 1, "float32", progress=False)


@pytest.fixture(scope="session")
def tokenizer_dir(default_model_dir: Path) -> Path:
    return default_model_dir


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


def build_tiny(kind: str, tokenizer_dir: Path, out: Path):
    """Returns (checkpoint dir, the transformers model to compare with)."""
    import transformers as tf

    from family_models import KINDS, build_family

    if kind in KINDS:
        return build_family(kind, tokenizer_dir, out)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        from qwen_vl_models import build_qwen_vl

        return build_qwen_vl(kind, tokenizer_dir, out)
    if kind in ("deepseek_vl", "deepseek_vl_hybrid"):
        from deepseek_vl_models import build_deepseek_vl

        return build_deepseek_vl(tokenizer_dir, out, hybrid=kind == "deepseek_vl_hybrid")
    if kind == "llava_next":
        from llava_next_models import build_llava_next

        return build_llava_next(tokenizer_dir, out, TINY)
    if kind in ("internvl", "internvl_llama"):  # a Qwen2 language model (InternVL3), a Llama one (InternVL2.5)
        from internvl_models import build_internvl

        return build_internvl(tokenizer_dir, out, "llama" if kind == "internvl_llama" else "qwen2")
    torch.manual_seed({"llama": 0, "llama3": 1, "mistral": 2, "qwen2": 3, "internlm2": 0, "gqa1": 4, "mixtral": 6,
                       "qwen2_moe": 7, "llava": 8}[kind])
    if kind == "llava":
        return _build_llava(tokenizer_dir, out)
    if kind in ("llama", "internlm2"):
        cfg = tf.LlamaConfig(**TINY)
    elif kind == "gqa1":
        cfg = tf.LlamaConfig(**{**TINY, "num_key_value_heads": 1})
    elif kind == "llama3":
        cfg = tf.LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif kind == "mistral":
        cfg = tf.MistralConfig(**TINY, sliding_window=None)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    elif kind == "qwen2_moe":  # layer 0 experts + a gated shared expert, layer 1 a dense MLP
        cfg = tf.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                shared_expert_intermediate_size=90, mlp_only_layers=[1])
    else:
        raise ValueError(kind)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    if kind in ("qwen2", "qwen2_moe"):  # make the qkv bias matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    _save(model, tokenizer_dir, out)
    if kind == "internlm2":
        _repack_internlm2(out, cfg)
    return out, model


IMAGE_TOKEN = "<image>"


def _build_llava(tokenizer_dir: Path, out: Path):
    """LLaVA-1.5's layout at toy size: CLIP tower (32 px images, 8 px patches: 16 image tokens), a two-layer
    projector and a Llama; SmolLM2's tokenizer with an <image> token added; a CLIP image processor."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tf.LlamaConfig(**{**TINY, "vocab_size": image_id + 64})
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=32, patch_size=8, initializer_range=0.08)
    cfg = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_id, image_seq_length=16)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out, model


def _repack_internlm2(path: Path, cfg) -> None:
    """Rewrite a Llama checkpoint in InternLM2's layout: packed wqkv per KV group, w1/w3/w2, its own names."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    heads, kv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    group = heads // kv
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(kv, group, d, h)
        k = sd[p + "self_attn.k_proj.weight"].view(kv, 1, d, h)
        v = sd[p + "self_attn.v_proj.weight"].view(kv, 1, d, h)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    (path / "model.safetensors").unlink()
    save_file(out, str(path / "model.safetensors"))
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": cfg.vocab_size,
              "hidden_size": h, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": 10000.0, "max_position_embeddings": cfg.max_position_embeddings, "bias": False,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """kind -> (checkpoint dir, transformers model); built lazily, once per session."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny(kind, tokenizer_dir, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("converted"))


def hf_greedy(model, ids: list[int], n: int, repetition_penalty: float = 1.0, **inputs) -> list[int]:
    """transformers `generate`, greedy, not stopping at EOS (so EOS logits stay untouched, as with ignore_eos).
    inputs: more model inputs (pixel_values)."""
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = []  # None would fall back to the model default
    gc.do_sample = False
    gc.max_new_tokens = n
    gc.pad_token_id = 0
    gc.repetition_penalty = repetition_penalty
    out = model.generate(torch.tensor([ids]), generation_config=gc, **inputs)
    return out[0, len(ids):].tolist()
