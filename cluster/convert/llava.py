"""LLaVA checkpoints: the language model converts like any Llama-family model; the vision tower and projector are
written beside it, whole, to `vision.safetensors` (they run once per image, on rank 0).

Both checkpoint layouts are read: `language_model.model.*` / `vision_tower.vision_model.*` (llava-hf, and what
transformers saves) and `model.language_model.*` / `model.vision_tower.*` (transformers 5 in memory)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the config checks (families.check_supported) import this without torch
    import torch

VISION_FILE = "vision.safetensors"


def is_llava(hf: dict) -> bool:
    return hf.get("model_type") == "llava"


accepts = is_llava  # cluster/convert/vlm.py


def text_config(hf: dict) -> dict:
    """The language model's HF config, with what LLaVA keeps at the top level folded in."""
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    for k in ("tie_word_embeddings",):
        if k not in text and k in hf:
            text[k] = hf[k]
    return text


def vision_fields(hf: dict) -> dict:
    """What the engine needs to turn images into embeddings; stored in ModelConfig.vision."""
    vc = dict(hf["vision_config"])
    layer = hf.get("vision_feature_layer", -2)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"LLaVA vision tower {vc.get('model_type')!r} is not supported; supported: clip_vision_model")
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    token = hf.get("image_token_index", hf.get("image_token_id"))
    if token is None:
        raise ValueError("LLaVA config has no image_token_index")
    return {"vision_config": vc, "image_token_id": int(token), "feature_layer": layer, "select_strategy": strategy,
            "projector_act": hf.get("projector_hidden_act", "gelu"),
            "image_seq_len": patches + (1 if strategy == "full" else 0)}


def text_reader(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Language-model names (model.layers.*, lm_head.weight) -> the LLaVA checkpoint's."""
    from cluster.convert.vlm import renamed_reader

    def candidates(name: str) -> tuple[str, ...]:
        rest = name[len("model."):] if name.startswith("model.") else name
        return f"language_model.{name}", f"model.language_model.{rest}", name

    return renamed_reader(get, candidates, "LLaVA")


def vision_tensors(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower (tower.*, CLIP's names without the vision_model. level, which transformers versions
    differ on) and the projector (projector.*)."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(getattr(get, "names", set())):
        rest = name[len("model."):] if name.startswith("model.") and not name.startswith("model.layers") else name
        if rest.startswith("vision_tower."):
            key = rest[len("vision_tower."):]
            out["tower." + key.removeprefix("vision_model.")] = get(name)
        elif rest.startswith("multi_modal_projector."):
            out["projector." + rest[len("multi_modal_projector."):]] = get(name)
    if not any(k.startswith("projector.") for k in out) or not any(k.startswith("tower.") for k in out):
        raise KeyError("LLaVA checkpoint lacks its vision tower or multi_modal_projector tensors")
    return out


def save_vision(get: Callable[[str], torch.Tensor], src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    save_file({k: v.to(dtype).contiguous() for k, v in vision_tensors(get).items()}, str(out_dir / VISION_FILE))
    AutoImageProcessor.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
