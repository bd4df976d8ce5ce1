"""GPU benchmark (issue 12, part 1): what a user waits for after start-up, on a converted real-shape checkpoint.

Starts the engine from its folder twice, each time in a fresh process: first with the model's kernel cache
(cluster/kernels/jit_cache.py, `<model>/jit/`) removed, then again with it kept. Each start reports the seconds
to ready and the engine's own phases; then the first request's time to first token against warm ones, and the
first batch of 128, 256 and 512 requests against the same batch size again (new prompts, so no prefix-cache hits),
and every kernel variant compiled after ready (each one a request paid for). Prints a table last; JSON to --out.

    python benchmarks/cold_start.py [--shape llama3-8b] [--dir /tmp/llama3-8b] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model_dir: str, batches: list[int], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    import torch

    from cluster.config import EngineConfig, GenerationConfig
    from cluster.engine.engine import LLMEngine
    from cluster.kernels import jit_cache

    imported = time.perf_counter() - t0
    t = time.perf_counter()
    eng = LLMEngine(model_dir, EngineConfig(session_len=4096, cache_max_entry_count=0.9))
    ready = time.perf_counter() - t
    vocab = eng.model_config.vocab_size
    rng = random.Random(1)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    def ttft_ms(n: int) -> float:
        gen = GenerationConfig(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        rid = eng.add_request(prompt(n), gen)
        first = None
        while True:
            outs = eng.step()
            if first is None and any(o.request_id == rid and o.token_ids for o in outs):
                first = (time.perf_counter() - t) * 1e3
            if any(o.request_id == rid and o.finish_reason for o in outs):
                return first

    compiled: dict[str, int] = {}

    def note(phase: str) -> None:
        compiled[phase] = len(jit_cache.compiled_after_ready())

    first_ttft = ttft_ms(200)
    note("first request")
    warm_ttft = [ttft_ms(200) for _ in range(5)]
    other_ttft = {n: ttft_ms(n) for n in (37, 517, 1500)}  # other lengths: odd, longer, longest (one chunk)
    note("other lengths")
    batch = {}
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for n in batches:
        for rep in ("first", "again"):
            prompts = [prompt(rng.randint(64, 1024)) for _ in range(n)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.generate(prompts, gen)
            torch.cuda.synchronize()
            batch[f"{n} {rep}"] = n * new_tokens / (time.perf_counter() - t)
            note(f"batch {n} {rep}")
    return {"import_s": imported, "ready_s": ready, "phases": eng.phases.seconds, "max_batch_size": eng.max_batch_size,
            "kv_tokens": eng.bm.num_blocks * eng.bm.block_size,
            "first_ttft_ms": first_ttft, "warm_ttft_ms": statistics.median(warm_ttft), "other_ttft_ms": other_ttft,
            "batch_tok_s": batch, "compiles_after_ready": compiled, "compiled": jit_cache.compiled_after_ready()[:40]}


def run_child(args, label: str) -> dict:
    t = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", args.dir, "--batches", *map(str, args.batches),
           "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{label} start failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][7:])
    out["process_wall_s"] = wall
    print(label, json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dir", default="/tmp/llama3-8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.INFO)
        print("RESULT " + json.dumps(child(args.child, args.batches, args.new_tokens)), flush=True)
        return
    sys.path.insert(0, str(HERE))
    from random_checkpoint import write_converted

    write_converted(args.shape, Path(args.dir))
    shutil.rmtree(Path(args.dir) / "jit", ignore_errors=True)
    runs = {"cold": run_child(args, "cold"), "warm": run_child(args, "warm")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cold_start.json").write_text(json.dumps(runs, indent=1))
    print(f"\n| start | ready s | phases | first TTFT ms | warm TTFT ms | ratio | batch first / again | compiled after ready |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for label, r in runs.items():
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        b = r["batch_tok_s"]
        ratios = ", ".join(f"{n}: {b[f'{n} first']:.0f}/{b[f'{n} again']:.0f}" for n in args.batches)
        last = list(r["compiles_after_ready"].values())[-1]
        print(f"| {label} | {r['ready_s']:.1f} | {phases} | {r['first_ttft_ms']:.0f} | {r['warm_ttft_ms']:.0f} | "
              f"{r['first_ttft_ms'] / r['warm_ttft_ms']:.2f} | {ratios} | {last} |")
    print("max_batch_size", runs["warm"]["max_batch_size"], "kv tokens", runs["warm"]["kv_tokens"])


if __name__ == "__main__":
    main()
