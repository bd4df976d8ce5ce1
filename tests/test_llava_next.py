"""LLaVA-NeXT: any-resolution images through the engine, token-exact with transformers'
LlavaNextForConditionalGeneration on the same weights and pixels; each image's token count as LlavaNextProcessor
makes it (and equal to the packed features); two images of different aspect ratios in one prompt beside a text-only
row; an image straddling prefill chunks; the prefix cache telling images apart; bad images refused with LLaVA's
messages; tensor parallelism."""
from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt
from conftest import IMAGE_TOKEN, hf_greedy
from test_llava import _ask, _image, assert_tp2_matches_tp1, assert_prefix_cache_tells_images_apart
from test_llava import assert_batch_matches_transformers

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(path, engine_cache: str, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def llava_next(tiny_models, engine_cache):
    path, hf_model = tiny_models("llava_next")
    return path, hf_model, _engine(path, engine_cache)


def _hf(hf_model, prepared: PreparedPrompt, n: int = GREEDY.max_new_tokens) -> list[int]:
    if prepared.pixel_values is None:
        return hf_greedy(hf_model, prepared.token_ids, n)
    return hf_greedy(hf_model, prepared.token_ids, n, pixel_values=prepared.pixel_values,
                     image_sizes=prepared.image_grid)


def _two_images():
    return _ask("Compare the two pictures.", _image(1), _image(2, (64, 30)))  # wide, then tall


def test_placeholders_match_the_processor_and_the_packed_features(llava_next):
    """The chat template renders each image part as <image>; LlavaNextProcessor expands each to its image's count
    (tiles picked from image_grid_pinpoints, unpadded to the aspect ratio, a newline per row); the same count is
    what the model's pack_image_features makes."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextProcessor

    path, hf_model, engine = llava_next
    tok = AutoTokenizer.from_pretrained(str(path))
    processor = LlavaNextProcessor(AutoImageProcessor.from_pretrained(str(path)), tok, patch_size=4,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    images = [_image(1), _image(2, (64, 30))]
    text = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nCompare the two "
                                     "pictures."}], tokenize=False, add_generation_prompt=True)
    want = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)
    got = engine.prepare_prompt(_two_images())
    assert got.token_ids == want["input_ids"][0].tolist()
    assert torch.equal(got.pixel_values, want["pixel_values"]) and torch.equal(got.image_grid, want["image_sizes"])
    counts = engine.vision.token_counts(got.pixel_values, got.image_grid)
    assert counts[0] != counts[1] and got.token_ids.count(engine.model_config.vision["image_token_id"]) == sum(counts)
    with torch.no_grad():
        feats = hf_model.model.get_image_features(got.pixel_values, got.image_grid, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
    assert [f.shape[0] for f in feats] == counts
    assert torch.allclose(engine.vision.encode(got.pixel_values, got.image_grid), torch.cat(feats), atol=1e-5)


def test_image_prompts_match_transformers(llava_next):
    path, hf_model, engine = llava_next
    assert_batch_matches_transformers(engine, lambda p: _hf(hf_model, p), _two_images())


def test_chunked_prefill_splits_an_image(tiny_models, engine_cache):
    """Prefill chunks of 16 tokens: each image's tens of embeddings straddle steps."""
    path, hf_model = tiny_models("llava_next")
    engine = _engine(path, engine_cache, max_prefill_token_num=16, session_len=512)
    prepared = engine.prepare_prompt(_two_images())
    token = engine.model_config.vision["image_token_id"]
    first = prepared.token_ids.index(token)
    assert first // 16 != (first + 20) // 16, "the image should cross a chunk boundary"
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, prepared)


def test_prefix_cache_tells_images_apart(llava_next):
    path, hf_model, engine = llava_next
    assert_prefix_cache_tells_images_apart(engine, lambda p: _hf(hf_model, p))


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}],
     "could not be decoded"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/nonexistent/a.png"}}]}],
     "does not exist"),
    (f"Look: {IMAGE_TOKEN}", r"1 image token\(s\) '<image>' for 0 image\(s\)"),
])
def test_bad_images_are_refused_with_the_reason(llava_next, prompt, message):
    engine = llava_next[2]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_empty_images_refused_thin_ones_served(llava_next):
    """Empty bytes and a 0-pixel image are refused as LLaVA's are; 300 x 1 and 1 x 300 strips are served as
    transformers serves them (their tiles unpad to few or no rows)."""
    from PIL import Image

    path, hf_model, engine = llava_next
    image = lambda im: [{"role": "user", "content": [{"type": "image", "image": im}]}]  # noqa: E731
    with pytest.raises(ValueError, match="could not be decoded"):
        engine.add_request(image(b""), GREEDY)
    with pytest.raises(ValueError, match="image has no pixels"):
        engine.add_request(image(Image.new("RGB", (0, 5))), GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks
    strips = [engine.prepare_prompt(image(_image(20 + i, size))) for i, size in enumerate([(1, 300), (300, 1)])]
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in engine.generate(strips, gen)] == [_hf(hf_model, p, 8) for p in strips]


def test_hub_config_converts_as_llama():
    """llava-v1.6's hub layout: the config check passes it; its language model is its text_config's family."""
    from cluster.convert import llava_next
    from cluster.convert.families import check_supported
    from cluster.convert.vlm import text_model_type, vlm_for

    hub = {"model_type": "llava_next", "image_token_index": 32000, "text_config": {"model_type": "mistral"},
           "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                             "hidden_size": 1024}, "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]]}
    check_supported(hub)
    assert vlm_for(hub) is llava_next and text_model_type(hub) == "mistral"
    vision = llava_next.vision_fields(hub)
    assert vision["kind"] == "llava_next" and vision["image_grid_pinpoints"][0] == [336, 672]


def test_llava_next_at_tp2_matches_tp1(llava_next, engine_cache):
    path, _, engine = llava_next
    assert_tp2_matches_tp1(path, engine, _two_images(), engine_cache, session_len=512)


def test_images_in_two_turns_match_transformers(llava_next):
    """An image in each of two user turns (different aspect ratios, so different counts), a reply between."""
    from test_qwen2_vl import _two_turns

    path, hf_model, engine = llava_next
    prepared = engine.prepare_prompt(_two_turns())
    assert len(prepared.image_grid) == 2
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, prepared)
