"""DeepSeek-VL (`deepseek_vl`, and `deepseek_vl_hybrid` with SAM's high-resolution tower): images through the engine,
token-exact with transformers' DeepseekVLForConditionalGeneration (and the hybrid's) on the same weights and pixels.
Prompt ids and pixels are the real processor's (AutoProcessor on the checkpoint: its chat template over content
parts, BOS, <image_placeholder> x 36 per image, images of any size resized and padded to a square); one image, two
of different aspect ratios beside a text-only row; images in two turns of one conversation; an image straddling
prefill chunks; the prefix cache telling images apart; bad images refused; the processor's template kept when the
tokenizer's is another; tensor parallelism."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt
from conftest import hf_greedy
from deepseek_vl_models import CHAT_TEMPLATE, IMAGE_TOKEN, IMAGE_TOKENS
from test_llava import _ask, _data_url, _image, assert_tp2_matches_tp1, assert_prefix_cache_tells_images_apart

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
KINDS = ("deepseek_vl", "deepseek_vl_hybrid")
SIZES = [(40, 52), (64, 30), (24, 60), (7, 7), (1, 300), (300, 1)]  # (height, width): wide, tall, tiny, strips


def _engine(path, engine_cache: str, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module", params=KINDS)
def any_kind(request, tiny_models, engine_cache):
    path, hf_model = tiny_models(request.param)
    return path, hf_model, _engine(path, engine_cache)


@pytest.fixture(scope="module")
def dsvl(tiny_models, engine_cache):
    path, hf_model = tiny_models("deepseek_vl")
    return path, hf_model, _engine(path, engine_cache)


def _hf(hf_model, prepared: PreparedPrompt, n: int = GREEDY.max_new_tokens) -> list[int]:
    if prepared.pixel_values is None:
        return hf_greedy(hf_model, prepared.token_ids, n)
    extra = {} if prepared.image_grid is None else {"high_res_pixel_values": prepared.image_grid}
    return hf_greedy(hf_model, prepared.token_ids, n, pixel_values=prepared.pixel_values, **extra)


def _hf_parts(messages: list[dict]) -> list[dict]:
    """The same conversation as transformers' processors take it: image parts holding the PIL images."""
    from cluster.engine.multimodal import is_image_part, load_image

    def part(p):
        return {"type": "image", "image": load_image(p["image_url"]["url"])} if is_image_part(p) else p

    return [{**m, "content": [part(p) for p in m["content"]] if isinstance(m["content"], list)
             else [{"type": "text", "text": m["content"]}]} for m in messages]


def _two_images():
    return _ask("Compare the two pictures.", _image(1), _image(2, (64, 30)))  # 40 x 52, then a wide 64 x 30


def _two_turns():
    """Images in two user turns of one conversation, an assistant answer between them."""
    return [*_ask("What is in this picture?", _image(3)),
            {"role": "assistant", "content": "A field of coloured noise."},
            *_ask("And in this one, next to it?", _image(4, (24, 60)), _image(5, (60, 24)))]


def test_prompts_and_pixels_match_the_processor(any_kind):
    """AutoProcessor on the checkpoint (DeepseekVLProcessor, or the hybrid's: chat template, BOS, 36 image tokens per
    image) gives the engine's token ids and pixels, for one turn and two; every size and aspect ratio is resized
    and padded to the one square; the encoder is get_image_features."""
    from transformers import AutoProcessor

    path, hf_model, engine = any_kind
    processor = AutoProcessor.from_pretrained(str(path))
    assert processor.num_image_tokens == IMAGE_TOKENS == engine.model_config.vision["image_seq_len"]
    for chat in (_two_images(), _two_turns(), [{"role": "user", "content": "No picture here."}]):
        want = processor.apply_chat_template(_hf_parts(chat), add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")
        got = engine.prepare_prompt(chat)
        assert got.token_ids == want["input_ids"][0].tolist()
        assert got.token_ids[0] == engine.tokenizer.hf.bos_token_id  # the processor's BOS, not the template's
        if got.pixel_values is None:
            assert "pixel_values" not in want
            continue
        assert torch.equal(got.pixel_values, want["pixel_values"])
        if "high_res_pixel_values" in want:
            assert torch.equal(got.image_grid, want["high_res_pixel_values"])
    images = [_image(10 + i, size) for i, size in enumerate(SIZES)]
    got = engine.prepare_prompt(_ask("Sizes.", *images))
    want = processor.image_processor(images, return_tensors="pt")
    assert got.pixel_values.shape == (len(SIZES), 3, 24, 24) and torch.equal(got.pixel_values, want["pixel_values"])
    assert got.token_ids.count(engine.model_config.vision["image_token_id"]) == IMAGE_TOKENS * len(SIZES)
    args = [got.pixel_values] + ([got.image_grid] if got.image_grid is not None else [])
    with torch.no_grad():
        feats = hf_model.model.get_image_features(*args).pooler_output
    assert torch.allclose(engine.vision.encode(got.pixel_values, got.image_grid), feats.flatten(0, 1), atol=1e-5)


def test_image_prompts_match_transformers(any_kind):
    path, hf_model, engine = any_kind
    one = engine.prepare_prompt(_ask("What is in this picture?", _image(0)))
    two = engine.prepare_prompt(_two_images())
    text_only = engine.prepare_prompt([{"role": "user", "content": "No picture here."}])
    got = engine.generate([one, two, text_only], GREEDY)  # in one batch: image and text rows side by side
    assert [g.token_ids for g in got] == [_hf(hf_model, p) for p in (one, two, text_only)]
    assert got[0].token_ids != got[1].token_ids
    assert engine.bm.num_free == engine.bm.num_blocks


def test_two_turns_and_thin_images_match_transformers(dsvl):
    """A conversation with images in two turns; 300 x 1 and 1 x 300 strips (padded to the square)."""
    path, hf_model, engine = dsvl
    prompts = [engine.prepare_prompt(_two_turns()),
               engine.prepare_prompt(_ask("What is this?", _image(6, (1, 300)), _image(7, (300, 1))))]
    got = engine.generate(prompts, GREEDY)
    assert [g.token_ids for g in got] == [_hf(hf_model, p) for p in prompts]


def test_chunked_prefill_splits_an_image(tiny_models, engine_cache):
    """Prefill chunks of 16 tokens: each image's 36 embeddings straddle three steps."""
    path, hf_model = tiny_models("deepseek_vl")
    engine = _engine(path, engine_cache, max_prefill_token_num=16, session_len=512)
    prepared = engine.prepare_prompt(_two_images())
    first = prepared.token_ids.index(engine.model_config.vision["image_token_id"])
    assert first // 16 != (first + IMAGE_TOKENS - 1) // 16, "the image should cross a chunk boundary"
    assert engine.generate([prepared], GREEDY)[0].token_ids == _hf(hf_model, prepared)


def test_prefix_cache_tells_images_apart(dsvl):
    path, hf_model, engine = dsvl
    assert_prefix_cache_tells_images_apart(engine, lambda p: _hf(hf_model, p), seeds=(8, 9))


@pytest.mark.parametrize("image, message", [
    (_data_url(_image(0))[:60] + "@@", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", "could not be decoded"),  # a cut-off PNG
    (b"", "could not be decoded"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not be decoded"),
    ("zero", "image has no pixels"),
])
def test_bad_images_are_refused_with_the_reason(dsvl, image, message):
    from PIL import Image

    engine = dsvl[2]
    image = Image.new("RGB", (0, 5)) if image == "zero" else image
    with pytest.raises(ValueError, match=message):
        engine.add_request([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "What is it?"}]}], GREEDY)
    with pytest.raises(ValueError, match=r"1 image token\(s\) '<image_placeholder>' for 0 image\(s\)"):
        engine.add_request(f"Look: {IMAGE_TOKEN}", GREEDY)
    assert not engine.seqs and engine.bm.num_free == engine.bm.num_blocks


