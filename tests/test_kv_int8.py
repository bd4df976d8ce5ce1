"""int8 KV cache (quant_policy=8): each cached (token, head) row is int8 with its own fp32 scale. It holds 3.8x the
tokens of an fp32 cache (head_dim 64), and the embedded SmolLM2 answers as it does with the full-precision cache."""
from __future__ import annotations

import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engines(default_model_dir):
    return (LLMEngine(None, EngineConfig(device="cpu", dtype="float32")),
            LLMEngine(None, EngineConfig(device="cpu", dtype="float32", quant_policy=8)))


def test_int8_cache_holds_more_tokens(engines):
    fp, q8 = engines
    d = fp.model_config.head_dim
    assert q8.runner.kv_cache.dtype.itemsize == 1 and q8.runner.kv_scales is not None
    assert fp.runner.block_bytes / q8.runner.block_bytes == pytest.approx(4 * d / (d + 4))
    assert q8.runner.num_blocks > 3 * fp.runner.num_blocks  # same memory budget, 3.8x the blocks


def test_int8_cache_answers_like_the_full_cache(engines):
    fp, q8 = engines
    ids = fp.tokenizer.prompt_ids(ASK)
    a, b = fp.generate([ids], G)[0], q8.generate([ids], G)[0]
    assert "Paris" in b.text
    assert b.token_ids[:16] == a.token_ids[:16]
    assert abs(a.logprobs[0]["logprob"] - b.logprobs[0]["logprob"]) < 0.1  # the prefill read the int8 cache too
    # a second request hits the prefix cache: decoding over int8 blocks written by an earlier request
    again = q8.generate([ids], G)[0]
    assert again.cached_token_len > 0 and again.token_ids == b.token_ids
    assert q8.bm.num_free == q8.bm.num_blocks


def test_int4_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match=r"quant_policy=4 .* use 8"):
        EngineConfig(quant_policy=4)


def test_int8_cache_at_tp2_matches_tp1(tiny_models, engine_cache):
    from cluster import pipeline

    path, _ = tiny_models("llama")
    ec = dict(cache_dir=engine_cache, device="cpu", dtype="float32", session_len=256, max_batch_size=8, quant_policy=8)
    one = LLMEngine(str(path), EngineConfig(**ec))
    ids = one.tokenizer.encode("The capital of France is")
    want = one.generate([ids], G)[0].token_ids
    pipe = pipeline(str(path), engine_config=EngineConfig(**ec, tp=2))
    try:
        assert pipe(ids, G).token_ids == want
    finally:
        pipe.close()
        pipe.engine.engine.runner.close()
