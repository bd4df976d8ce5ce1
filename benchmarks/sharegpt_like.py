"""GPU benchmark (issue 12, part 4): offline throughput on a synthetic ShareGPT-like workload.

No dataset travels to the GPU machine, so prompt and output lengths are drawn from log-normal distributions with
ShareGPT's published means: 161 prompt tokens and 338 output tokens a request on average (Kwon et al., "Efficient
Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023, section 6.1 / figure 11:
ShareGPT's prompts are 8.4x and its outputs 5.8x Alpaca's 19.3 and 58.5). The spread (sigma 1.0 for prompts,
0.8 for outputs) is our choice, for a long tail like the figure's. Requests are then filtered as vLLM's
benchmark_serving filters ShareGPT (prompt and output at least 4 tokens, prompt at most 1024, prompt + output at
most 2048). The script prints the realized means beside the targets.

All requests are submitted at once (as vLLM's and SGLang's offline throughput benchmarks do), greedy, ignoring
EOS so each produces its drawn output length; the engine is warmed first on other prompts. Reports output tok/s,
total tok/s, and each request's time to first token and time per output token (p50 / p99). Then part 3's stall
check: 64 running decodes while a 3800-token prompt is prefilled beside them.

    python benchmarks/sharegpt_like.py [--dir /tmp/llama3-8b] [--requests 1000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT_MEAN, OUTPUT_MEAN = 161.0, 338.0
PROMPT_SIGMA, OUTPUT_SIGMA = 1.0, 0.8


def lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma ** 2 / 2, sigma)))


def workload(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (prompt length, output length) pairs, drawn and filtered as the module doc says."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p, o = lognormal(rng, PROMPT_MEAN, PROMPT_SIGMA), lognormal(rng, OUTPUT_MEAN, OUTPUT_SIGMA)
        if p >= 4 and o >= 4 and p <= 1024 and p + o <= 2048:
            out.append((p, o))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(eng, pairs: list[tuple[int, int]], vocab: int, seed: int) -> dict:
    import torch

    from cluster.config import GenerationConfig

    rng = random.Random(seed)
    t0 = time.perf_counter()
    start, first, end, lens = {}, {}, {}, {}
    for p, o in pairs:
        rid = eng.add_request([rng.randrange(2, vocab) for _ in range(p)],
                              GenerationConfig(max_new_tokens=o, temperature=0.0, ignore_eos=True))
        start[rid], lens[rid] = time.perf_counter(), o
    while len(end) < len(pairs):
        for out in eng.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finish_reason:
                end[out.request_id] = now
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = [(first[r] - start[r]) * 1e3 for r in start]
    tpot = [(end[r] - first[r]) * 1e3 / (lens[r] - 1) for r in start if lens[r] > 1]
    out_tokens = sum(o for _, o in pairs)
    return {"requests": len(pairs), "wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + sum(p for p, _ in pairs)) / wall,
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "tpot_ms_p50": pct(tpot, 0.5), "tpot_ms_p99": pct(tpot, 0.99),
            "preemptions": eng.scheduler.num_preemptions}


def decodes_during_prefill(eng, vocab: int, streams: int = 64, long_prompt: int = 3800) -> dict:
    """Part 3's stall check: the gaps between output tokens of `streams` running decodes before, and while, one long
    prompt is prefilled in chunks beside them (ms; the gap is what their users see as time per output token)."""
    from cluster.config import GenerationConfig

    rng = random.Random(3)
    gen = GenerationConfig(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    rids = {eng.add_request([rng.randrange(2, vocab) for _ in range(256)], gen) for _ in range(streams)}
    last: dict[str, float] = {}
    gaps: dict[str, list[float]] = {"before": [], "during": []}
    phase, steps, long_rid = "warm", 0, None
    while True:
        outs = eng.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            if o.request_id in rids and o.token_ids:
                if o.request_id in last and phase != "warm":
                    gaps[phase].append((now - last[o.request_id]) * 1e3)
                last[o.request_id] = now
            if o.request_id == long_rid and o.token_ids:
                phase = "after"
        if phase == "warm" and steps >= 40:
            phase = "before"
        elif phase == "before" and steps >= 80:
            long_rid = eng.add_request([rng.randrange(2, vocab) for _ in range(long_prompt)],
                                       GenerationConfig(max_new_tokens=1, temperature=0.0, ignore_eos=True))
            phase = "during"
        if phase == "after":
            break
    for rid in rids:
        eng.abort(rid)
    eng.step()
    return {f"gap_ms_{k}_{q}": (pct(v, f) if v else float("nan")) for k, v in gaps.items()
            for q, f in (("p50", 0.5), ("max", 1.0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dir", default="/tmp/llama3-8b")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-batch-size", type=int, default=None, help="default: the engine's (from the KV cache)")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.9)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from random_checkpoint import write_converted

    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine

    write_converted(args.shape, Path(args.dir))
    pairs = workload(args.requests)
    means = (statistics.mean(p for p, _ in pairs), statistics.mean(o for _, o in pairs))
    print(f"workload: {len(pairs)} requests, prompt mean {means[0]:.1f} (target {PROMPT_MEAN:.0f}), "
          f"output mean {means[1]:.1f} (target {OUTPUT_MEAN:.0f})", flush=True)
    eng = LLMEngine(args.dir, EngineConfig(session_len=4096, cache_max_entry_count=args.cache_max_entry_count,
                                           max_batch_size=args.max_batch_size))
    print(eng.phases.summary(), "max_batch_size", eng.max_batch_size, flush=True)
    run(eng, workload(min(64, args.requests), seed=1), eng.model_config.vocab_size, seed=1)  # warm-up
    res = run(eng, pairs, eng.model_config.vocab_size, seed=2)
    res.update(prompt_mean=means[0], output_mean=means[1], max_batch_size=eng.max_batch_size)
    res.update(decodes_during_prefill(eng, eng.model_config.vocab_size))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sharegpt_like.json").write_text(json.dumps(res, indent=1))
    print("\n| requests | max batch | output tok/s | total tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | preempted |")
    print("|---:|---:|---:|---:|---|---|---:|")
    print(f"| {res['requests']} | {res['max_batch_size']} | {res['output_tok_s']:.0f} | {res['total_tok_s']:.0f} | "
          f"{res['ttft_ms_p50']:.0f} / {res['ttft_ms_p99']:.0f} | {res['tpot_ms_p50']:.1f} / {res['tpot_ms_p99']:.1f} | "
          f"{res['preemptions']} |")
    print(f"\n64 decodes, one 3800-token prompt arriving: token gap p50 / max {res['gap_ms_before_p50']:.1f} / "
          f"{res['gap_ms_before_max']:.1f} ms before, {res['gap_ms_during_p50']:.1f} / {res['gap_ms_during_max']:.1f} ms "
          "while it is prefilled")


if __name__ == "__main__":
    main()
