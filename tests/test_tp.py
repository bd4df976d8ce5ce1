"""Tensor parallelism on the CPU (gloo, local processes): greedy tokens at tp=2 (and tp=3 for SmolLM2) equal tp=1's
and transformers'; the Ray-path entry points; a dead rank fails requests fast instead of hanging them."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import torch

from cluster import pipeline
from cluster.config import EngineConfig, GenerationConfig
from cluster.convert.cache import ensure_converted
from cluster.engine.engine import LLMEngine
from cluster.engine.errors import EngineDeadError
from cluster.engine.model_runner import StepInput
from cluster.executor import tp as tpmod
from cluster.executor import tp_groups, tp_wire
from conftest import hf_greedy

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello there, how are you doing today?", "The capital of France is"]


def _ec(cache: str | None, tp: int, **kw) -> EngineConfig:
    return EngineConfig(cache_dir=cache, device="cpu", dtype="float32", tp=tp, session_len=256, max_batch_size=8, **kw)


@contextlib.contextmanager
def tp_pipeline(model, ec: EngineConfig):
    pipe = pipeline(model, engine_config=ec)
    try:
        yield pipe
    finally:
        pipe.close()
        pipe.engine.engine.runner.close()


def test_step_plan_roundtrip():
    step = StepInput(input_ids=torch.tensor([5, 6, 7, 8]), positions=torch.tensor([0, 1, 2, 9]),
                     slot_mapping=torch.tensor([16, 17, 18, 41]),
                     block_tables=torch.tensor([[1, 0], [2, 3]], dtype=torch.int32),
                     context_lens=torch.tensor([3, 10], dtype=torch.int32),
                     cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32), logit_indices=torch.tensor([2, 3]),
                     max_context_len=10, decode_only=False, embeds=torch.randn(2, 8), embed_rows=torch.tensor([1, 2]))
    header, payload = tp_wire.pack_step(step)
    assert header.shape == (tp_wire.HEADER_LEN,) and payload.numel() == tp_wire.payload_len(header)
    back = tp_wire.unpack_step(header, payload, tp_wire.embeds_message(step))
    for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens", "cu_seqlens_q",
                 "logit_indices", "embed_rows", "embeds"):
        a, b = getattr(step, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (back.max_context_len, back.decode_only) == (10, False)


@pytest.mark.parametrize("kind", ["llama", "gqa1", "qwen2", "mixtral", "qwen2_moe"])
def test_tp2_matches_tp1_and_transformers(kind, tiny_models, engine_cache):
    """Llama; GQA with 1 KV head over 2 ranks (replicated, not split); Qwen2 (qkv bias, tied embeddings); Mixtral
    and Qwen2-MoE (every expert's FFN split over the ranks, the router replicated)."""
    path, hf_model = tiny_models(kind)
    with tp_pipeline(str(path), _ec(engine_cache, 2)) as pipe:
        # a tp=1 engine in the same process, while the tp=2 group is open, is unaffected by it
        tp1 = LLMEngine(str(path), _ec(engine_cache, 1))
        ids = [tp1.tokenizer.encode(p) for p in PROMPTS]
        want = [r.token_ids for r in tp1.generate(ids, GREEDY)]
        got = [r.token_ids for r in pipe(ids, GREEDY)]
        assert pipe.engine.engine.runner.tp_size == 2
    assert got == want, f"{kind}: tp=2 diverged from tp=1"
    assert got[0] == hf_greedy(hf_model, ids[0], GREEDY.max_new_tokens), f"{kind}: tp=2 diverged from transformers"


def test_padded_vocab_and_converted_dir(tokenizer_dir, engine_cache, tmp_path):
    """A vocabulary that doesn't split evenly (padded rows on the last rank), loaded from a `cluster convert`ed
    directory: each rank's shard holds its half of the layers."""
    import transformers as tf

    from conftest import TINY, _save

    torch.manual_seed(5)
    hf_model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY, "vocab_size": TINY["vocab_size"] + 1})).eval()
    src = _save(hf_model, tokenizer_dir, tmp_path / "oddvocab")
    out = ensure_converted(str(src), 2, "float32", engine_cache, progress=False)
    from safetensors import safe_open

    shapes = [safe_open(str(out / f"rank{r}.safetensors"), "pt").get_slice("layers.0.mlp.down_proj.weight").get_shape()
              for r in range(2)]
    assert shapes == [[64, 64], [64, 64]]  # FFN 128 split in two
    with tp_pipeline(str(out), _ec(None, 2)) as pipe:
        ids = pipe.tokenizer.encode(PROMPTS[0])
        got = pipe([ids], GREEDY)[0].token_ids
    assert got == hf_greedy(hf_model, ids, GREEDY.max_new_tokens)


