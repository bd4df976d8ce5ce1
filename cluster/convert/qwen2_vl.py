"""Qwen2-VL and Qwen2.5-VL checkpoints: the language model is Qwen2 (q/k/v biases) and converts as one, with its
rope frequencies stored as usual; M-RoPE's three position ids and `mrope_section` live in ModelConfig.vision, for
the engine (cluster/layers/mrope.py). The vision tower and its patch merger are written beside it, whole, to
`vision.safetensors`, with the image processor (they run once per image, on rank 0).

Both checkpoint layouts are read: `model.layers.*` / `visual.*` (the hub's, and what transformers saves) and
`model.language_model.*` / `model.visual.*` (transformers 5 in memory). Configs come flat (the hub's, with
`rope_scaling: {type: mrope}`) or with a `text_config` (transformers 5)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the config checks (families.check_supported) import this without torch
    import torch

from cluster.convert.llava import VISION_FILE

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
             "rope_parameters", "bos_token_id", "eos_token_id", "hidden_act", "use_sliding_window", "head_dim")


def accepts(hf: dict) -> bool:
    return hf.get("model_type") in MODEL_TYPES


def _mrope_section(text: dict) -> list[int]:
    for key in ("rope_parameters", "rope_scaling"):
        section = (text.get(key) or {}).get("mrope_section")
        if section:
            return [int(s) for s in section]
    raise ValueError("Qwen2-VL config has no mrope_section (rope_parameters or rope_scaling)")


def _raw_text(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    for k in TEXT_KEYS:  # the hub's flat configs keep the language model's keys at the top level
        if k not in text and k in hf:
            text[k] = hf[k]
    return text


def text_config(hf: dict) -> dict:
    """The language model's config as a Qwen2 one: plain rope with the same frequencies (M-RoPE only chooses which
    position each frequency sees, per token)."""
    text = _raw_text(hf)
    if text.get("use_sliding_window"):
        raise ValueError("Qwen2-VL with use_sliding_window: true is not supported; supported: full attention")
    text["model_type"] = "qwen2"
    for key in ("rope_parameters", "rope_scaling"):
        rp = {k: v for k, v in dict(text.get(key) or {}).items() if k != "mrope_section"}
        if rp.get("rope_type", rp.get("type")) in ("mrope", "default"):
            rp.pop("type", None)
            rp["rope_type"] = "default"
        if rp:
            text[key] = rp
        else:
            text.pop(key, None)
    text.setdefault("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)))
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = bool(hf["tie_word_embeddings"]) or bool(text["tie_word_embeddings"])
    return text


def vision_fields(hf: dict) -> dict:
    """What the engine needs to turn images into embeddings and position them; stored in ModelConfig.vision."""
    text = _raw_text(hf)
    section = _mrope_section(text)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} does not cover head_dim / 2 = {head_dim // 2} frequencies")
    vc = dict(hf["vision_config"])
    if vc.get("model_type") == hf["model_type"]:  # old checkpoints name the tower's type as the model's
        vc.pop("model_type")
    ids = {k: int(hf[k]) for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")}
    return {"kind": hf["model_type"], "vision_config": vc, **ids, "mrope_section": section,
            "spatial_merge_size": int(vc.get("spatial_merge_size", 2))}


def text_reader(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Language-model names (model.layers.*, lm_head.weight) -> the checkpoint's."""
    from cluster.convert.vlm import renamed_reader

    return renamed_reader(get, lambda name: (name, "model.language_model." + name.removeprefix("model.")), "Qwen2-VL")


def vision_tensors(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower with its merger, as tower.* under the names of transformers' vision module."""
    out = {}
    for name in sorted(getattr(get, "names", set())):
        rest = name.removeprefix("model.")
        if rest.startswith("visual."):
            out["tower." + rest[len("visual."):]] = get(name)
    if not any(k.startswith("tower.merger.") for k in out):
        raise KeyError("Qwen2-VL checkpoint lacks its vision tower (visual.*) or its patch merger")
    return out


def save_vision(get: Callable[[str], torch.Tensor], src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    save_file({k: v.to(dtype).contiguous() for k, v in vision_tensors(get).items()}, str(out_dir / VISION_FILE))
    AutoImageProcessor.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
