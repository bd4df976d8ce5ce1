"""Quantized KV cache. quant_policy=8: each cached (token, head) row is int8 with its own fp32 scale; 4: two 4-bit
values a byte with an fp32 (scale, min) per row. With head_dim 64 they hold 3.8x and 6.4x the tokens of an fp32
cache. With the int8 cache the embedded SmolLM2 answers as it does with the full cache; the 4-bit cache keeps the
answer's content but not its wording."""
from __future__ import annotations

import math

import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
ROMEO = [{"role": "user", "content": "Who wrote Romeo and Juliet?"}]


@pytest.fixture(scope="module")
def engines(default_model_dir):
    return {bits: LLMEngine(None, EngineConfig(device="cpu", dtype="float32", quant_policy=bits)) for bits in (0, 8, 4)}


@pytest.mark.parametrize("bits, ratio", [(8, 4 * 64 / (64 + 4)), (4, 4 * 64 / (32 + 8))])
def test_quantized_cache_holds_more_tokens(engines, bits, ratio):
    fp, q = engines[0], engines[bits]
    assert fp.model_config.head_dim == 64
    assert q.runner.kv_cache.dtype.itemsize == 1 and q.runner.kv_scales is not None
    assert q.runner.kv_cache.shape[-1] == (64 if bits == 8 else 32)
    assert fp.runner.block_bytes / q.runner.block_bytes == pytest.approx(ratio)
    assert q.runner.num_blocks > (ratio - 0.1) * fp.runner.num_blocks  # the same memory budget


def test_int8_cache_answers_like_the_full_cache(engines):
    fp, q8 = engines[0], engines[8]
    ids = fp.tokenizer.prompt_ids(CAPITAL)
    a, b = fp.generate([ids], G)[0], q8.generate([ids], G)[0]
    assert "Paris" in b.text
    assert b.token_ids[:16] == a.token_ids[:16]
    # the prefill read the int8 cache too: the first token's probability moves a little (compared as a probability:
    # this token's is ~0.15, where log space magnifies a 0.02 move to 0.12 on some CPUs)
    assert abs(math.exp(a.logprobs[0]["logprob"]) - math.exp(b.logprobs[0]["logprob"])) < 0.05


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_keeps_the_content(engines, bits):
    q = engines[bits]
    ids = q.tokenizer.prompt_ids(ROMEO)
    first = q.generate([ids], G)[0]
    assert "Shakespeare" in first.text
    # a second request hits the prefix cache: decoding over quantized blocks written by an earlier request
    again = q.generate([ids], G)[0]
    assert again.cached_token_len > 0 and again.token_ids == first.token_ids
    assert q.bm.num_free == q.bm.num_blocks


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_at_tp2_matches_tp1(tiny_models, engine_cache, bits):
    from cluster import pipeline

    path, _ = tiny_models("llama")
    ec = dict(cache_dir=engine_cache, device="cpu", dtype="float32", session_len=256, max_batch_size=8,
              quant_policy=bits)
    one = LLMEngine(str(path), EngineConfig(**ec))
    ids = one.tokenizer.encode("The capital of France is")
    want = one.generate([ids], G)[0].token_ids
    pipe = pipeline(str(path), engine_config=EngineConfig(**ec, tp=2))
    try:
        assert pipe(ids, G).token_ids == want
    finally:
        pipe.close()
        pipe.engine.engine.runner.close()