def test_smollm2_tp2_is_refused_naming_valid_sizes():
    with pytest.raises(ValueError, match=r"tp=2 does not divide.*9 heads.*valid tp sizes: \[1, 3\]"):
        pipeline(None, engine_config=EngineConfig(device="cpu", dtype="float32", tp=2))


def test_smollm2_tp3_matches_tp1(default_model_dir):
    """The embedded SmolLM2 (9 heads, 3 KV heads) over 3 ranks: one KV head per rank."""
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    small = dict(device="cpu", dtype="float32", session_len=256, max_batch_size=4)  # KV caches of a few MB
    tp1 = LLMEngine(str(default_model_dir), EngineConfig(**small))
    ids = tp1.tokenizer.prompt_ids(msgs)
    want = tp1.generate([ids], gen)[0]
    del tp1
    with tp_pipeline(None, EngineConfig(tp=3, **small)) as pipe:
        got = pipe([ids], gen)[0]
    assert got.token_ids == want.token_ids
    assert "Paris" in got.text


def test_ray_path_entry_points(tiny_models, engine_cache):
    """What the Ray worker does, with plain processes: rank 1 runs run_follower, rank 0 builds its executor with
    from_initialized on the same init_method; close() on rank 0 ends run_follower cleanly. Rank 1 is given room
    for fewer KV blocks: both ranks must settle on the smaller cache."""
    import torch.multiprocessing as mp

    path, hf_model = tiny_models("llama")
    ec = _ec(engine_cache, 2, num_blocks=64)
    model_dir = ensure_converted(str(path), 2, "float32", engine_cache, progress=False)
    init_method = f"tcp://127.0.0.1:{tp_groups.free_port()}"
    ctx = mp.get_context("spawn")
    with tpmod._main_not_reimported():
        follower = ctx.Process(target=tpmod.run_follower,
                               args=(str(model_dir), ec.model_copy(update={"num_blocks": 40}), 256, 1, 2, init_method),
                               daemon=True)
        follower.start()
    from cluster.engine.tokenizer import Tokenizer
    from cluster.models.config import ModelConfig

    runner = tpmod.TPExecutor.from_initialized(model_dir, ModelConfig.load(model_dir / "config.json"), ec, 256,
                                               init_method=init_method)
    try:
        assert runner.num_blocks == 40 and runner.runner.kv_cache.shape[2] == 40
        engine = LLMEngine(runner=runner, tokenizer=Tokenizer(model_dir))
        ids = engine.tokenizer.encode(PROMPTS[1])
        got = engine.generate([ids], GREEDY)[0].token_ids
    finally:
        runner.close()
        follower.join(timeout=20)
    assert follower.exitcode == 0
    assert got == hf_greedy(hf_model, ids, GREEDY.max_new_tokens)


def test_killed_rank_fails_requests_fast(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    long = GenerationConfig(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    with tp_pipeline(str(path), _ec(engine_cache, 2)) as pipe:
        (pid,) = pipe.engine.engine.runner.follower_pids
        outcome: dict = {}

        def consume():
            try:
                for i, _ in enumerate(pipe.stream_infer(PROMPTS[0], long)):
                    if i == 2:
                        outcome["killed_at"] = time.monotonic()
                        os.kill(pid, signal.SIGKILL)
                outcome["result"] = "finished"
            except Exception as e:  # noqa: BLE001
                outcome["result"] = e
                outcome["failed_at"] = time.monotonic()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "generation hung after rank 1 was killed"
        err = outcome["result"]
        assert isinstance(err, EngineDeadError), err
        assert "rank 1" in str(err) and "SIGKILL" in str(err), str(err)
        assert outcome["failed_at"] - outcome["killed_at"] < 10
        with pytest.raises(EngineDeadError):  # and later requests are refused at once
            pipe("hello", long)
