"""LLaVA's image side: CLIP vision tower (transformers' own module: it runs once per image, not per token) and
the two-layer projector, turning images into embeddings in the language model's hidden space."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from cluster.convert.llava import VISION_FILE


class VisionEncoder(nn.Module):
    def __init__(self, model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel
        from transformers.activations import ACT2FN

        self.feature_layer = vision["feature_layer"]
        self.select = vision["select_strategy"]
        self.tokens_per_image = vision["image_seq_len"]
        weights = load_file(str(Path(model_dir) / VISION_FILE))
        self.tower = CLIPVisionModel(CLIPVisionConfig(**vision["vision_config"]))
        proj = {k[len("projector."):]: v for k, v in weights.items() if k.startswith("projector.")}
        hidden_in, hidden = proj["linear_1.weight"].shape[1], proj["linear_2.weight"].shape[0]
        bias = "linear_1.bias" in proj
        self.projector = nn.ModuleDict({"linear_1": nn.Linear(hidden_in, hidden, bias=bias),
                                        "linear_2": nn.Linear(hidden, hidden, bias=bias)})
        self.act = ACT2FN[vision["projector_act"]]
        tower = {k[len("tower."):]: v for k, v in weights.items() if k.startswith("tower.")}
        if any(k.startswith("vision_model.") for k in self.tower.state_dict()):  # transformers before 5.x
            tower = {"vision_model." + k: v for k, v in tower.items()}
        self.tower.load_state_dict(tower, strict=True)
        self.projector.load_state_dict(proj, strict=True)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def pixel_values(self, images: list) -> torch.Tensor:
        return self.processor(images, return_tensors="pt")["pixel_values"]

    def preprocess(self, images: list) -> tuple[torch.Tensor, None]:
        """(pixels [n_images, 3, H, W], no grid: every image is resized to the tower's one size)."""
        return self.pixel_values(images), None

    def token_counts(self, pixel_values: torch.Tensor, grid: None = None) -> list[int]:
        return [self.tokens_per_image] * pixel_values.shape[0]

    def digests(self, pixel_values: torch.Tensor, grid: None = None) -> list[int]:
        return [image_digest(p) for p in pixel_values]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid: None = None) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images * tokens_per_image, hidden]: as LlavaForConditionalGeneration does."""
        x = self.features(pixel_values)
        return x.reshape(-1, x.shape[-1])

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> the projected features of each [n, tokens, hidden] (the tower's chosen layers, CLS
        dropped by the default strategy)."""
        out = self.tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if self.select == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.projector["linear_2"](self.act(self.projector["linear_1"](feats)))


def image_digest(pixel_values: torch.Tensor) -> int:
    """A stable 60-bit digest of one image's pixels, for the prefix cache's keys."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 4
