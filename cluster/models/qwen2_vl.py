"""Qwen2-VL's and Qwen2.5-VL's image side: the vision transformer with its patch merger (transformers' own module:
it runs once per prompt, over all its images, not per token), turning images of any size into one embedding per
2 x 2 merged patch, in the language model's hidden space. Image sizes vary, so each image has its own token count
(its grid's t * h * w / merge^2) and the M-RoPE ids of its tokens follow its grid (cluster/layers/mrope.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cluster.convert.llava import VISION_FILE
from cluster.models.llava import image_digest

TOWERS = {"qwen2_vl": ("Qwen2VLVisionConfig", "qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel"),
          "qwen2_5_vl": ("Qwen2_5_VLVisionConfig",
                         "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel")}
MAX_ASPECT = 200  # the image processor's limit on max(height, width) / min(height, width)


def _tower(kind: str, vision_config: dict) -> nn.Module:
    import importlib

    import transformers

    config_name, path = TOWERS[kind]
    module, cls = path.rsplit(".", 1)
    config = getattr(transformers, config_name)(**vision_config)
    return getattr(importlib.import_module(f"transformers.models.{module}"), cls)(config)


class QwenVisionEncoder(nn.Module):
    def __init__(self, model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor

        self.merge = vision["spatial_merge_size"]
        self.tower = _tower(vision["kind"], vision["vision_config"])
        weights = load_file(str(Path(model_dir) / VISION_FILE))
        self.tower.load_state_dict({k[len("tower."):]: v for k, v in weights.items()}, strict=True)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def preprocess(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (every image's patches, flattened [patches, C * T * P * P]; their grids [n, 3] (t, h, w))."""
        for im in images:  # transformers' smart_resize refuses these, in its own words
            if max(im.size) > MAX_ASPECT * min(im.size):
                raise ValueError(f"image is {im.width} x {im.height} pixels; an aspect ratio over {MAX_ASPECT} is not "
                                 "accepted: crop or pad it")
        out = self.processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def token_counts(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> list[int]:
        return (grid.prod(-1) // self.merge ** 2).tolist()

    def digests(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> list[int]:
        """One digest per image, of its patches and its grid (the same patches in another shape are another image)."""
        chunks = pixel_values.split(grid.prod(-1).tolist())
        return [image_digest(torch.cat([g.float(), c.flatten().float()])) for c, g in zip(chunks, grid)]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        """-> [sum of token counts, hidden]: the merger's output, images in order (get_image_features)."""
        out = self.tower(pixel_values.to(self.device, self.dtype), grid_thw=grid.to(self.device))
        return out.pooler_output

    def encode_many(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Several requests' images in one call of the tower: their patches concatenated, their grids stacked (the
        tower's cu_seqlens, window index and rotary ids are per image, so each image's rows come out as alone) ->
        each request's [its token count, hidden], in order."""
        if len(items) == 1:
            return [self.encode(*items[0])]
        out = self.encode(torch.cat([p for p, _ in items]), torch.cat([g for _, g in items]))
        return list(out.split([sum(self.token_counts(p, g)) for p, g in items]))
