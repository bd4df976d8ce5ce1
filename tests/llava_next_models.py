"""A tiny random-weight LLaVA-NeXT checkpoint saved by transformers itself: a CLIP tower on 16 px tiles (4 px
patches: 16 features a tile), any-resolution grids of 16 x 32, 32 x 16 and 32 x 32 pixels (so an image's tile
count and unpadded feature count follow its aspect ratio), a two-layer projector, image_newline and a Llama;
SmolLM2's tokenizer with an <image> token added; a LLaVA-NeXT image processor."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def build_llava_next(tokenizer_dir: Path, out: Path, tiny: dict):
    """Returns (checkpoint dir, the transformers model)."""
    import transformers as tf

    torch.manual_seed(13)
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tf.LlamaConfig(**{**tiny, "vocab_size": image_id + 64})
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=16, patch_size=4, initializer_range=0.08)
    cfg = tf.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=image_id,
                             image_grid_pinpoints=PINPOINTS, image_seq_length=16)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tf.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                               image_grid_pinpoints=PINPOINTS).save_pretrained(out)
    return out, model
