"""LLaVA: images through the engine and the pipeline, token-exact with transformers' LlavaForConditionalGeneration
on the same weights and pixels; chunked prefill across an image; the prefix cache telling images apart; bad images
and misplaced image tokens refused with a clear message."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from cluster import pipeline
from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt
from conftest import IMAGE_TOKEN, hf_greedy

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def _image(seed: int, size=(40, 52)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(text: str, *images) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def llava(tiny_models, engine_cache):
    path, hf_model = tiny_models("llava")
    return path, hf_model, LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))


def _hf(hf_model, prepared: PreparedPrompt, n: int = GREEDY.max_new_tokens) -> list[int]:
    return hf_greedy(hf_model, prepared.token_ids, n, pixel_values=prepared.pixel_values)


def test_image_prompts_match_transformers(llava):
    path, hf_model, engine = llava
    one = engine.prepare_prompt(_ask("What is in this picture?", _image(0)))
    two = engine.prepare_prompt(_ask("Compare the two pictures.", _image(1), _image(2, (64, 30))))
    assert isinstance(one, PreparedPrompt) and one.pixel_values.shape == (1, 3, 32, 32)
    image_id = engine.model_config.vision["image_token_id"]
    assert one.token_ids.count(image_id) == 16 and two.token_ids.count(image_id) == 32
    text_only = engine.tokenizer.prompt_ids([{"role": "user", "content": "No picture here."}])
    got = engine.generate([one, two, text_only], GREEDY)  # in one batch: image and text rows side by side
    assert got[0].token_ids == _hf(hf_model, one)
    assert got[1].token_ids == _hf(hf_model, two)
    assert got[2].token_ids == hf_greedy(hf_model, text_only, GREEDY.max_new_tokens)
    assert got[0].token_ids != got[1].token_ids
    assert engine.bm.num_free == engine.bm.num_blocks


def test_chunked_prefill_splits_an_image(tiny_models, engine_cache):
    """Prefill chunks of 16 tokens: the 16 image embeddings straddle two steps."""
    path, hf_model = tiny_models("llava")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32",
                                               max_prefill_token_num=16, session_len=256))
    prepared = engine.prepare_prompt(_ask("Describe it.", _image(3)))
    first = prepared.token_ids.index(engine.model_config.vision["image_token_id"])
    assert first // 16 != (first + 15) // 16, "the image should cross a chunk boundary"
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, prepared)


def assert_batch_matches_transformers(engine, hf_tokens, two_images) -> None:
    """One image, two images and a text-only row in one batch, each as transformers' greedy tokens
    (hf_tokens(prepared)); every block freed after."""
    one = engine.prepare_prompt(_ask("What is in this picture?", _image(0)))
    two = engine.prepare_prompt(two_images)
    text_only = engine.prepare_prompt([{"role": "user", "content": "No picture here."}])
    got = engine.generate([one, two, text_only], GREEDY)  # in one batch: image and text rows side by side
    assert [g.token_ids for g in got] == [hf_tokens(one), hf_tokens(two), hf_tokens(text_only)]
    assert got[0].token_ids != got[1].token_ids
    assert engine.bm.num_free == engine.bm.num_blocks


def assert_prefix_cache_tells_images_apart(engine, hf_tokens, seeds=(4, 5)) -> None:
    """Two prompts that differ only in their image share the text before it, never the image's blocks; the same
    image again reuses them. hf_tokens(prepared): transformers' greedy tokens of a prepared prompt."""
    prompt = lambda seed: _ask("What colour dominates?", _image(seed))  # noqa: E731
    first_image = engine.prepare_prompt(prompt(seeds[0])).token_ids.index(engine.model_config.vision["image_token_id"])
    a = engine.generate([prompt(seeds[0])], GREEDY)[0]
    b_prompt = engine.prepare_prompt(prompt(seeds[1]))
    b = engine.generate([b_prompt], GREEDY)[0]
    again = engine.generate([prompt(seeds[0])], GREEDY)[0]
    assert b.cached_token_len <= first_image  # the text before the image only
    assert b.token_ids == hf_tokens(b_prompt)
    assert again.cached_token_len > first_image + 16  # the same image: its blocks are reused
    assert again.token_ids == a.token_ids


def test_prefix_cache_tells_images_apart(llava):
    path, hf_model, engine = llava
    assert_prefix_cache_tells_images_apart(engine, lambda p: _hf(hf_model, p))


