"""DeepSeek-VL's image side: transformers' own DeepseekVLModel (or DeepseekVLHybridModel), built on the checkpoint's
config with a zero-layer stand-in for the language model (the engine runs that) which is dropped once built; its
get_image_features is what turns images into embeddings: SigLIP's patches through the aligner (the hybrid: with SAM's
1024 px features, neck and projection beside them). It runs once per image, not per token.

The image processor resizes every image's longer side to the tower's size and pads it to a square, so any image
stands for the same (image_size / patch_size)^2 tokens, as DeepseekVLProcessor expands <image_placeholder>."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from cluster.convert.deepseek_vl import VISION_FILE, canonical
from cluster.models.llava import image_digest


def _no_init():
    """transformers' context that skips random init (every weight is loaded after); a no-op where it is missing."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def image_model(vision: dict) -> nn.Module:
    """DeepseekVLModel / DeepseekVLHybridModel on the checkpoint's towers, without its language model."""
    import transformers

    hybrid = vision["kind"] == "deepseek_vl_hybrid"
    stand_in = {"model_type": "llama", "hidden_size": vision["text_hidden_size"], "num_hidden_layers": 0,
                "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 1, "vocab_size": 1,
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    kw = {"high_res_vision_config": vision["high_res_vision_config"]} if hybrid else {}
    name = "DeepseekVLHybrid" if hybrid else "DeepseekVL"
    config = getattr(transformers, name + "Config")(text_config=stand_in, vision_config=vision["vision_config"],
                                                    image_token_id=vision["image_token_id"], **kw)
    with _no_init():
        model = getattr(transformers, name + "Model")(config)
    del model.language_model
    return model


class DeepseekVLEncoder(nn.Module):
    def __init__(self, model_dir: Path, vision: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor

        self.hybrid = vision["kind"] == "deepseek_vl_hybrid"
        self.tokens_per_image = vision["image_seq_len"]
        self.model = image_model(vision)
        weights = load_file(str(Path(model_dir) / VISION_FILE))
        names = {canonical(k): k for k in self.model.state_dict()}  # this transformers' names, inner levels included
        self.model.load_state_dict({names.get(k, k): v for k, v in weights.items()}, strict=True)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def preprocess(self, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PIL images -> (pixels [n_images, 3, S, S], resized and padded to the tower's square; the hybrid's SAM
        pixels [n_images, 3, 1024, 1024] as the second tensor, else None)."""
        out = self.processor(images, return_tensors="pt")
        return out["pixel_values"], out["high_res_pixel_values"] if self.hybrid else None

    def token_counts(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> list[int]:
        return [self.tokens_per_image] * pixel_values.shape[0]

    def digests(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> list[int]:
        """One digest per image, of all the pixels the model sees of it (the hybrid: both resolutions)."""
        if grid is None:
            return [image_digest(p) for p in pixel_values]
        return [image_digest(torch.cat([p.flatten(), h.flatten()])) for p, h in zip(pixel_values, grid)]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """-> [n_images * tokens_per_image, hidden]: get_image_features' aligned features, images in order."""
        args = [pixel_values.to(self.device, self.dtype)]
        if self.hybrid:
            args.append(grid.to(self.device, self.dtype))
        out = self.model.get_image_features(*args)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # older transformers: the tensor
        if feats.shape[:2] != (pixel_values.shape[0], self.tokens_per_image):
            raise RuntimeError(f"DeepSeek-VL made {tuple(feats.shape[:2])} features for {pixel_values.shape[0]} "
                               f"image(s) of {self.tokens_per_image} tokens")
        return feats.reshape(-1, feats.shape[-1])
