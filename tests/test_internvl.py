"""InternVL (transformers' native internvl): dynamically tiled images through the engine, token-exact with
InternVLForConditionalGeneration on the same weights and pixels; the prompt's ids and pixels as InternVLProcessor
makes them (<img>, tiles x image_seq_length <IMG_CONTEXT>, </img> per image); two images of other tile counts beside
a text-only row; a Llama language model with a tied head; an image straddling prefill chunks; the prefix cache
telling images apart; images in two turns of one conversation; bad images refused with the reason (ValueError, and
400 over HTTP); the hub's configs; tensor parallelism."""
from __future__ import annotations

import pytest
import torch

from cluster import pipeline
from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt
from conftest import hf_greedy
from internvl_models import IMAGE_TOKEN, MAX_TILES, TOKENS_PER_TILE
from test_llava import _ask, _image, assert_tp2_matches_tp1, assert_prefix_cache_tells_images_apart
from test_llava import assert_batch_matches_transformers

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(path, engine_cache: str, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def internvl(tiny_models, engine_cache):
    path, hf_model = tiny_models("internvl")
    return path, hf_model, _engine(path, engine_cache)


def _hf(hf_model, prepared: PreparedPrompt, n: int = GREEDY.max_new_tokens, **kw) -> list[int]:
    if prepared.pixel_values is None:
        return hf_greedy(hf_model, prepared.token_ids, n, **kw)
    return hf_greedy(hf_model, prepared.token_ids, n, pixel_values=prepared.pixel_values, **kw)


def _two_images():
    return _ask("Compare the two pictures.", _image(1), _image(2, (64, 30)))  # wide (6 tiles + thumbnail), tall (2 + 1)


def _processor(path, monkeypatch):
    """InternVLProcessor on the checkpoint's tokenizer and image processor. Without torchvision there is no video
    processor, which its constructor insists on; images do not need one."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None
                        if name == "video_processor" and arg is None else check(self, name, arg))
    tok = AutoTokenizer.from_pretrained(str(path))
    return InternVLProcessor(image_processor=AutoImageProcessor.from_pretrained(str(path)), tokenizer=tok,
                             video_processor=None, image_seq_length=TOKENS_PER_TILE)


def test_prompt_ids_and_pixels_match_the_processor(internvl, monkeypatch):
    """The chat template renders each image part as <IMG_CONTEXT>; InternVLProcessor writes <img>, the image's
    tiles x image_seq_length <IMG_CONTEXT>, </img> in its place and crops the image into tiles plus a thumbnail.
    The engine's ids and pixels are the processor's, and its features get_image_features'."""
    path, hf_model, engine = internvl
    processor = _processor(path, monkeypatch)
    images = [_image(1), _image(2, (64, 30))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Compare the two pictures."}]}]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)
    got = engine.prepare_prompt(_two_images())
    assert got.token_ids == want["input_ids"][0].tolist()
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert got.image_grid.tolist() == [MAX_TILES + 1, 3]  # tiles by aspect ratio, each with its thumbnail
    counts = engine.vision.token_counts(got.pixel_values, got.image_grid)
    assert counts == [(MAX_TILES + 1) * TOKENS_PER_TILE, 3 * TOKENS_PER_TILE]
    assert got.token_ids.count(engine.model_config.vision["image_token_id"]) == sum(counts)
    with torch.no_grad():
        feats = hf_model.model.get_image_features(pixel_values=got.pixel_values).pooler_output
    assert torch.allclose(engine.vision.encode(got.pixel_values, got.image_grid), feats.flatten(0, 1), atol=1e-5)


def test_image_prompts_match_transformers(internvl):
    path, hf_model, engine = internvl
    assert_batch_matches_transformers(engine, lambda p: _hf(hf_model, p), _two_images())


def test_llama_language_model_with_a_tied_head(tiny_models, engine_cache):
    """InternVL2.5's InternLM2 language models come out of the hf conversion as Llama; InternVL3-1B ties its head.
    A tied tiny model repeats itself under greedy decoding, so both sides run with a repetition penalty."""
    path, hf_model = tiny_models("internvl_llama")
    engine = _engine(path, engine_cache)
    assert engine.model_config.hf_model_type == "llama" and engine.model_config.tie_word_embeddings
    prompts = [engine.prepare_prompt(_two_images()), engine.prepare_prompt(_ask("Describe it.", _image(3, (30, 30))))]
    gen = GenerationConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.5)
    got = engine.generate(prompts, gen)
    assert [r.token_ids for r in got] == [_hf(hf_model, p, 16, repetition_penalty=1.5) for p in prompts]


def test_chunked_prefill_splits_an_image(tiny_models, engine_cache):
    """Prefill chunks of 16 tokens: the first image's 28 embeddings straddle steps."""
    path, hf_model = tiny_models("internvl")
    engine = _engine(path, engine_cache, max_prefill_token_num=16, session_len=512)
    prepared = engine.prepare_prompt(_two_images())
    first = prepared.token_ids.index(engine.model_config.vision["image_token_id"])
    assert first // 16 != (first + 27) // 16, "the image should cross a chunk boundary"
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, prepared)


def test_prefix_cache_tells_images_apart(internvl):
    path, hf_model, engine = internvl
    assert_prefix_cache_tells_images_apart(engine, lambda p: _hf(hf_model, p))


