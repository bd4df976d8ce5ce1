"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints saved by transformers itself, with SmolLM2's tokenizer plus
the Qwen-VL special tokens, Qwen2-VL's chat template and a small image processor (4 px patches merged 2 x 2, at
most 64 x 64 pixels: an image is tens of tokens, not thousands)."""
from __future__ import annotations

from pathlib import Path

import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PIXELS = dict(min_pixels=8 * 8, max_pixels=64 * 64, patch_size=4, merge_size=2, temporal_patch_size=2)


def build_qwen_vl(kind: str, tokenizer_dir: Path, out: Path):
    """kind: qwen2_vl or qwen2_5_vl. Returns (checkpoint dir, the transformers model)."""
    import transformers as tf

    torch.manual_seed({"qwen2_vl": 11, "qwen2_5_vl": 12}[kind])
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(VISION_TOKENS)))
    text = dict(vocab_size=ids["video_token_id"] + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=2, embed_dim=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.08)
    if kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": 64, "mlp_ratio": 2}, **ids)
        model = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    else:
        vision = {**vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 16,
                  "fullatt_block_indexes": [1]}
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    for layer in model.model.language_model.layers:  # make the qkv bias matter
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tf.Qwen2VLImageProcessor(**PIXELS).save_pretrained(out)
    return out, model
