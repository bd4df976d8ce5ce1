"""Tiny random-weight DeepSeek-VL checkpoints saved by transformers itself, laid out as the hub's deepseek-community
ones: a SigLIP tower on 24 px images (4 px patches: 36 image tokens), the aligner and a Llama; the hybrid also SAM's
tower on 64 px (8 px patches, a global-attention layer), its neck and projection. SmolLM2's tokenizer with
<image_placeholder> as its image token, adding BOS as DeepSeek's does; the processor (its image processor, which
resizes the longer side and pads to a square, and a chat template over content parts in DeepSeek-VL's format:
a system line, `User: ...` and `Assistant: ...` turns).

Norm weights, biases and the hybrid's zero-initialized parameters (high_res_vision_alpha, SAM's relative positions)
are randomized, so a tensor the engine misloads changes the tokens."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image_placeholder>"
IMAGE_SIZE, PATCH, HIGH_RES = 24, 4, 64
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
# DeepSeek-VL's conversation format (a system line; user turns end in a blank line, assistant turns in EOS), over
# content parts as its processor's template iterates them: an image part is <image_placeholder>, text is stripped
CHAT_TEMPLATE = (
    "{{- 'You are a helpful assistant who sees images.\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize }}:{{ ' ' -}}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}" + IMAGE_TOKEN + "{%- else -%}{{- part['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '\\n\\n' if message['role'] == 'user' else eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def _randomize(model, hybrid: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name:
                continue
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("high_res_vision_alpha", "rel_pos_h", "rel_pos_w")):
                p.copy_(torch.randn_like(p) * 0.5)
    if hybrid:
        assert model.model.high_res_vision_alpha.abs().item() > 0


def build_deepseek_vl(tokenizer_dir: Path, out: Path, hybrid: bool = False, tiny: dict | None = None):
    """Returns (checkpoint dir, the transformers model): DeepseekVLForConditionalGeneration, or the hybrid's."""
    import transformers as tf

    from family_models import TINY

    torch.manual_seed(32 if hybrid else 31)
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens={"image_token": IMAGE_TOKEN},
                                           add_bos_token=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tf.LlamaConfig(**{**(tiny or TINY), "vocab_size": image_id + 64})
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if hybrid:
        sam = tf.SamVisionConfig(hidden_size=32, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=HIGH_RES, patch_size=8, window_size=4, global_attn_indexes=[1],
                                 mlp_dim=64)
        cfg = tf.DeepseekVLHybridConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                        high_res_vision_config=sam.to_dict(), image_token_id=image_id)
        model = tf.DeepseekVLHybridForConditionalGeneration(cfg).eval()
        images = tf.DeepseekVLHybridImageProcessor(size=size, high_res_size={"height": HIGH_RES, "width": HIGH_RES})
        processor_cls = tf.DeepseekVLHybridProcessor
    else:
        cfg = tf.DeepseekVLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=image_id,
                                  tie_word_embeddings=False)  # the hybrid keeps DeepseekVLConfig's tied default
        model = tf.DeepseekVLForConditionalGeneration(cfg).eval()
        images = tf.DeepseekVLImageProcessor(size=size)
        processor_cls = tf.DeepseekVLProcessor
    _randomize(model, hybrid)
    model.save_pretrained(out)
    processor_cls(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                  num_image_tokens=IMAGE_TOKENS).save_pretrained(out)
    return out, model
