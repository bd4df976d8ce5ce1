"""InternVL's image side: dynamic tiling. The image processor (GotOcr2ImageProcessor, with crop_to_patches as
InternVLProcessor always asks) picks each image's tile grid from min_patches..max_patches by its aspect ratio and
cuts tower-sized tiles, plus a thumbnail of the whole image when there is more than one. transformers' own
InternVLVisionModel encodes every tile; as InternVLModel.get_image_features does, CLS is dropped, the patch grid is
pixel-shuffled (InternVLModel.pixel_shuffle: 2 x 2 patches into one feature) and the multi_modal_projector
(transformers' module) maps it into the language model's hidden space. An image's token count is its tile count
times image_seq_len (the tokens of one tile), as InternVLProcessor.replace_image_token writes it."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from cluster.convert.llava import VISION_FILE
from cluster.models.llava import image_digest


class InternVLEncoder(nn.Module):
    def __init__(self, model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, InternVLVisionConfig, InternVLVisionModel
        from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

        self.feature_layer = vision["feature_layer"]
        self.ratio = vision["downsample_ratio"]
        self.tokens_per_tile = vision["image_seq_len"]
        self.pixel_shuffle = InternVLModel.pixel_shuffle  # uses nothing of the model: called with self None
        weights = load_file(str(Path(model_dir) / VISION_FILE))
        tower = {k[len("tower."):]: v for k, v in weights.items() if k.startswith("tower.")}
        proj = {k[len("projector."):]: v for k, v in weights.items() if k.startswith("projector.")}
        vc = InternVLVisionConfig(**vision["vision_config"])
        self.tower = InternVLVisionModel(vc)
        # the projector reads only these fields of InternVLConfig; the language model's config is not needed
        config = SimpleNamespace(vision_config=vc, downsample_ratio=self.ratio,
                                 projector_hidden_act=vision["projector_act"],
                                 text_config=SimpleNamespace(hidden_size=proj["linear_2.weight"].shape[0]))
        self.projector = InternVLMultiModalProjector(config)
        self.tower.load_state_dict(tower, strict=True)
        self.projector.load_state_dict(proj, strict=True)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def preprocess(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (every image's tiles, in order [total tiles, 3, tile, tile]; each image's tile count
        [n_images], thumbnail included)."""
        out = self.processor(images, crop_to_patches=True, return_tensors="pt")
        return out["pixel_values"], torch.as_tensor(out["num_patches"], dtype=torch.long).reshape(-1)

    def token_counts(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[int]:
        return [int(n) * self.tokens_per_tile for n in grid.tolist()]

    def digests(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[int]:
        """One digest per image, of its own tiles and their count."""
        return [image_digest(torch.cat([n.reshape(1).float(), tiles.flatten().float()]))
                for tiles, n in zip(pixel_values.split(grid.tolist()), grid)]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """-> [sum of token counts, hidden]: get_image_features' projected features, tiles (so images) in order."""
        if int(grid.sum()) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} tiles for images counted as {grid.tolist()} tiles")
        out = self.tower(pixel_values.to(self.device, self.dtype), output_hidden_states=self.feature_layer != -1)
        feats = out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]
        feats = feats[:, 1:]  # CLS dropped (the default strategy, the only one a square grid allows)
        n, patches = feats.shape[:2]
        side = int(patches ** 0.5)
        feats = self.pixel_shuffle(None, feats.reshape(n, side, side, -1), scale_factor=self.ratio)
        feats = self.projector(feats.reshape(n, -1, feats.shape[-1]))
        return feats.reshape(-1, feats.shape[-1])
