"""What the worker path costs at tp=1 on one device: decode-1 and decode-64 through the plain ModelRunner, through
TPExecutor (process group, per-step plan broadcast, liveness checks) and, with --ray, through a Ray worker actor
(cluster.workers.group: placement group, RankWorker, requests in and tokens out by batched add_requests/poll calls,
as the Serve deployment drives it). All on the same converted shard, with a word-level tokenizer written beside it
so every path detokenizes the same way.

    python benchmarks/bench_tp_overhead.py [--shape llama3-8b] [--dir /tmp/tp1] [--ray]
    python benchmarks/bench_tp_overhead.py --shape tiny --device cpu --ray --new-tokens 32   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
import uuid
from pathlib import Path

import torch

from bench_engine import rand_prompts, random_hf_model
from random_checkpoint import save_word_tokenizer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_cases(generate, vocab: int, device: str, new_tokens: int, seed: int = 7) -> dict:
    """generate(prompts, GenerationConfig) runs every prompt to the end; returns output tok/s per case. A run on an
    engine that already ran the cases needs another seed: the same prompts again would hit its prefix cache."""
    from cluster.config import GenerationConfig

    rng = random.Random(seed)
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    generate(rand_prompts(1, 128, vocab, rng), GenerationConfig(max_new_tokens=16, temperature=0.0))
    generate(rand_prompts(64, 512, vocab, rng), GenerationConfig(max_new_tokens=16, temperature=0.0))
    out = {}
    for name, n, plen in (("decode-1", 1, 128), ("decode-64", 64, 512)):
        prompts = rand_prompts(n, plen, vocab, rng)
        sync(device)
        t = time.perf_counter()
        generate(prompts, gen)
        sync(device)
        out[name] = n * new_tokens / (time.perf_counter() - t)
        print(name, round(out[name], 1), flush=True)
    return out


def ray_generate_fn(rank0):
    """Drive rank 0's actor as the Serve deployment does: one batched add_requests, then long polls."""
    import ray

    def generate(prompts, gen) -> None:
        items = [{"rid": uuid.uuid4().hex, "prompt": p, "gen": gen.model_dump()} for p in prompts]
        for r in ray.get(rank0.add_requests.remote(items)):
            if not r["ok"]:
                raise RuntimeError(r["error"])
        left = {it["rid"] for it in items}
        while left:
            reply = ray.get(rank0.poll.remote(1.0))
            if reply["errors"] or reply["dead"]:
                raise RuntimeError(f"{reply['errors']} {reply['dead']}")
            left -= {rid for rid, o in reply["outputs"].items() if o["finish_reason"] is not None}

    return generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dir", default="/tmp/tp1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--ray", action="store_true", help="also through a Ray worker actor (needs ray)")
    ap.add_argument("--ray-variants", action="store_true",
                    help="with --ray: the actor again with a 0.2 ms GIL switch interval, then with 100 ms poll replies")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from safetensors.torch import save_file

    from cluster.config import EngineConfig
    from cluster.convert.hf import build_shards, engine_config
    from cluster.engine.engine import LLMEngine
    from cluster.engine.model_runner import load_shard
    from cluster.engine.tokenizer import Tokenizer
    from cluster.executor import single_rank
    from cluster.executor.tp import TPExecutor

    dev = torch.device(args.device)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.manual_seed(0)
    hf = random_hf_model(args.shape, getattr(torch, dtype), 8192, args.device)
    hf_cfg = hf.config.to_dict()
    vocab = hf.config.vocab_size
    cfg = engine_config(hf_cfg, dtype, 1, "random")
    shard = build_shards(hf.state_dict().__getitem__, hf_cfg, cfg, 1)[0]
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    save_file({k: v.contiguous() for k, v in shard.items()}, str(out / "rank0.safetensors"))
    cfg.save(out / "config.json")
    save_word_tokenizer(out, vocab)
    print(f"wrote the shard in {time.perf_counter() - t:.0f} s", flush=True)
    del hf, shard
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()

    ec = EngineConfig(session_len=4096, max_batch_size=256, max_prefill_token_num=8192, cache_max_entry_count=0.5,
                      device=args.device, dtype=dtype)
    results = {}

    def run(name, engine_or_fn, seed: int = 7):
        gen = engine_or_fn.generate if hasattr(engine_or_fn, "generate") else engine_or_fn
        results[name] = decode_cases(gen, vocab, args.device, args.new_tokens, seed)

    def plain(name: str) -> None:
        runner = single_rank(cfg, load_shard(out, 0, dev), ec, dev, 4096)
        run(name, LLMEngine(runner=runner, tokenizer=Tokenizer(out), engine_config=ec))
        del runner
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    plain("plain")

    tp_ec = ec.model_copy(update={"tp": 1})
    tpx = TPExecutor(out, cfg, tp_ec, 4096)
    run("TPExecutor", LLMEngine(runner=tpx, tokenizer=Tokenizer(out), engine_config=tp_ec))
    tpx.close()
    del tpx
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()

    if args.ray:
        import ray

        from cluster.workers.group import GroupSpec, WorkerGroup

        ray.init(num_cpus=4, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                 object_store_memory=1 << 30)
        spec = GroupSpec(str(out), tp_ec.model_dump(), use_gpu=args.device == "cuda", cpus_per_worker=2)
        t = time.perf_counter()
        group = asyncio.run(WorkerGroup.create(spec))
        print(f"Ray worker group up in {time.perf_counter() - t:.0f} s", flush=True)
        run("Ray actor", ray_generate_fn(group.rank0))
        if args.ray_variants:  # what the actor's cost is made of: GIL hand-offs, or poll replies
            rank0 = group.rank0
            ray.get(rank0.__ray_call__.remote(lambda w: __import__("sys").setswitchinterval(0.0002)))
            run("Ray, GIL 0.2ms", ray_generate_fn(rank0), seed=8)
            ray.get(rank0.__ray_call__.remote(lambda w: __import__("sys").setswitchinterval(0.005)))
            ray.get(rank0.__ray_call__.remote(
                lambda w: setattr(__import__("cluster.workers.worker").workers.worker, "REPLY_INTERVAL_S", 0.1)))
            run("Ray, poll 100ms", ray_generate_fn(rank0), seed=9)
        group.kill()
        ray.shutdown()
        time.sleep(2)  # the actor's process lets go of its GPU memory
    plain("plain, again")  # the same as the first column unless the machine drifted during the run

    names = list(results)
    print(f"\n{'tok/s':<10}" + "".join(f"{n:>16}" for n in names))
    for case in results["plain"]:
        print(f"{case:<10}" + "".join(f"{results[n][case]:16.1f}" for n in names))
    print(f"{'cost':<10}" + "".join(f"{n:>16}" for n in names[1:]))
    for case in results["plain"]:
        base = results["plain"][case]
        print(f"{case:<10}" + "".join(f"{1 - results[n][case] / base:16.1%}" for n in names[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": args.device, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
