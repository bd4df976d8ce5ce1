"""Tiny random-weight InternVL checkpoints saved by transformers itself: an InternViT tower on 16 px tiles (4 px
patches: 16 features a tile, pixel-shuffled to 4 tokens), the LayerNorm + MLP projector and a Qwen2 (InternVL3's)
or Llama (InternLM2-based InternVL2.5's, as the hf conversion writes them) language model; SmolLM2's tokenizer with
InternVL's <img>, </img>, <IMG_CONTEXT> and <video> tokens (named as InternVLProcessor reads them) and InternVL's
chat template; a GotOcr2 image processor of 1 to 6 tiles (so an image is 4 to 28 tokens, by its aspect ratio).

benchmarks/gpu_vlm.py prepares its InternVL case with build_internvl."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
IMAGE_TOKEN = IMAGE_TOKENS["context_image_token"]
CHAT_TEMPLATE = (  # the one transformers' convert_internvl_weights_to_hf.py gives InternVL-hf checkpoints
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
TILE, PATCH, MAX_TILES = 16, 4, 6
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.08)


def internvl_tokenizer(tokenizer_dir: Path):
    """SmolLM2's tokenizer with InternVL's image tokens as named special tokens and InternVL's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=IMAGE_TOKENS)
    tok.add_tokens(list(IMAGE_TOKENS.values()), special_tokens=True)  # no-op where the names already added them
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_internvl(tokenizer_dir: Path, out: Path, text: str = "qwen2"):
    """text: qwen2 (untied head, q/k/v biases made to matter) or llama (tied head). Returns (checkpoint dir, the
    transformers InternVLForConditionalGeneration)."""
    import transformers as tf

    torch.manual_seed({"qwen2": 31, "llama": 32}[text])
    tok = internvl_tokenizer(tokenizer_dir)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    tied = text == "llama"
    lm = (tf.Qwen2Config if text == "qwen2" else tf.LlamaConfig)(
        **TEXT, vocab_size=len(tok) + 60, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=TILE, patch_size=PATCH, initializer_range=0.08)
    cfg = tf.InternVLConfig(text_config=lm, vision_config=vision, image_token_id=image_id,
                            image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tied)
    model = tf.InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # layer scales and norms off their constant inits: a misread one shows
        for name, p in model.named_parameters():
            if name.startswith("model.language_model."):
                if text == "qwen2" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    p.normal_(std=0.5)
            elif "lambda" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tf.GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, min_patches=1, max_patches=MAX_TILES,
                             crop_to_patches=False).save_pretrained(out)  # as the hub's: the processor crops
    return out, model
