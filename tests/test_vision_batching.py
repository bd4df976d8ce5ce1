"""The image encoder batched across requests: the images of every request added between two steps go through
Qwen2-VL's / Qwen2.5-VL's tower in one call (cu_seqlens keep the images apart), with each request's embeddings and
greedy tokens as when it is encoded alone; the encoder's time and images are counted in the engine's stats; a call
over the token budget splits; a request whose images fail to encode fails alone."""
from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine import engine as engine_mod
from cluster.engine.engine import LLMEngine
from cluster.engine.errors import RequestFailedError
from test_llava import _ask, _image

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def setup(request, tiny_models, engine_cache):
    path, _ = tiny_models(request.param)
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32",
                                               enable_prefix_caching=False))
    prompts = [engine.prepare_prompt(_ask("Describe it.", _image(1))),
               engine.prepare_prompt(_ask("Compare them.", _image(2, (64, 30)), _image(3, (24, 60)))),
               engine.prepare_prompt(_ask("What is this?", _image(4, (48, 48))))]
    return engine, prompts


def _calls(engine: LLMEngine) -> tuple[int, int]:
    s = engine.stats_dict()
    return s["vision_calls"], s["images_encoded"]


def test_encode_many_equals_one_at_a_time(setup):
    engine, prompts = setup
    items = [(p.pixel_values, p.image_grid) for p in prompts]
    together = engine.vision.encode_many(items)
    alone = [engine.vision.encode(*it) for it in items]
    assert [t.shape for t in together] == [a.shape for a in alone]
    assert all(torch.equal(t, a) for t, a in zip(together, alone))


def test_requests_added_together_are_encoded_in_one_call(setup):
    """Three requests (four images) added together: one encoder call, each request's embeddings as alone, and the
    same greedy tokens as each request run by itself (one call each)."""
    engine, prompts = setup
    engine.stats = engine_mod.EngineStats()
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    assert _calls(engine) == (0, 0)  # nothing encoded before the step
    engine.step()
    assert _calls(engine) == (1, 4) and engine.stats_dict()["vision_seconds"] > 0
    for rid, p in zip(rids, prompts):
        assert torch.equal(engine.seqs[rid].image_embeds, engine.vision.encode(p.pixel_values, p.image_grid))
        engine.abort(rid)
    together = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    assert _calls(engine) == (2, 8)
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert _calls(engine) == (5, 12)
    assert together == alone and together[0] != together[1]
    assert engine.bm.num_free == engine.bm.num_blocks


def test_the_token_budget_splits_calls(setup, monkeypatch):
    engine, prompts = setup
    want = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    engine.stats = engine_mod.EngineStats()
    counts = [sum(engine.vision.token_counts(p.pixel_values, p.image_grid)) for p in prompts]
    monkeypatch.setattr(engine_mod, "VISION_BATCH_TOKENS", counts[0] + counts[1])  # the first two, then the third
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == want
    assert _calls(engine) == (2, 4)


def test_an_aborted_request_is_not_encoded_and_a_failing_one_fails_alone(setup, monkeypatch):
    """The batched call raises (one request's patches are refused): it is retried one request at a time; that
    request fails with RequestFailedError, the others finish with their usual tokens."""
    engine, prompts = setup
    want = [r.token_ids for r in engine.generate([prompts[0], prompts[2]], GREEDY)]
    engine.stats = engine_mod.EngineStats()
    encode, bad = engine.vision.encode, prompts[1].image_grid[0]
    assert not any(torch.equal(g, bad) for p in (prompts[0], prompts[2]) for g in p.image_grid)

    def picky(pixels, grid):
        if any(torch.equal(g, bad) for g in grid):
            raise RuntimeError("refused")
        return encode(pixels, grid)

    monkeypatch.setattr(engine.vision, "encode", picky)
    aborted = engine.add_request(prompts[2], GREEDY)
    engine.abort(aborted)
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    got, errors = {rid: [] for rid in rids}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            else:
                got[out.request_id] += out.token_ids
    assert list(errors) == [rids[1]] and isinstance(errors[rids[1]], RequestFailedError)
    assert "while its images were encoded" in str(errors[rids[1]])
    assert [got[rids[0]], got[rids[2]]] == want
    assert _calls(engine) == (2, 2)  # the two that encoded alone; the batch of three and the refused one not counted
    assert engine.stats.failed == 1 and engine.bm.num_free == engine.bm.num_blocks