def test_the_processors_chat_template_is_applied(tiny_models, engine_cache, tmp_path):
    """A checkpoint whose tokenizer carries another template (SmolLM2's ChatML in tokenizer_config.json) and whose
    processor's is the legacy chat_template.json: the converted engine applies the processor's."""
    from transformers import AutoProcessor, AutoTokenizer

    path, _ = tiny_models("deepseek_vl")
    src = tmp_path / "legacy"
    shutil.copytree(path, src)
    (src / "chat_template.jinja").unlink()
    (src / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": chatml}))
    assert AutoTokenizer.from_pretrained(str(src)).chat_template == chatml
    engine = _engine(src, engine_cache)
    assert engine.tokenizer.hf.chat_template == CHAT_TEMPLATE
    want = AutoProcessor.from_pretrained(str(src)).apply_chat_template(
        _hf_parts(_two_turns()), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert engine.prepare_prompt(_two_turns()).token_ids == want["input_ids"][0].tolist()


def test_hub_config_converts_as_llama():
    """deepseek-community's layout: the config check passes it; its language model is a Llama, tied on the
    top-level flag as transformers ties it; transformers 4's nested tower names are read."""
    from cluster.convert import deepseek_vl
    from cluster.convert.families import check_supported
    from cluster.convert.vlm import text_model_type, vlm_for

    vision = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 16, "hidden_size": 1024}
    hub = {"model_type": "deepseek_vl", "text_config": {"hidden_size": 2048, "num_hidden_layers": 24},
           "vision_config": vision}
    check_supported(hub)
    check_supported({**hub, "model_type": "deepseek_vl_hybrid", "high_res_vision_config": {}})
    assert vlm_for(hub) is deepseek_vl and text_model_type(hub) == "llama"
    assert deepseek_vl.text_config(hub)["tie_word_embeddings"] is True
    assert deepseek_vl.text_config({**hub, "tie_word_embeddings": False})["tie_word_embeddings"] is False
    fields = deepseek_vl.vision_fields(hub)
    assert fields["image_seq_len"] == 576 and fields["image_token_id"] == 100015 and fields["text_hidden_size"] == 2048
    with pytest.raises(ValueError, match="vision tower 'clip_vision_model' is not supported"):
        deepseek_vl.vision_fields({**hub, "vision_config": {**vision, "model_type": "clip_vision_model"}})
    names = ["model.vision_model.vision_model.embeddings.patch_embedding.weight", "model.aligner.linear1.weight",
             "model.high_res_vision_model.vision_encoder.neck.conv1.weight", "model.language_model.norm.weight"]
    get = lambda n: torch.zeros(1)  # noqa: E731
    get.names = set(names)
    assert sorted(deepseek_vl.vision_tensors(get)) == [
        "aligner.linear1.weight", "high_res_vision_model.neck.conv1.weight",
        "vision_model.embeddings.patch_embedding.weight"]


def test_deepseek_vl_at_tp2_matches_tp1(any_kind, engine_cache):
    """Both kinds: the hybrid's second (1024 px) image tensor travels on the wire as the grid does."""
    path, _, engine = any_kind
    assert_tp2_matches_tp1(path, engine, _two_images(), engine_cache, session_len=512)
