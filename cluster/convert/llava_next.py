"""LLaVA-NeXT checkpoints (any-resolution tiling): converted as LLaVA's are (cluster/convert/llava.py): the
language model as its Llama family, the CLIP tower and projector whole to `vision.safetensors`, with
`image_newline` (appended per row of the unpadded tile features) beside them as `newline`, and the image processor
(LlavaNextImageProcessor: its image_grid_pinpoints choose each image's tile grid)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cluster.convert import llava

if TYPE_CHECKING:  # the config checks (families.check_supported) import this without torch
    import torch

text_config = llava.text_config
text_reader = llava.text_reader
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LlavaNextConfig's


def accepts(hf: dict) -> bool:
    return hf.get("model_type") == "llava_next"


def vision_fields(hf: dict) -> dict:
    """LLaVA's fields, plus the grids any-resolution tiling picks from; an image's token count follows its size
    (cluster/models/llava_next.py)."""
    out = llava.vision_fields(hf)
    pinpoints = hf.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    return {**out, "kind": "llava_next", "image_grid_pinpoints": [[int(h), int(w)] for h, w in pinpoints],
            "projector_bias": bool(hf.get("multimodal_projector_bias", True))}


def vision_tensors(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    out = llava.vision_tensors(get)
    names = getattr(get, "names", set())
    name = next((n for n in ("image_newline", "model.image_newline") if n in names), None)
    if name is None:
        raise KeyError("LLaVA-NeXT checkpoint lacks its image_newline tensor")
    out["newline"] = get(name)
    return out


def save_vision(get: Callable[[str], torch.Tensor], src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    save_file({k: v.to(dtype).contiguous() for k, v in vision_tensors(get).items()}, str(out_dir / llava.VISION_FILE))
    AutoImageProcessor.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
