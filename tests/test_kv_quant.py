"""Quantized KV cache. quant_policy=8: each cached (token, head) row is int8 with its own fp32 scale; 4: two 4-bit
values a byte with an fp32 (scale, min) per row; 'fp8': e4m3 with one scale per kv head and layer. With head_dim 64
they hold 3.8x, 6.4x and 4x the tokens of an fp32 cache. With the int8 cache the embedded SmolLM2 answers as it does with the full cache; the 4-bit cache keeps the
answer's content but not its wording."""
from __future__ import annotations

import math

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
ROMEO = [{"role": "user", "content": "Who wrote Romeo and Juliet?"}]


@pytest.fixture(scope="module")
def engines(default_model_dir):
    return {bits: LLMEngine(None, EngineConfig(device="cpu", dtype="float32", quant_policy=bits))
            for bits in (0, 8, 4, "fp8")}


@pytest.mark.parametrize("bits, ratio", [(8, 4 * 64 / (64 + 4)), (4, 4 * 64 / (32 + 8)), ("fp8", 4.0)])
def test_quantized_cache_holds_more_tokens(engines, bits, ratio):
    fp, q = engines[0], engines[bits]
    assert fp.model_config.head_dim == 64
    assert q.runner.kv_cache.dtype.itemsize == 1 and q.runner.kv_scales is not None
    assert q.runner.kv_cache.shape[-1] == (32 if bits == 4 else 64)
    assert fp.runner.block_bytes / q.runner.block_bytes == pytest.approx(ratio)
    assert q.runner.num_blocks > (ratio - 0.1) * fp.runner.num_blocks  # the same memory budget


@pytest.mark.parametrize("bits", [8, "fp8"])
def test_int8_and_fp8_caches_answer_like_the_full_cache(engines, bits):
    fp, q8 = engines[0], engines[bits]
    ids = fp.tokenizer.prompt_ids(CAPITAL)
    a, b = fp.generate([ids], G)[0], q8.generate([ids], G)[0]
    assert "Paris" in b.text
    assert b.token_ids[:16] == a.token_ids[:16]
    # the prefill read the int8 cache too: the first token's probability moves a little (compared as a probability:
    # this token's is ~0.15, where log space magnifies a 0.02 move to 0.12 on some CPUs)
    assert abs(math.exp(a.logprobs[0]["logprob"]) - math.exp(b.logprobs[0]["logprob"])) < 0.05


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_quantized_cache_keeps_the_content(engines, bits):
    q = engines[bits]
    ids = q.tokenizer.prompt_ids(ROMEO)
    first = q.generate([ids], G)[0]
    assert "Shakespeare" in first.text
    # a second request hits the prefix cache: decoding over quantized blocks written by an earlier request
    again = q.generate([ids], G)[0]
    assert again.cached_token_len > 0 and again.token_ids == first.token_ids
    assert q.bm.num_free == q.bm.num_blocks


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
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


PROMPTS = ["Hi", "The capital of France is a beautiful city with",
           "Once upon a time, in a land far away, there lived a princess who loved to read books about " * 2,
           "1 2 3 4 5 6 7 8"]


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_quantized_cache_through_chunks_preemption_and_prefix_hits(tiny_models, engine_cache, bits):
    """Each prompt alone on a roomy cache, against all of them at once on 6 blocks with 16-token prefill chunks
    (preempted and recomputed, prefill chunks reading the quantized rows of earlier chunks), then again (prefix
    hits on quantized blocks): the same tokens, and every block freed."""
    path, _ = tiny_models("llama")
    ec = dict(cache_dir=engine_cache, device="cpu", dtype="float32", quant_policy=bits)
    roomy = LLMEngine(str(path), EngineConfig(**ec, enable_prefix_caching=False))
    want = [roomy.generate([p], G)[0].token_ids for p in PROMPTS]
    tight = LLMEngine(str(path), EngineConfig(**ec, num_blocks=6, session_len=96, max_prefill_token_num=16))
    assert [r.token_ids for r in tight.generate(PROMPTS, G)] == want
    assert tight.scheduler.num_preemptions > 0 and tight.stats.steps > len(PROMPTS) * G.max_new_tokens // 2
    again = tight.generate([PROMPTS[2]], G)[0]
    assert again.cached_token_len > 0 and again.token_ids == want[2]
    assert tight.bm.num_free == tight.bm.num_blocks


def test_fp8_cache_is_refused_below_compute_capability_8_9(monkeypatch):
    from cluster.engine.model_runner import ModelRunner

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    with pytest.raises(ValueError, match=r"quant_policy='fp8' .* 8\.0: use --quant-policy 8"):
        ModelRunner(None, {}, EngineConfig(quant_policy="fp8"), torch.device("cuda", 0), 64)
