"""LLaVA-NeXT's image side: any-resolution tiling. The image processor (LlavaNextImageProcessor) picks each image's
grid from image_grid_pinpoints and cuts the resized image into tower-sized tiles plus a base image; LLaVA's CLIP
tower and projector (cluster/models/llava.py) encode every tile; transformers' own pack_image_features unpads the
tile features to the image's aspect ratio and appends image_newline per row. An image's token count follows its
size, computed as LlavaNextProcessor does (_get_number_of_features), and checked against the packed features."""
from __future__ import annotations

from pathlib import Path

import torch

from cluster.convert.llava import VISION_FILE
from cluster.models.llava import VisionEncoder, image_digest



class _Counter:
    """transformers' LlavaNextProcessor token count, without its tokenizer: the two methods it uses, on the
    fields they read."""

    def __init__(self, image_processor, patch_size: int, num_additional_image_tokens: int):
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        self.image_processor, self.patch_size = image_processor, patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self._get_number_of_features = LlavaNextProcessor._get_number_of_features.__get__(self)
        self._get_unpadded_features = LlavaNextProcessor._get_unpadded_features.__get__(self)


class _Packer:
    """transformers' LlavaNextModel.pack_image_features, on a config of the checkpoint's tower and grids."""

    def __init__(self, config):
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        self.config = config
        self.pack_image_features = LlavaNextModel.pack_image_features.__get__(self)


class LlavaNextEncoder(VisionEncoder):
    def __init__(self, model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(model_dir, vision, device, dtype)
        from safetensors.torch import load_file
        from transformers import CLIPVisionConfig, LlavaNextConfig

        self.newline = load_file(str(Path(model_dir) / VISION_FILE))["newline"].to(device, dtype)
        self.pinpoints = [list(p) for p in vision["image_grid_pinpoints"]]
        vc = CLIPVisionConfig(**vision["vision_config"])
        self.tile, self.patch = vc.image_size, vc.patch_size
        config = LlavaNextConfig(vision_config=vc, image_grid_pinpoints=self.pinpoints,
                                 vision_feature_select_strategy=self.select, vision_feature_layer=self.feature_layer)
        self.packer = _Packer(config)
        self.counter = _Counter(self.processor, self.patch, 1)  # CLIP's CLS: the base tile's extra feature

    def preprocess(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (tiles [n_images, max tiles, 3, tile, tile], zero-padded past each image's own; each
        image's (height, width) [n_images, 2]). Any aspect ratio: a thin strip's tiles unpad to few or no rows,
        as in transformers."""
        out = self.processor(images, return_tensors="pt")
        return out["pixel_values"], out["image_sizes"]

    def num_tiles(self, grid: torch.Tensor) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(size.tolist(), self.pinpoints, self.tile) for size in grid]

    def token_counts(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[int]:
        """As LlavaNextProcessor.replace_image_token: its feature count, less CLS under the default strategy."""
        h, w = pixel_values.shape[-2:]
        drop = 1 if self.select == "default" else 0
        return [self.counter._get_number_of_features(int(oh), int(ow), h, w) - drop for oh, ow in grid.tolist()]

    def digests(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[int]:
        """One digest per image, of its own tiles and its size (which sets the unpadding)."""
        return [image_digest(torch.cat([size.float(), tiles[:n].flatten().float()]))
                for tiles, size, n in zip(pixel_values, grid, self.num_tiles(grid))]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """-> [sum of token counts, hidden]: LlavaNextModel.get_image_features' packed features, images in order."""
        n = self.num_tiles(grid)
        feats = self.features(torch.cat([tiles[:k] for tiles, k in zip(pixel_values, n)]))
        packed, lens = self.packer.pack_image_features(list(feats.split(n)), grid, self.select, self.newline)
        counts = self.token_counts(pixel_values, grid)
        if lens.tolist() != counts:
            raise RuntimeError(f"LLaVA-NeXT packed {lens.tolist()} features for images counted as {counts} tokens")
        return torch.cat(packed)
