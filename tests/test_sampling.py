"""Sampling controls: stop words and ids, seeds, top-k/p, logprobs against transformers' softmax, penalties."""
import math

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def engine(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu"))


PROMPT = "The quick brown fox jumps over the lazy dog because"


def test_seed_reproducible_and_batch_independent(engine):
    g = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    a = engine.generate([PROMPT], g)[0].token_ids
    b = engine.generate([PROMPT, "other prompt", "and another one"], [g, g.model_copy(update={"seed": 7}),
                                                                        g.model_copy(update={"seed": None})])[0].token_ids
    c = engine.generate([PROMPT], g.model_copy(update={"seed": 99}))[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
    topk1 = engine.generate([PROMPT], GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_stop_token_ids_and_min_new_tokens(engine):
    base = engine.generate([PROMPT], GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    stop_at = base[4]
    first = base.index(stop_at)
    r = engine.generate([PROMPT], GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[stop_at]))[0]
    assert r.finish_reason == "stop" and r.token_ids == base[:first + 1]
    r = engine.generate([PROMPT], GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[stop_at], min_new_tokens=12))[0]
    assert r.generate_token_len == 12 and stop_at not in r.token_ids


def test_stop_word_ends_text_and_is_not_shown(engine):
    full = engine.generate([PROMPT], GenerationConfig(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 12
    word = full.text[8:12]
    cut = full.text.index(word)
    r = engine.generate([PROMPT], GenerationConfig(max_new_tokens=20, temperature=0, ignore_eos=True,
                                                    stop_words=[word]))[0]
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert word not in r.text


def test_logprobs_match_transformers_softmax(tiny_models, engine):
    _, hf = tiny_models("llama")
    r = engine.generate([PROMPT], GenerationConfig(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=5))[0]
    ids = engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + r.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert len(r.logprobs) == 6
    for i, lp in enumerate(r.logprobs):
        row = ref[len(ids) - 1 + i]
        assert lp["token_id"] == r.token_ids[i]
        assert math.isclose(lp["logprob"], row[lp["token_id"]].item(), abs_tol=1e-4)
        want = row.topk(5)
        assert list(lp["top_logprobs"]) == want.indices.tolist()
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp["top_logprobs"].values(), want.values.tolist()))


def test_repetition_penalty_changes_greedy_output(engine):
    g = GenerationConfig(max_new_tokens=24, temperature=0, ignore_eos=True)
    plain = engine.generate([PROMPT], g)[0].token_ids
    pen = engine.generate([PROMPT], g.model_copy(update={"repetition_penalty": 5.0}))[0].token_ids
    assert plain != pen
    assert len(set(pen)) >= len(set(plain))


def test_temperature_sampling_stays_in_top_p_nucleus(engine):
    # top_p tiny: only the single most likely token survives, so sampling equals greedy
    g = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, ignore_eos=True, seed=3)
    greedy = engine.generate([PROMPT], GenerationConfig(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    assert engine.generate([PROMPT], g)[0].token_ids == greedy.token_ids
