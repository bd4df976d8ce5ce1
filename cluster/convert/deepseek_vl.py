"""DeepSeek-VL checkpoints (transformers' `deepseek_vl`: SigLIP tower + aligner; `deepseek_vl_hybrid`: also SAM's
1024 px tower, its neck and projection): the language model is a Llama and converts as one; every image tensor of
the checkpoint (vision_model.*, aligner.*, high_res_vision_*) is written whole to `vision.safetensors`, under
DeepseekVLModel's own names, with the image processor and the processor's chat template beside it (they run once per
image, on rank 0: cluster/models/deepseek_vl.py).

Both checkpoint layouts are read: `model.language_model.*` / `model.vision_model.*` (what transformers saves, the
hub's deepseek-community checkpoints) and `language_model.model.*` / `vision_model.*`. The towers' inner level
(SigLIP's `vision_model.`, SAM's `vision_encoder.`), which transformers versions differ on, is dropped here and put
back at load if the installed transformers has it.

Ties: transformers ties the LM head to the embeddings on the top-level `tie_word_embeddings` (DeepseekVLConfig's
default: true), whatever `text_config` says, so the converter does too."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cluster.convert.llava import VISION_FILE

if TYPE_CHECKING:  # the config checks (families.check_supported) import this without torch
    import torch

MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")
IMAGE_TOKEN_ID = 100015  # DeepseekVLConfig's default: <image_placeholder>
IMAGE_PREFIXES = ("vision_model.", "aligner.", "high_res_vision_")
INNER_LEVELS = {"vision_model.vision_model.": "vision_model.",  # transformers 4's SiglipVisionModel
                "high_res_vision_model.vision_encoder.": "high_res_vision_model."}  # SamVisionModel's encoder


def accepts(hf: dict) -> bool:
    return hf.get("model_type") in MODEL_TYPES


def text_config(hf: dict) -> dict:
    """The language model's HF config (a Llama), tied as transformers ties it: on the top-level flag."""
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return text


def vision_fields(hf: dict) -> dict:
    """What the engine needs to rebuild transformers' image side and count image tokens; stored in
    ModelConfig.vision. Every image is resized and padded to one square, so each stands for (image_size /
    patch_size)^2 tokens, SigLIP's patches (the hybrid's SAM features are resampled to the same grid)."""
    if "vision_config" not in hf:
        raise ValueError(f"{hf['model_type']} config has no vision_config")
    vc = dict(hf["vision_config"])
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(f"DeepSeek-VL vision tower {vc.get('model_type')!r} is not supported; supported: "
                         "siglip_vision_model")
    text = hf.get("text_config") or {}
    out = {"kind": hf["model_type"], "vision_config": vc, "text_hidden_size": int(text.get("hidden_size", 4096)),
           "image_token_id": int(hf.get("image_token_id", IMAGE_TOKEN_ID)),
           "image_seq_len": (vc["image_size"] // vc["patch_size"]) ** 2,
           "content_parts": True}  # its processor's chat template iterates content parts (cluster/engine/tokenizer.py)
    if hf["model_type"] == "deepseek_vl_hybrid":
        if "high_res_vision_config" not in hf:
            raise ValueError("deepseek_vl_hybrid config has no high_res_vision_config")
        out["high_res_vision_config"] = dict(hf["high_res_vision_config"])
    return out


def text_reader(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Language-model names (model.layers.*, lm_head.weight) -> the checkpoint's."""
    from cluster.convert.vlm import renamed_reader

    def candidates(name: str) -> tuple[str, ...]:
        rest = name.removeprefix("model.")
        return f"model.language_model.{rest}", f"language_model.{name}", name

    return renamed_reader(get, candidates, "DeepSeek-VL")


def canonical(name: str) -> str:
    """An image tensor's name without the towers' inner level (see the module's docstring)."""
    for nested, flat in INNER_LEVELS.items():
        if name.startswith(nested):
            return flat + name[len(nested):]
    return name


def vision_tensors(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the image side, under DeepseekVLModel's (or DeepseekVLHybridModel's) names."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(getattr(get, "names", set())):
        rest = name.removeprefix("model.")
        if rest.startswith(IMAGE_PREFIXES):
            out[canonical(rest)] = get(name)
    if not any(k.startswith("aligner.") for k in out) or not any(k.startswith("vision_model.") for k in out):
        raise KeyError("DeepSeek-VL checkpoint lacks its vision tower (vision_model.*) or its aligner")
    return out


def processor_chat_template(src_dir: Path) -> str | None:
    """The chat template DeepseekVLProcessor applies (chat_template.jinja, the legacy chat_template.json, or
    processor_config.json's), read as transformers' processor reads it; None when the checkpoint has none."""
    from transformers.processing_utils import ProcessorMixin

    template = ProcessorMixin.get_processor_dict(str(src_dir))[0].get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


chat_template = processor_chat_template  # cluster/convert/hf.py: the engine's tokenizer applies the processor's


def save_vision(get: Callable[[str], torch.Tensor], src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    proc = Path(src_dir) / "processor_config.json"  # the processor's count of tokens an image stands for
    tokens = json.loads(proc.read_text()).get("num_image_tokens") if proc.exists() else None
    want = vision_fields(json.loads((Path(src_dir) / "config.json").read_text()))["image_seq_len"]
    if tokens is not None and int(tokens) != want:
        raise ValueError(f"DeepSeek-VL processor expands each image to {tokens} tokens, its vision tower makes {want}")
    save_file({k: v.to(dtype).contiguous() for k, v in vision_tensors(get).items()}, str(out_dir / VISION_FILE))
    AutoImageProcessor.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