def test_images_in_two_turns_of_a_conversation(internvl, engine_cache):
    """Pipeline.chat with an image in each turn: the second turn's prompt holds both images' spans, reuses the first
    turn's cached blocks (its image included) and is answered as transformers answers it."""
    path, hf_model, engine = internvl
    ec = EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32")
    with pipeline(str(path), engine_config=ec) as pipe:
        session = pipe.chat("What is this?", gen_config=GREEDY, images=[_image(6)])
        first = engine.prepare_prompt(session.messages[:1])
        pipe.chat("And this one, taller?", session, GREEDY, images=[_image(7, (60, 20))])
        assert len(session.messages) == 4
        second = engine.prepare_prompt(session.messages[:3])
    token = engine.model_config.vision["image_token_id"]
    assert session.response.cached_token_len > first.token_ids.index(token) + 16  # into the first image, or past it
    assert second.image_grid.tolist() == [MAX_TILES + 1, 4]  # 6 tiles in 3 x 2, 3 in a column; thumbnails
    assert second.token_ids.count(token) == (MAX_TILES + 1 + 4) * TOKENS_PER_TILE
    assert session.response.token_ids == _hf(hf_model, second)


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}],
     "could not be decoded"),
    ([{"role": "user", "content": [{"type": "image", "image": b""}]}], "could not be decoded"),
    (f"Look: {IMAGE_TOKEN}", r"1 image token\(s\) '<IMG_CONTEXT>' for 0 image\(s\)"),
])
def test_bad_images_are_refused_with_the_reason(internvl, prompt, message):
    engine = internvl[2]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_empty_images_refused_thin_ones_served(internvl):
    """A 0-pixel image is refused; 1 x 300 and 300 x 1 strips get the most tiles in a row (or column) and are
    served as transformers serves them."""
    from PIL import Image

    path, hf_model, engine = internvl
    image = lambda im: [{"role": "user", "content": [{"type": "image", "image": im}]}]  # noqa: E731
    with pytest.raises(ValueError, match="image has no pixels"):
        engine.add_request(image(Image.new("RGB", (0, 5))), GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks
    strips = [engine.prepare_prompt(image(_image(20 + i, size))) for i, size in enumerate([(1, 300), (300, 1)])]
    assert [p.image_grid.tolist() for p in strips] == [[MAX_TILES + 1]] * 2
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in engine.generate(strips, gen)] == [_hf(hf_model, p, 8) for p in strips]


HUB_INTERNVL3_1B = {  # the shape of OpenGVLab/InternVL3-1B-hf's config.json (sizes as published)
    "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
    "image_seq_length": 256, "image_token_id": 151667, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                    "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                    "rope_theta": 1000000.0, "vocab_size": 151674, "tie_word_embeddings": True,
                    "use_sliding_window": False},
    "vision_config": {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": [448, 448],
                      "patch_size": [14, 14], "norm_type": "layer_norm", "use_mean_pooling": True}}


def test_hub_configs():
    """The config check passes InternVL3 (Qwen2) and InternVL2.5 (Llama) configs; a tile is 256 tokens; what
    transformers could not run either is refused in one line."""
    from cluster.convert import internvl
    from cluster.convert.families import check_supported
    from cluster.convert.hf import engine_config
    from cluster.convert.vlm import text_model_type, vlm_for

    hub = HUB_INTERNVL3_1B
    check_supported(hub)
    assert vlm_for(hub) is internvl and text_model_type(hub) == "qwen2"
    cfg = engine_config(internvl.text_config(hub), "bfloat16", 1, "")
    assert (cfg.hf_model_type, cfg.attention_bias, cfg.tie_word_embeddings) == ("qwen2", True, True)
    vision = internvl.vision_fields(hub)
    assert (vision["kind"], vision["image_seq_len"], vision["image_token_id"]) == ("internvl", 256, 151667)
    llama = {**hub, "text_config": {**hub["text_config"], "model_type": "llama"}, "tie_word_embeddings": False}
    check_supported(llama)
    assert text_model_type(llama) == "llama" and not internvl.text_config(llama)["tie_word_embeddings"]
    with pytest.raises(ValueError, match="image_seq_length 64 is not the 256"):
        internvl.vision_fields({**hub, "image_seq_length": 64})
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        internvl.vision_fields({**hub, "vision_feature_select_strategy": "full"})


def test_internvl_at_tp2_matches_tp1(internvl, engine_cache):
    path, _, engine = internvl
    assert_tp2_matches_tp1(path, engine, _two_images(), engine_cache, session_len=512)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_openai_api_takes_images_and_refuses_bad_ones(internvl, engine_cache):
    """The router, replica core and worker host in this process over a real InternVL engine (no Ray): two images
    answered as the engine answers them; a corrupt one is a 400 saying why."""
    from cluster.engine.async_engine import AsyncEngine
    from test_router_protocol import assert_error, make_client

    engine = _engine(internvl[0], engine_cache)  # its own: the client shuts it down
    messages = _ask("What is this?", _image(8), _image(9, (30, 60)))
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0)
    want = engine.generate([messages], gen)[0]
    c = await make_client(AsyncEngine(engine))
    try:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
        assert r.json()["usage"]["prompt_tokens"] == want.input_token_len
        bad = {**body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}
        assert_error(await c.post("/v1/chat/completions", json=bad), 400, contains="could not be decoded")
        assert engine.bm.num_free == engine.bm.num_blocks
    finally:
        await c.aclose()
        c.engine.shutdown()
