"""Continuous batching behaviour: batched == alone, preemption, chunked prefill, prefix caching, abort."""
import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hi", "The capital of France is a beautiful city with",
           "Once upon a time, in a land far away, there lived a princess who loved to read books about " * 2,
           "1 2 3 4 5 6 7 8"]


def make(tiny_models, engine_cache, **kw) -> LLMEngine:
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", **kw))


@pytest.fixture(scope="module")
def alone(tiny_models, engine_cache):
    e = make(tiny_models, engine_cache, enable_prefix_caching=False)
    return [e.generate([p], G)[0].token_ids for p in PROMPTS]


def test_batch_equals_alone(tiny_models, engine_cache, alone):
    e = make(tiny_models, engine_cache, enable_prefix_caching=False)
    assert [r.token_ids for r in e.generate(PROMPTS, G)] == alone
    assert e.bm.num_free == e.bm.num_blocks


def test_chunked_prefill_equals_alone(tiny_models, engine_cache, alone):
    e = make(tiny_models, engine_cache, enable_prefix_caching=False, max_prefill_token_num=16)
    assert [r.token_ids for r in e.generate(PROMPTS, G)] == alone
    assert e.stats.steps > len(PROMPTS) * G.max_new_tokens // len(PROMPTS)


def test_preemption_recomputes_same_tokens(tiny_models, engine_cache, alone):
    # 6 blocks of 16 tokens: not enough for all four sequences at once, so some get preempted and recomputed
    e = make(tiny_models, engine_cache, enable_prefix_caching=False, num_blocks=6, session_len=96)
    out = e.generate(PROMPTS, G)
    assert e.scheduler.num_preemptions > 0
    assert [r.token_ids for r in out] == alone
    assert e.bm.num_free == e.bm.num_blocks


def test_prefix_cache_hit_and_same_tokens(tiny_models, engine_cache):
    shared = "You are a helpful assistant. Answer briefly and precisely, in English. " * 3
    prompts = [shared + "What is 2+2?", shared + "Name a color."]
    cold = make(tiny_models, engine_cache, enable_prefix_caching=False)
    want = [cold.generate([p], G)[0].token_ids for p in prompts]
    e = make(tiny_models, engine_cache)
    first = e.generate([prompts[0]], G)[0]
    second = e.generate([prompts[1]], G)[0]
    assert first.cached_token_len == 0
    assert second.cached_token_len >= 32  # the shared prefix's full blocks came from the cache
    assert [first.token_ids, second.token_ids] == want
    assert e.stats_dict()["prefix_cache_hit_tokens"] == second.cached_token_len
    assert e.bm.num_free == e.bm.num_blocks  # cached blocks are free (reusable) once nobody holds them


def test_abort_frees_blocks(tiny_models, engine_cache):
    e = make(tiny_models, engine_cache)
    rids = [e.add_request(p, G) for p in PROMPTS]
    for _ in range(3):
        e.step()
    assert e.bm.num_free < e.bm.num_blocks
    for rid in rids:
        assert e.abort(rid)
    assert not e.has_unfinished()
    assert e.bm.num_free == e.bm.num_blocks
    assert e.abort(rids[0]) is False
    assert e.step() == []


def test_prompt_longer_than_session_is_refused(tiny_models, engine_cache):
    from cluster.engine.errors import PromptTooLongError

    e = make(tiny_models, engine_cache, session_len=64)
    with pytest.raises(PromptTooLongError, match=r"(?s)prompt has \d+ tokens.*max_new_tokens is 24.*session length 64"):
        e.add_request("word " * 80, G)
    assert not e.has_unfinished()
