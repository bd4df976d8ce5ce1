"""InternVL checkpoints (transformers' native `internvl`: InternVL2.5-hf, InternVL3-hf): converted as LLaVA's are
(cluster/convert/llava.py). The language model converts as its own family (Qwen2 for InternVL3, Llama for the
InternLM2-based ones, which the hf conversion writes as Llama); the InternViT tower (InternVLVisionModel) and the
multi_modal_projector (pixel shuffle, LayerNorm, two-layer MLP) go whole to `vision.safetensors`, with the image
processor (GotOcr2ImageProcessor: its min_patches / max_patches choose each image's tile grid) beside them.

Both checkpoint layouts are read: `language_model.model.*` / `vision_tower.*` (what transformers saves) and
`model.language_model.*` / `model.vision_tower.*` (transformers 5 in memory)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cluster.convert import llava

if TYPE_CHECKING:  # the config checks (families.check_supported) import this without torch
    import torch

# InternVLProcessor's tokenizer attributes (start_image_token, end_image_token): what it writes around each image's
# <IMG_CONTEXT> run; every InternVL-hf tokenizer has them as special tokens
IMAGE_START, IMAGE_END = "<img>", "</img>"


def accepts(hf: dict) -> bool:
    return hf.get("model_type") == "internvl"


def text_config(hf: dict) -> dict:
    """The language model's HF config (Qwen2 unless it says otherwise, as InternVLConfig defaults). Tying follows
    the top-level tie_word_embeddings where the config has one: transformers ties InternVLForConditionalGeneration's
    lm_head by it."""
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "qwen2")
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = bool(hf["tie_word_embeddings"])
    return text


def text_reader(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Language-model names (model.layers.*, lm_head.weight) -> the InternVL checkpoint's."""
    from cluster.convert.vlm import renamed_reader

    def candidates(name: str) -> tuple[str, ...]:
        rest = name.removeprefix("model.")
        return f"language_model.{name}", f"model.language_model.{rest}", name

    return renamed_reader(get, candidates, "InternVL")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def vision_fields(hf: dict) -> dict:
    """What the engine needs to turn images into embeddings; stored in ModelConfig.vision. image_seq_len is per
    tile here: an image's count is its tile count times it (cluster/models/internvl.py)."""
    vc = dict(hf["vision_config"])
    if vc.get("model_type", "internvl_vision") != "internvl_vision":
        raise ValueError(f"InternVL vision tower {vc.get('model_type')!r} is not supported; supported: internvl_vision")
    ratio = float(hf.get("downsample_ratio", 0.5))
    (ih, iw), (ph, pw) = _pair(vc.get("image_size", 448)), _pair(vc.get("patch_size", 14))
    side = int(1 / ratio)
    if ih != iw or ih % ph or (ih // ph) % side:
        raise ValueError(f"InternVL tiles of {ih} x {iw} px in {ph} px patches do not pixel-shuffle by {ratio}")
    per_tile = (ih // ph) ** 2 // side ** 2
    if int(hf.get("image_seq_length", per_tile)) != per_tile:
        raise ValueError(f"InternVL image_seq_length {hf['image_seq_length']} is not the {per_tile} tokens a tile "
                         "makes")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "default":  # CLS kept: the features are no square grid to pixel-shuffle (transformers fails too)
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; supported: default")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r} is not supported; supported: one layer index")
    token = hf.get("image_token_id", hf.get("image_token_index"))
    if token is None:
        raise ValueError("InternVL config has no image_token_id")
    return {"kind": "internvl", "vision_config": vc, "image_token_id": int(token), "image_seq_len": per_tile,
            "feature_layer": layer,
            "downsample_ratio": ratio, "projector_act": hf.get("projector_hidden_act", "gelu"),
            "image_start": IMAGE_START, "image_end": IMAGE_END}


def vision_tensors(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower (tower.*, InternVLVisionModel's names) and the projector (projector.*)."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(getattr(get, "names", set())):
        rest = name.removeprefix("model.")
        for prefix, key in (("vision_tower.", "tower."), ("multi_modal_projector.", "projector.")):
            if rest.startswith(prefix):
                out[key + rest[len(prefix):]] = get(name)
    if not any(k.startswith("projector.") for k in out) or not any(k.startswith("tower.") for k in out):
        raise KeyError("InternVL checkpoint lacks its vision_tower or multi_modal_projector tensors")
    return out


def save_vision(get: Callable[[str], torch.Tensor], src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    save_file({k: v.to(dtype).contiguous() for k, v in vision_tensors(get).items()}, str(out_dir / llava.VISION_FILE))
    AutoImageProcessor.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
