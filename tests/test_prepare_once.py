"""A prompt is prepared (tokenized, images decoded) and validated once per request: in AsyncEngine.submit for a raw
prompt, by the caller for a PreparedPrompt (RankZeroHost's sequence), in add_request for offline use; never again
on the engine's thread."""
import queue

import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt
from test_engine_robustness import drain

G = GenerationConfig(max_new_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", [1, 2, 3, 4], [{"role": "user", "content": "Hello there"}]]


@pytest.fixture(scope="module")
def aeng(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    a = AsyncEngine(LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu")))
    yield a
    a.shutdown()


def _count(engine: LLMEngine, monkeypatch) -> dict[str, int]:
    """How many times `engine` tokenizes a prompt, and how many validations it runs, from now on."""
    counts = {"prompt_ids": 0, "validate": 0}
    prompt_ids, validate = engine.tokenizer.prompt_ids, engine.validate

    def counting_prompt_ids(prompt, image_lens=None):
        counts["prompt_ids"] += 1
        return prompt_ids(prompt, image_lens)

    def counting_validate(prompt, gen):
        counts["validate"] += 1
        return validate(prompt, gen)

    monkeypatch.setattr(engine.tokenizer, "prompt_ids", counting_prompt_ids)
    monkeypatch.setattr(engine, "validate", counting_validate)
    return counts


@pytest.fixture
def calls(aeng, monkeypatch) -> dict[str, int]:
    return _count(aeng.engine, monkeypatch)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "ids", "messages"])
def test_a_raw_prompt_is_prepared_and_validated_once_in_submit(aeng, calls, prompt):
    _, stream = aeng.submit(prompt, G, None, None)
    assert len(drain(stream.q)) == G.max_new_tokens
    assert calls == {"prompt_ids": 1, "validate": 1}


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "ids", "messages"])
def test_a_prepared_prompt_is_neither_prepared_nor_validated_again(aeng, calls, prompt):
    """RankZeroHost's sequence: prepare_prompt, fill max_new_tokens, validate, submit the prepared prompt."""
    prepared = aeng.prepare_prompt(prompt)
    assert isinstance(prepared, PreparedPrompt) and prepared.pixel_values is None
    gen = G.model_copy(update={"max_new_tokens": min(G.max_new_tokens, aeng.session_len - len(prepared))})
    aeng.validate(prepared, gen)
    sink: queue.Queue = queue.Queue()
    aeng.submit(prepared, gen, "host-1", None, sink)
    assert len(drain(sink)) == gen.max_new_tokens
    assert calls == {"prompt_ids": 1, "validate": 1}


def test_offline_add_request_prepares_and_validates_once(tiny_models, engine_cache, monkeypatch):
    path, _ = tiny_models("llama")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu"))
    calls = _count(engine, monkeypatch)
    assert len(engine.generate([PROMPTS[0]], G)[0].token_ids) == G.max_new_tokens
    assert calls == {"prompt_ids": 1, "validate": 1}
