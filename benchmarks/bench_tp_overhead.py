"""What the tensor-parallel executor costs at tp=1 on one GPU: decode-1 and decode-64 through TPExecutor (process
group, per-step plan broadcast, liveness checks) against the plain ModelRunner, on the same converted shard.

    python benchmarks/bench_tp_overhead.py [--shape llama3-8b] [--dir /tmp/tp1]
"""
from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch

from bench_engine import rand_prompts, random_hf_model


def decode_cases(engine, vocab: int) -> dict:
    from cluster.config import GenerationConfig

    rng = random.Random(7)
    gen = GenerationConfig(max_new_tokens=256, temperature=0.0, ignore_eos=True)
    engine.generate(rand_prompts(1, 128, vocab, rng), GenerationConfig(max_new_tokens=16, temperature=0.0))
    engine.generate(rand_prompts(64, 512, vocab, rng), GenerationConfig(max_new_tokens=16, temperature=0.0))
    out = {}
    for name, n, plen in (("decode-1", 1, 128), ("decode-64", 64, 512)):
        prompts = rand_prompts(n, plen, vocab, rng)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(prompts, gen)
        torch.cuda.synchronize()
        out[name] = n * 256 / (time.perf_counter() - t)
        print(name, round(out[name], 1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dir", default="/tmp/tp1")
    args = ap.parse_args()
    from safetensors.torch import save_file

    from cluster.config import EngineConfig
    from cluster.convert.hf import build_shards, engine_config
    from cluster.engine.engine import LLMEngine
    from cluster.engine.model_runner import ModelRunner, load_shard
    from cluster.workers.tp import TPExecutor

    torch.manual_seed(0)
    hf = random_hf_model(args.shape, torch.bfloat16, 8192)
    hf_cfg = hf.config.to_dict()
    vocab = hf.config.vocab_size
    cfg = engine_config(hf_cfg, "bfloat16", 1, "random")
    shard = build_shards(hf.state_dict().__getitem__, hf_cfg, cfg, 1)[0]
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    save_file({k: v.contiguous() for k, v in shard.items()}, str(out / "rank0.safetensors"))
    cfg.save(out / "config.json")
    print(f"wrote the shard in {time.perf_counter() - t:.0f} s", flush=True)
    del hf, shard
    gc.collect()
    torch.cuda.empty_cache()

    ec = EngineConfig(session_len=4096, max_batch_size=256, max_prefill_token_num=8192, cache_max_entry_count=0.5)
    runner = ModelRunner(cfg, load_shard(out, 0, torch.device("cuda")), ec, torch.device("cuda"), 4096)
    plain = decode_cases(LLMEngine(runner=runner, tokenizer=None, engine_config=ec), vocab)
    del runner
    gc.collect()
    torch.cuda.empty_cache()

    tp_ec = ec.model_copy(update={"tp": 1})
    tpx = TPExecutor(out, cfg, tp_ec, 4096)
    via_tp = decode_cases(LLMEngine(runner=tpx, tokenizer=None, engine_config=tp_ec), vocab)
    tpx.close()
    print(f"\n{'case':<10} {'plain':>8} {'TPExecutor':>11} {'cost':>7}")
    for k in plain:
        print(f"{k:<10} {plain[k]:8.1f} {via_tp[k]:11.1f} {1 - via_tp[k] / plain[k]:7.1%}")


if __name__ == "__main__":
    main()
