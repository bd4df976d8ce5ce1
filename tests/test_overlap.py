"""Overlapped decode steps (EngineConfig.overlap_steps): a step launched before the previous step's tokens are read
must produce exactly what the plain step loop produces, free every block, and fall back cleanly when it cannot
know the next step (new requests, aborts)."""
import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine

G = GenerationConfig(max_new_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hi", "The capital of France is a beautiful city with", "1 2 3 4 5 6 7 8", "Once upon a time"]


def make(tiny_models, engine_cache, overlap: bool, **kw) -> LLMEngine:
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", overlap_steps=overlap, **kw))


@pytest.fixture(scope="module")
def plain(tiny_models, engine_cache):
    return make(tiny_models, engine_cache, False)


@pytest.fixture(scope="module")
def overlapped(tiny_models, engine_cache):
    return make(tiny_models, engine_cache, True)


def test_overlap_is_off_on_the_cpu_by_default(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    e = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu"))
    e.generate(PROMPTS[:2], G)
    assert not e.overlap and e.stats.steps_ahead == 0


def test_same_tokens_as_the_plain_loop(plain, overlapped):
    # mixed lengths: sequences finish on different steps, so later steps run ahead with fewer rows
    gens = [G.model_copy(update={"max_new_tokens": n}) for n in (1, 7, 20, 13)]
    want = [r.token_ids for r in plain.generate(PROMPTS, gens)]
    before = overlapped.stats.steps_ahead
    got = overlapped.generate(PROMPTS, gens)
    assert [r.token_ids for r in got] == want
    assert [r.finish_reason for r in got] == ["length"] * 4
    assert overlapped.stats.steps_ahead - before >= 10
    assert overlapped.bm.num_free == overlapped.bm.num_blocks


def test_seeded_sampling_and_stop_tokens_match(plain, overlapped):
    sampled = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    want = plain.generate(PROMPTS[:2], sampled)
    got = overlapped.generate(PROMPTS[:2], sampled)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # a stop token found in the step read late: the step already launched for it is dropped, not returned
    greedy = plain.generate([PROMPTS[0]], G)[0].token_ids
    stop = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_token_ids=[greedy[5]])
    want_stop = plain.generate([PROMPTS[0]], stop)[0]
    got_stop = overlapped.generate([PROMPTS[0]], stop)[0]
    assert got_stop.token_ids == want_stop.token_ids and got_stop.finish_reason == "stop"
    assert len(got_stop.token_ids) <= 6
    assert overlapped.bm.num_free == overlapped.bm.num_blocks


def test_penalties_and_min_tokens_count_the_token_in_flight(plain, overlapped):
    gen = G.model_copy(update={"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3})
    want = plain.generate(PROMPTS[:3], gen)
    before = overlapped.stats.steps_ahead
    got = overlapped.generate(PROMPTS[:3], gen)
    assert overlapped.stats.steps_ahead - before >= 10
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # min_new_tokens masks a stop token until the count is reached, counting the token still on the device: a stop
    # token first drawn right at the first allowed position must stop there (a stale count would mask it once more)
    greedy = plain.generate([PROMPTS[1]], G)[0].token_ids
    j = next(j for j in range(3, len(greedy)) if greedy[j] not in greedy[:j])
    early = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_token_ids=[greedy[j]], min_new_tokens=j)
    got_early = overlapped.generate([PROMPTS[1]], early)[0]
    assert got_early.token_ids == greedy[:j + 1] and got_early.finish_reason == "stop"


def test_logprobs_run_ahead(plain, overlapped):
    gen = G.model_copy(update={"logprobs": 2})
    want = plain.generate(PROMPTS[:2], gen)
    before = overlapped.stats.steps_ahead
    got = overlapped.generate(PROMPTS[:2], gen)
    assert overlapped.stats.steps_ahead - before >= 10
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.logprobs for r in got] == [r.logprobs for r in want]
    assert [len(r.logprobs) for r in got] == [20, 20]


def test_requests_arriving_and_aborted_mid_flight(plain, overlapped):
    want = [r.token_ids for r in plain.generate(PROMPTS[1:3], G)]
    e = overlapped
    first = e.add_request(PROMPTS[1], G)
    victim = e.add_request(PROMPTS[0], G)
    got: dict[str, list[int]] = {}

    def run(n: int) -> None:
        for _ in range(n):
            for out in e.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)

    run(5)
    assert e._in_flight is not None  # a step is on its way while we abort and add
    assert e.abort(victim)
    late = e.add_request(PROMPTS[2], G)
    while e.has_unfinished():
        run(1)
    assert got[first] == want[0] and got[late] == want[1]
    assert len(got[victim]) < G.max_new_tokens
    assert e.bm.num_free == e.bm.num_blocks


def test_a_full_batch_runs_ahead_while_requests_wait(plain, tiny_models, engine_cache):
    # two slots for four requests: the waiting ones are admitted as soon as a slot frees, and get the same tokens
    gens = [G.model_copy(update={"max_new_tokens": n}) for n in (5, 12, 9, 7)]
    want = [r.token_ids for r in plain.generate(PROMPTS, gens)]
    e = make(tiny_models, engine_cache, True, max_batch_size=2)
    got = e.generate(PROMPTS, gens)
    assert [r.token_ids for r in got] == want
    assert e.stats.steps_ahead >= 10
    assert e.bm.num_free == e.bm.num_blocks


def test_overlap_needs_a_single_rank_runner():
    class FakeTP:  # stands in for TPExecutor: an executor that runs no step ahead
        cfg = session_len = device = num_blocks = None
        can_overlap = False

    with pytest.raises(ValueError, match="overlap_steps needs a single-rank engine"):
        LLMEngine(runner=FakeTP(), engine_config=EngineConfig(overlap_steps=True))
