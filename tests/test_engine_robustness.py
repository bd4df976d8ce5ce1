"""One request cannot break the step loop for the others: ids outside the vocabulary are refused at admission; a
request that gets past admission and breaks a step, or whose output's post-processing raises, fails alone while
the others finish with exactly their solo tokens; when the loop really dies, other streams learn nothing of why."""
import queue
import threading

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine import errors
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import IncrementalDetokenizer, PreparedPrompt

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
GOOD = "The capital of France is a beautiful city with"
VOCAB = 49152  # the tiny checkpoints' (SmolLM2's) vocabulary


def make(tiny_models, engine_cache, **kw) -> LLMEngine:
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", **kw))


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "overlap"])
def aeng(request, tiny_models, engine_cache):
    a = AsyncEngine(make(tiny_models, engine_cache, overlap_steps=request.param))
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def solo(tiny_models, engine_cache) -> list[int]:
    return make(tiny_models, engine_cache).generate([GOOD], G)[0].token_ids


class Held(queue.Queue):
    """A stream whose first output holds the engine's thread until `gate` is set: whatever the test does
    meanwhile reaches the engine while this request is mid-stream."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.first = True

    def put(self, item, *args, **kwargs) -> None:
        super().put(item, *args, **kwargs)
        if self.first:
            self.first = False
            self.gate.wait(timeout=30)


def drain(q: queue.Queue) -> list[int]:
    """A stream's tokens until it finishes; raises the error it got instead."""
    tokens: list[int] = []
    while True:
        item = q.get(timeout=60)
        if isinstance(item, BaseException):
            raise item
        tokens += item.token_ids
        if item.finish_reason is not None:
            return tokens


def test_out_of_vocabulary_ids_are_refused_at_admission(aeng, solo):
    held = Held()
    aeng.submit(GOOD, G, None, None, held)
    try:
        first = held.get(timeout=60)
        for ids in ([1, VOCAB], [-1], [2**63]):
            bad = ids[-1]
            with pytest.raises(ValueError, match=rf"prompt token id {bad} is out of range: this model's vocabulary "
                                                 rf"has {VOCAB} ids \(0\.\.{VOCAB - 1}\)"):
                aeng.submit(ids, G, None, None)
        for stop in (10**6, 2**70):
            gen = G.model_copy(update={"stop_token_ids": [stop], "min_new_tokens": 2})
            with pytest.raises(ValueError, match=rf"stop_token_ids entry {stop} is out of range"):
                aeng.submit([1, 2, 3], gen, None, None)
    finally:
        held.gate.set()
    assert first.token_ids + drain(held) == solo
    aeng.check_health()


def test_image_prompt_ids_are_checked_too(aeng):
    prompt = PreparedPrompt([1, VOCAB + 5], torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=rf"prompt token id {VOCAB + 5} is out of range"):
        aeng.validate(prompt, G)


@pytest.mark.parametrize("prompt, update", [
    ([1, VOCAB], {}),
    ([2**63], {}),
    ([1, 2, 3], {"stop_token_ids": [10**6], "min_new_tokens": 2}),
], ids=["embedding", "overflow", "stop-mask"])
def test_a_request_that_breaks_a_step_fails_alone(aeng, solo, monkeypatch, prompt, update):
    engine = aeng.engine
    monkeypatch.setattr(LLMEngine, "validate", lambda self, prompt, gen: None)  # as if admission had missed it
    held = Held()
    rid, _ = aeng.submit(GOOD, G, None, None, held)
    try:
        first = held.get(timeout=60)
        good = engine.seqs[rid]  # the engine's thread is held: safe to look
        bad_rid, bad = aeng.submit(prompt, G.model_copy(update=update), None, None)
    finally:
        held.gate.set()
    with pytest.raises(ValueError, match="out of range"):
        drain(bad.q)
    assert first.token_ids + drain(held) == solo
    assert good.num_preemptions == 1  # it was in the failed step, and was recomputed
    aeng.check_health()
    assert bad_rid not in engine.seqs and not engine.has_unfinished()
    assert engine.bm.num_free == engine.bm.num_blocks


def test_a_failing_detokenizer_fails_only_its_request(aeng, solo, monkeypatch):
    marker = [7, 8, 9, 10]

    class Broken(IncrementalDetokenizer):
        def add(self, token_id: int) -> None:
            raise RuntimeError("detokenizer internals")

    def detokenizer(tok, ids, *args):
        return (Broken if ids == marker else IncrementalDetokenizer)(tok, ids, *args)

    monkeypatch.setattr("cluster.engine.engine.IncrementalDetokenizer", detokenizer)
    held = Held()
    aeng.submit(GOOD, G, None, None, held)
    try:
        first = held.get(timeout=60)
        _, bad = aeng.submit(marker, G, None, None)
    finally:
        held.gate.set()
    assert first.token_ids + drain(held) == solo
    with pytest.raises(errors.RequestFailedError) as err:
        drain(bad.q)
    assert "internals" not in str(err.value)
    aeng.check_health()
    assert aeng.engine.bm.num_free == aeng.engine.bm.num_blocks


def test_a_dead_loop_tells_streams_nothing_of_its_cause(tiny_models, engine_cache, monkeypatch, caplog):
    engine = make(tiny_models, engine_cache)

    def fault(*args, **kwargs):
        raise RuntimeError("device fault at 0xdeadbeef while running user 42's prompt")

    monkeypatch.setattr(engine.runner, "execute", fault)
    aeng = AsyncEngine(engine)
    try:
        _, stream = aeng.submit(GOOD, G, None, None)
        with pytest.raises(errors.EngineDeadError, match="retry") as err:
            drain(stream.q)
        with pytest.raises(errors.EngineDeadError) as health:
            aeng.check_health()
    finally:
        aeng.shutdown()
    for message in (str(err.value), str(health.value)):
        assert "deadbeef" not in message and "user 42" not in message
    assert "deadbeef" in caplog.text  # the operators' log has it


def test_from_model_builds_the_engine_on_the_step_loop_thread(tiny_models, engine_cache, solo):
    """The engine's weights and warm-up run on the thread that then steps it (one OpenMP pool on the CPU, see
    AsyncEngine), and it serves the same tokens as a plain engine."""
    built_on = []

    def build() -> LLMEngine:
        built_on.append(threading.current_thread())
        return make(tiny_models, engine_cache)

    a = AsyncEngine(build)
    try:
        assert built_on == [a._thread] and a._thread is not threading.current_thread()
        assert [t for out in a.stream(GOOD, G) for t in out.token_ids] == solo
    finally:
        a.shutdown()


def test_a_failed_build_raises_in_the_caller():
    def build() -> LLMEngine:
        raise ValueError("model needs 30.1 GiB; lower --cache-max-entry-count")

    with pytest.raises(ValueError, match="cache-max-entry-count"):
        AsyncEngine(build)
