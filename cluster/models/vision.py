"""The image encoder of a vision-language model, by ModelConfig.vision's kind. Every encoder has
preprocess(images) -> (pixels, grid or None), token_counts(pixels, grid), digests(pixels, grid) (one per image, for
the prefix cache's keys) and encode(pixels, grid) -> [image tokens, hidden]."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def vision_encoder(model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    kind = vision.get("kind", "llava")
    if kind == "llava":
        from cluster.models.llava import VisionEncoder

        return VisionEncoder(model_dir, vision, device, dtype)
    if kind == "llava_next":
        from cluster.models.llava_next import LlavaNextEncoder

        return LlavaNextEncoder(model_dir, vision, device, dtype)
    if kind in ("deepseek_vl", "deepseek_vl_hybrid"):
        from cluster.models.deepseek_vl import DeepseekVLEncoder

        return DeepseekVLEncoder(model_dir, vision, device, dtype)
    if kind == "internvl":
        from cluster.models.internvl import InternVLEncoder

        return InternVLEncoder(model_dir, vision, device, dtype)
    from cluster.models.qwen2_vl import QwenVisionEncoder

    return QwenVisionEncoder(model_dir, vision, device, dtype)
