"""Warm start (issue 12): what a start leaves so that requests compile nothing, checked without a GPU.

The GPU side (no compilation after ready, first request as fast as later ones, a second start that compiles
nothing) is measured by benchmarks/cold_start.py."""
from __future__ import annotations

import logging

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.model_runner import default_batch_size
from cluster.engine.startup import Phases
from cluster.kernels import jit_cache


@pytest.fixture(scope="module")
def engine(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", enable_prefix_caching=False))


@pytest.mark.parametrize("lens", [[1], [7], [3, 1, 1], [5, 1, 2, 9, 1], [17] * 3])
def test_step_tensors_start_16_byte_aligned(engine, lens):
    """Triton specializes on a pointer's alignment: a view at an odd offset of the step's flat buffers would be a
    new kernel variant, compiled inside the first request with an odd token count."""
    from cluster.engine.sequence import Sequence

    gen = GenerationConfig(max_new_tokens=4)
    plan, bs, next_block = [], engine.bm.block_size, 0
    for i, n in enumerate(lens):
        seq = Sequence(f"r{i}", list(range(1, n + 1)), gen)
        seq.block_table = list(range(next_block, next_block + -(-n // bs)))  # prepare reads the table alone
        next_block += len(seq.block_table)
        plan.append((seq, n))
    step = engine.runner.prepare(plan, engine.bm)
    for name in ("input_ids", "positions", "slot_mapping", "logit_indices", "block_tables", "context_lens",
                 "cu_seqlens_q"):
        assert getattr(step, name).data_ptr() % 16 == 0, (name, lens)
    assert step.input_ids.tolist() == [t for s, _ in plan for t in s.token_ids]
    assert step.positions.tolist() == [p for _, n in plan for p in range(n)]
    assert step.slot_mapping.tolist() == [s.block_table[p // bs] * bs + p % bs for s, n in plan for p in range(n)]
    assert step.cu_seqlens_q.tolist()[-1] == sum(lens) and step.context_lens.tolist() == lens
    assert step.logit_indices.tolist() == [sum(lens[:i + 1]) - 1 for i in range(len(lens))]


def test_engine_reports_its_start_phases(engine, caplog):
    for phase in ("convert", "load", "profile", "cache", "tokenizer"):
        assert phase in engine.phases.seconds, engine.phases.seconds
    assert engine.phases.summary().startswith("start-up ")
    assert engine.max_batch_size == 128  # the CPU's default


def test_warm_up_requests_leave_a_fresh_engine(tiny_models, engine_cache):
    """(Run on a GPU at every start.) What the warm-up requests used is given back: every block free, nothing in
    the prefix cache, counters at zero; and requests after it get the tokens they would have got without it."""
    path, _ = tiny_models("llama")
    e = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", block_size=4))
    prompt, gen = list(range(3, 40)), GenerationConfig(max_new_tokens=6, temperature=0.0)
    before = e.generate([prompt], gen)[0].token_ids
    e.warm_up_requests()
    assert e.bm.num_free == e.bm.num_blocks and e.stats.steps == 0 and e.stats.finished == 0 and not e.seqs
    assert not e.bm.hash_to_block and e.bm.prefix_queries == 0  # its blocks went with the old manager
    assert e.generate([prompt], gen)[0].token_ids == before


def test_default_batch_size_follows_the_cache():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_batch_size(10, 16, gpu) == 128  # a small cache keeps 128: sequences preempt, none is refused
    assert default_batch_size(256 * 300 // 16, 16, gpu) == 300
    assert default_batch_size(10 ** 6, 16, gpu) == 512  # the CUDA graphs' range
    assert default_batch_size(10 ** 6, 16, cpu) == 128
    assert EngineConfig(max_batch_size=64).max_batch_size == 64


def test_tuner_picks_persist_in_the_model_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(jit_cache._state, "dir", tmp_path)
    assert jit_cache.load_picks("w4a16") == {}
    jit_cache.save_pick("w4a16", "(1, 4096)", {"gemv": True, "BLOCK_N": 8})
    jit_cache.save_pick("w4a16", "(16, 4096)", {"BLOCK_M": 16})
    assert jit_cache.load_picks("w4a16") == {"(1, 4096)": {"gemv": True, "BLOCK_N": 8}, "(16, 4096)": {"BLOCK_M": 16}}
    (tmp_path / "w4a16_picks.json").write_text("{broken")
    assert jit_cache.load_picks("w4a16") == {}  # a damaged file is re-tuned, not a failed start


def test_kernel_cache_is_left_alone_on_the_cpu(tmp_path):
    assert jit_cache.use_beside(tmp_path, torch.device("cpu")) is None
    assert not (tmp_path / "jit").exists()


def test_phases_add_up():
    p = Phases()
    assert p.run("a", lambda x: x + 1, 1) == 2
    p.run("a", lambda: None)
    q = Phases()
    q.run("b", lambda: None)
    p.merge(q)
    assert list(p.seconds) == ["a", "b"] and p.total >= 0
    with pytest.raises(ZeroDivisionError):
        p.run("c", lambda: 1 / 0)
    assert "c" in p.seconds  # a failed phase still shows what it spent