def test_pipeline_takes_text_and_image_tuples(llava, engine_cache):
    path, hf_model, engine = llava
    img = _image(6)
    with pipeline(str(path), engine_config=EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32")) as pipe:
        single = pipe(("Describe this image", img), GREEDY)
        batch = pipe([("Describe this image", img), "Shanghai is"], GREEDY)
    want = engine.generate([_ask("Describe this image", img)], GREEDY)[0].token_ids
    assert single.token_ids == want == batch[0].token_ids
    assert len(batch[1].token_ids) == GREEDY.max_new_tokens


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}],
     "could not be decoded"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     "not fetched"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/nonexistent/a.png"}}]}],
     "does not exist"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unsupported content part"),
    (f"Look: {IMAGE_TOKEN}", r"1 image token\(s\) '<image>' for 0 image\(s\)"),
])
def test_bad_images_are_refused_with_the_reason(llava, prompt, message):
    engine = llava[2]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_chat_turns_with_images(llava, engine_cache, tmp_path, monkeypatch, capsys):
    """Pipeline.chat with images; a turn with a bad image fails and leaves the session as it was; `cluster chat`
    takes `/image PATH` and keeps going after an error."""
    path, _, engine = llava
    img = _image(9)
    img.save(tmp_path / "pic.png")
    with pipeline(str(path), engine_config=EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32")) as pipe:
        session = pipe.chat("What is this?", gen_config=GREEDY, images=[str(tmp_path / "pic.png")])
        want = engine.generate([_ask("What is this?", img)], GREEDY)[0].token_ids
        assert session.response.token_ids == want and len(session.messages) == 2
        with pytest.raises(ValueError, match="does not exist"):
            pipe.chat("And this?", session, GREEDY, images=[str(tmp_path / "missing.png")])
        assert len(session.messages) == 2  # the failed turn left no trace
        pipe.chat("Describe it more.", session, GREEDY)
        assert len(session.messages) == 4 and session.response.cached_token_len > 0

    from cluster.cli import main

    lines = iter([f"/image {tmp_path}/missing.png", f"/image {tmp_path}/pic.png", "What is this?", "exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    monkeypatch.setenv("CLUSTER_CACHE_DIR", engine_cache)
    assert main(["chat", str(path), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "[error: image file" in out and "[image attached" in out


def test_text_model_refuses_images(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    with pytest.raises(ValueError, match="takes no images"):
        engine.add_request(_ask("hi", _image(0)), GREEDY)


def assert_tp2_matches_tp1(path, engine: LLMEngine, prompt, engine_cache: str, session_len: int = 256) -> None:
    """The prompt's greedy tokens at tp=2 (rank 0 encodes the images; each step's embeddings go to the other rank
    beside its plan) are the tp=1 engine's, with prefill chunks of 16 so the images straddle them."""
    want = engine.generate([prompt], GREEDY)[0].token_ids
    ec = EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", tp=2, session_len=session_len,
                      max_batch_size=8, max_prefill_token_num=16)
    with pipeline(str(path), engine_config=ec) as pipe:
        try:
            assert pipe(prompt, GREEDY).token_ids == want
        finally:
            pipe.engine.engine.runner.close()


def test_llava_at_tp2_matches_tp1(llava, engine_cache):
    path, _, engine = llava
    assert_tp2_matches_tp1(path, engine, _ask("What is in this picture?", _image(8)), engine_cache)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_openai_api_takes_image_url_parts(tiny_models, engine_cache):
    """The router, replica core and worker host in this process over a real LLaVA engine (no Ray)."""
    from cluster.engine.async_engine import AsyncEngine
    from test_router_protocol import assert_error, make_client

    path, _ = tiny_models("llava")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    img = _image(7)
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0)
    want = engine.generate([_ask("What is this?", img)], gen)[0]
    want_prompt = len(engine.prepare_prompt(_ask("What is this?", img)))
    c = await make_client(AsyncEngine(engine))
    try:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": _ask("What is this?", img), "max_tokens": 8, "temperature": 0}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["choices"][0]["message"]["content"] == want.text
        assert j["usage"]["prompt_tokens"] == want_prompt == want.input_token_len
        bad = {**body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}
        assert_error(await c.post("/v1/chat/completions", json=bad), 400, contains="could not be decoded")
        from PIL import Image

        huge = Image.new("1", (20_000, 20_000))  # 50 MB of bits, a 50 KB PNG: refused from its header, not decoded
        r = await c.post("/v1/chat/completions", json={**body, "messages": _ask("What is this?", huge)})
        assert_error(r, 400, contains="40,000,000 pixels are accepted")
        many = _ask("What are these?", *[img] * 40)  # 40 x 16 image tokens past the 512-token context
        assert_error(await c.post("/v1/chat/completions", json={**body, "messages": many}), 400,
                     contains="maximum context length")
        assert engine.bm.num_free == engine.bm.num_blocks
    finally:
        await c.aclose()
        c.engine.shutdown()
