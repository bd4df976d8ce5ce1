"""Qwen2-VL and Qwen2.5-VL: images of any size through the engine, token-exact with transformers'
Qwen2VLForConditionalGeneration (Qwen2_5_VLForConditionalGeneration) on the same weights and pixels; the
placeholders and M-RoPE ids as transformers' processor and get_rope_index make them; an image straddling prefill
chunks; the prefix cache telling images apart; preemption; tensor parallelism; bad images refused with LLaVA's
messages. The parity is sensitive to M-RoPE: plain rope gives other tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster import pipeline
from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.errors import PromptTooLongError
from cluster.engine.tokenizer import PreparedPrompt
from cluster.layers.mrope import mrope_positions
from conftest import hf_greedy
from qwen_vl_models import CHAT_TEMPLATE
from test_llava import _ask, _image, assert_tp2_matches_tp1, assert_prefix_cache_tells_images_apart
from test_llava import assert_batch_matches_transformers

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def kind(request) -> str:
    """Qwen2.5-VL: the same language side and M-RoPE for images; its tower has window attention and an RMSNorm
    merger (transformers' module, so nothing of it is the engine's)."""
    return request.param


def _engine(path, engine_cache: str, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def qwen(tiny_models, engine_cache, kind):
    path, hf_model = tiny_models(kind)
    return path, hf_model, _engine(path, engine_cache)


def _hf(hf_model, engine: LLMEngine, prepared: PreparedPrompt, n: int = GREEDY.max_new_tokens) -> list[int]:
    if prepared.pixel_values is None:
        return hf_greedy(hf_model, prepared.token_ids, n)
    kinds = (torch.tensor([prepared.token_ids]) == engine.model_config.vision["image_token_id"]).int()
    return hf_greedy(hf_model, prepared.token_ids, n, pixel_values=prepared.pixel_values,
                     image_grid_thw=prepared.image_grid, mm_token_type_ids=kinds)


def _two_images():
    return _ask("Compare the two pictures.", _image(1), _image(2, (64, 30)))


def test_placeholders_and_pixels_match_the_processor(qwen):
    """Each image -> <|vision_start|>, t * h * w / 4 <|image_pad|>, <|vision_end|>, as Qwen2VLProcessor does: the
    chat template renders the image parts, then each pad becomes its image's count (replace_image_token). The
    processor itself needs torchvision for its video side, so its two steps are done here."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path, _, engine = qwen
    tok = AutoTokenizer.from_pretrained(str(path))
    images = [_image(1), _image(2, (64, 30))]
    pixels = AutoImageProcessor.from_pretrained(str(path))(images=images, return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                 + [{"type": "text", "text": "Compare the two pictures."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
    counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == 3 and counts[0] != counts[1]  # sizes and aspect ratios differ: so do the token counts
    text = pieces[0] + "<|image_pad|>" * counts[0] + pieces[1] + "<|image_pad|>" * counts[1] + pieces[2]
    got = engine.prepare_prompt(_two_images())
    assert got.token_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(got.image_grid, pixels["image_grid_thw"])
    assert torch.equal(got.pixel_values, pixels["pixel_values"])


def test_rope_index_matches_transformers(qwen):
    path, hf_model, engine = qwen
    prepared = engine.prepare_prompt(_two_images())
    token = engine.model_config.vision["image_token_id"]
    ids = torch.tensor([prepared.token_ids])
    want, delta = hf_model.model.get_rope_index(ids, (ids == token).int(), prepared.image_grid)
    got, got_delta = mrope_positions(prepared.token_ids, token, prepared.image_grid.tolist(), 2)
    n = got.shape[1]
    assert torch.equal(got, want[:, 0, :n]) and got_delta == int(delta)
    tail = torch.arange(n, len(prepared.token_ids)) + got_delta
    assert torch.equal(want[:, 0, n:], tail.expand(3, -1))


def test_image_prompts_match_transformers(qwen):
    path, hf_model, engine = qwen
    assert_batch_matches_transformers(engine, lambda p: _hf(hf_model, engine, p), _two_images())


def test_plain_rope_would_differ(qwen, engine_cache, monkeypatch):
    """The parity above depends on M-RoPE: with every token at its plain index, the tokens differ."""
    path, hf_model, _ = qwen
    engine = _engine(path, engine_cache, enable_prefix_caching=False)  # nothing computed with M-RoPE is reused
    prompt = _two_images()
    want = engine.generate([prompt], GREEDY)[0].token_ids
    plain = lambda ids, *_: (torch.arange(len(ids)).expand(3, -1), 0)  # noqa: E731
    monkeypatch.setattr("cluster.engine.engine.mrope_positions", plain)
    assert engine.generate([prompt], GREEDY)[0].token_ids != want


def test_chunked_prefill_splits_an_image(tiny_models, engine_cache, kind):
    """Prefill chunks of 16 tokens: the images' embeddings and M-RoPE ids straddle steps."""
    path, hf_model = tiny_models(kind)
    engine = _engine(path, engine_cache, max_prefill_token_num=16, session_len=256)
    prepared = engine.prepare_prompt(_two_images())
    token = engine.model_config.vision["image_token_id"]
    first = prepared.token_ids.index(token)
    assert first // 16 != (first + 29) // 16, "the image should cross a chunk boundary"
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, engine, prepared)


def test_prefix_cache_tells_images_apart(qwen):
    path, hf_model, engine = qwen
    assert_prefix_cache_tells_images_apart(engine, lambda p: _hf(hf_model, engine, p))


@pytest.mark.parametrize("overlap", [False, True])
def test_preempted_image_prompts_recompute_the_same_tokens(qwen, engine_cache, overlap):
    """A cache too small for three image prompts at once: some are preempted and recomputed from their tokens
    (M-RoPE ids and rope_delta stay on the sequence); with overlapped decode steps too (index + delta ahead)."""
    path, hf_model, engine = qwen
    prompts = [engine.prepare_prompt(_ask(f"Picture {i}: what is it?", _image(10 + i, (40 + 8 * i, 52))))
               for i in range(3)]
    small = _engine(path, engine_cache, enable_prefix_caching=False, num_blocks=9, session_len=128,
                    overlap_steps=overlap)
    out = small.generate(prompts, GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert [r.token_ids for r in out] == [_hf(hf_model, engine, p) for p in prompts]
    assert small.bm.num_free == small.bm.num_blocks


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}],
     "could not be decoded"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/nonexistent/a.png"}}]}],
     "does not exist"),
    ("Look: <|image_pad|>", r"1 image token\(s\) '<\|image_pad\|>' for 0 image\(s\)"),
])
def test_bad_images_are_refused_with_the_reason(qwen, prompt, message):
    engine = qwen[2]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_empty_thin_and_oversized_images(tiny_models, engine_cache, kind):
    """Empty bytes and a 0-pixel image are refused as LLaVA's are, a 1 x 300 strip with the reason; a prompt whose
    image tokens overflow the session is too long."""
    from PIL import Image

    path, _ = tiny_models(kind)
    engine = _engine(path, engine_cache, session_len=96)
    image = lambda im: [{"role": "user", "content": [{"type": "image", "image": im}]}]  # noqa: E731
    with pytest.raises(ValueError, match="could not be decoded"):
        engine.add_request(image(b""), GREEDY)
    with pytest.raises(ValueError, match="image has no pixels"):
        engine.add_request(image(Image.new("RGB", (0, 5))), GREEDY)
    with pytest.raises(ValueError, match="aspect ratio over 200"):
        engine.add_request(image(Image.new("RGB", (300, 1))), GREEDY)
    big = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))  # 64 tokens
    with pytest.raises(PromptTooLongError, match="exceeds the session length 96"):
        engine.add_request(_ask("hi", big), GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_qwen2_vl_at_tp2_matches_tp1(qwen, engine_cache):
    """The M-RoPE ids travel to the other rank with each step's plan, beside the embeddings."""
    path, _, engine = qwen
    assert_tp2_matches_tp1(path, engine, _two_images(), engine_cache)


HUB_QWEN2_VL_7B = {  # the hub's config.json of Qwen2-VL-7B-Instruct: flat, rope_scaling of type mrope
    "architectures": ["Qwen2VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2_vl",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}


def test_hub_config_converts_as_qwen2():
    """The flat hub layout: a Qwen2 language model (q/k/v biases, theta 1e6, plain frequencies), M-RoPE's sections
    and the vision tower's config in ModelConfig.vision; the config check passes it."""
    from cluster.convert import qwen2_vl, rope
    from cluster.convert.families import check_supported, family_for
    from cluster.convert.family import config_view
    from cluster.convert.hf import engine_config

    check_supported(HUB_QWEN2_VL_7B)
    text = qwen2_vl.text_config(HUB_QWEN2_VL_7B)
    cfg = engine_config(text, "bfloat16", 1, "")
    assert (cfg.hf_model_type, cfg.attention_bias, cfg.head_dim, cfg.num_kv_heads) == ("qwen2", True, 128, 4)
    inv, scaling = rope.inv_freq(config_view(family_for("qwen2"), text), cfg)
    assert scaling == 1.0 and torch.allclose(inv, 1e6 ** -(torch.arange(0, 128, 2) / 128))
    vision = qwen2_vl.vision_fields(HUB_QWEN2_VL_7B)
    assert vision["mrope_section"] == [16, 24, 24] and vision["image_token_id"] == 151655
    assert vision["vision_config"]["embed_dim"] == 1280 and vision["kind"] == "qwen2_vl"
    with pytest.raises(ValueError, match="use_sliding_window"):
        qwen2_vl.text_config({**HUB_QWEN2_VL_7B, "use_sliding_window": True})


def test_pipeline_takes_text_and_image_tuples(qwen, engine_cache):
    path, hf_model, engine = qwen
    img = _image(6, (48, 36))
    with pipeline(str(path), engine_config=EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32")) as pipe:
        batch = pipe([("Describe this image", img), "Shanghai is"], GREEDY)
    assert batch[0].token_ids == engine.generate([_ask("Describe this image", img)], GREEDY)[0].token_ids
    assert len(batch[1].token_ids) == GREEDY.max_new_tokens


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_openai_api_takes_image_url_parts(qwen, engine_cache):
    """The router, replica core and worker host in this process over a real Qwen2-VL engine (no Ray)."""
    from cluster.engine.async_engine import AsyncEngine
    from test_router_protocol import make_client

    engine = _engine(qwen[0], engine_cache)  # its own: the client shuts it down
    messages = _ask("What is this?", _image(7), _image(8, (30, 60)))
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0)
    want = engine.generate([messages], gen)[0]
    c = await make_client(AsyncEngine(engine))
    try:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        r = await c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8,
                                                       "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
        assert r.json()["usage"]["prompt_tokens"] == want.input_token_len
    finally:
        await c.aclose()
        c.engine.shutdown()


def _two_turns():
    """An image in each of two user turns, an assistant reply between them."""
    first = _ask("What is in this picture?", _image(4))
    return first + [{"role": "assistant", "content": "A pattern of colours."}] + _ask("And this one?",
                                                                                      _image(5, (24, 60)))


def test_images_in_two_turns_match_transformers(qwen):
    """Both turns' images keep their own M-RoPE grids and counts across the assistant turn between them."""
    path, hf_model, engine = qwen
    prepared = engine.prepare_prompt(_two_turns())
    assert prepared.image_grid.shape[0] == 2
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, engine, prepared)
