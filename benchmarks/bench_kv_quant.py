#!/usr/bin/env python3
"""End to end, the quantized KV caches beside bf16 (issue 18): the engine on random Llama-3-8B-shape bf16 weights,
one process, one shard shared by an engine per quant_policy (0, 8, fp8, 4), each with the same
cache_max_entry_count, built in turn and freed before the next.

For each policy: the cache's blocks and tokens; greedy agreement of a few prompts with the bf16 cache's tokens
(random weights: a near-tie can flip on rounding, so the common prefix is reported too); decode-1 at a 4k context;
the steady decode step at batch 64 and context 2048, with its floor (weight bytes + the KV bytes the step reads,
over --tbps); and the long-context mix: N requests with prompts of 2k-8k tokens and 256 new tokens each, output
tokens a second. A smaller cache_max_entry_count than serving's (0.3 by default) makes the cache the limit: bf16
then holds about 50 of those sequences at once, int8 and fp8 about twice that.

    python3 benchmarks/bench_kv_quant.py [--shape llama3-8b] [--out DIR]
    python3 benchmarks/bench_kv_quant.py --shape tiny      # a check of this script, on the CPU, in a minute
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from bench_engine import SHAPES, rand_prompts, random_hf_model, steady_step_ms, timed
from bench_w4a16_e2e import agreement, engine_from_shard, free, greedy

POLICIES = (0, 8, "fp8", 4)


def sizes(quick: bool) -> dict:
    if quick:
        return dict(ctx1=64, new1=8, n64=4, ctx64=64, steady=5, mix_n=6, mix_lo=32, mix_hi=96, mix_new=8,
                    check_n=3, check_new=8, session=256)
    return dict(ctx1=4096, new1=128, n64=64, ctx64=2048, steady=50, mix_n=128, mix_lo=2048, mix_hi=8192,
                mix_new=256, check_n=8, check_new=32, session=8192 + 512)


def measure(eng, sz: dict, vocab: int, seed: int, bw: float, weight_bytes: int) -> dict:
    from cluster.config import GenerationConfig

    rng = random.Random(seed)  # the same prompts for every policy
    runner = eng.runner
    kv_tok = runner.block_bytes / runner.block_size
    r: dict = {"kv_blocks": runner.num_blocks, "kv_tokens": runner.num_blocks * runner.block_size,
               "kv_bytes_per_token": kv_tok}

    def run(prompts, new):
        gens = new if isinstance(new, list) else GenerationConfig(max_new_tokens=new, temperature=0.0,
                                                                  ignore_eos=True)
        return timed(lambda: eng.generate(prompts, gens))[0]

    t0 = time.perf_counter()
    run(rand_prompts(1, sz["ctx1"], vocab, rng), 8)  # warm-up: every step shape the cases meet
    run(rand_prompts(sz["n64"], sz["ctx64"], vocab, rng), 8)
    r["warmup_s"] = time.perf_counter() - t0
    t = run(rand_prompts(1, sz["ctx1"], vocab, rng), sz["new1"])
    fl1 = (weight_bytes + (sz["ctx1"] + sz["new1"] / 2) * kv_tok) / bw
    r["decode-1"] = {"tok_s": sz["new1"] / t, "floor_tok_s": 1 / fl1}
    ms = steady_step_ms(eng, rand_prompts(sz["n64"], sz["ctx64"], vocab, rng), sz["steady"])
    fl = (weight_bytes + sz["n64"] * (sz["ctx64"] + 5 + sz["steady"] / 2) * kv_tok) / bw * 1e3
    r["step-64"] = {"ms": ms, "floor_ms": fl, "of_floor": fl / ms}
    prompts = rand_prompts(sz["mix_n"], (sz["mix_lo"], sz["mix_hi"]), vocab, rng)
    gen = GenerationConfig(max_new_tokens=sz["mix_new"], temperature=0.0, ignore_eos=True)
    peak = {"running": 0}

    def step_watch():  # how many sequences ran at once: what the cache let in
        out = real_step()
        peak["running"] = max(peak["running"], len(eng.scheduler.running))
        return out

    real_step = eng.step
    eng.step = step_watch
    try:
        t = timed(lambda: eng.generate(prompts, gen))[0]
    finally:
        eng.step = real_step
    r["mix"] = {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "seconds": t,
                "out_tok_s": len(prompts) * sz["mix_new"] / t, "peak_running": peak["running"],
                "preemptions": eng.scheduler.num_preemptions}
    print(f"  blocks {r['kv_blocks']} ({r['kv_tokens']} tokens); decode-1 at {sz['ctx1']}: "
          f"{r['decode-1']['tok_s']:.1f} tok/s; step-64 at {sz['ctx64']}: {ms:.2f} ms (floor {fl:.2f}); mix: "
          f"{r['mix']['out_tok_s']:.0f} tok/s in {t:.1f} s, {peak['running']} at once, "
          f"{r['mix']['preemptions']} preemptions", flush=True)
    return r


def tune_prefill() -> dict:
    """gpu_kernels.sweep_prefill_quant on a packed prefill and a mixed batch per quantized cache; the tiles with the
    least total time go into attention.PREFILL_CONFIG_BY_QUANT for the engines below."""
    import gpu_kernels as gk

    from cluster.kernels import attention, kvcache

    chosen = {}
    for bits in gk.KV_POLICIES:
        start = len(gk.SWEEPS)
        gk.sweep_prefill_quant("16x2048 packed", [2048] * 16, [2048] * 16, bits)
        gk.sweep_prefill_quant("2048 prefill + 63 decodes", [2048] + [1] * 63, [2048] * 64, bits)
        total: dict[str, list] = {}
        for row in gk.SWEEPS[start:]:
            key = json.dumps(row["cfg"], sort_keys=True)
            total.setdefault(key, [0.0, 0])
            total[key][0] += row["ms"] if row["ms"] == row["ms"] else float("inf")
            total[key][1] += 1
        best = min(total, key=lambda k: total[k][0])
        q = {8: 8, 4: 4, "fp8": kvcache.FP8.value}[bits]
        attention.PREFILL_CONFIG_BY_QUANT[q] = json.loads(best)
        chosen[str(bits)] = {"cfg": json.loads(best), "ms_both_cases": total[best][0]}
        print(f"prefill tiles for {bits}: {best} ({total[best][0] * 1e3:.0f} us over both cases)", flush=True)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tbps", type=float, default=4.1, help="read bandwidth of the floors, TB/s")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.3)
    ap.add_argument("--policies", default=",".join(map(str, POLICIES)))
    ap.add_argument("--tune-prefill", action="store_true",
                    help="first sweep paged_attention's tiles per quantized cache (gpu_kernels.py) and use the best")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if not cuda:
        torch.cuda.synchronize = lambda *a, **k: None
    quick = args.shape == "tiny"
    sz = sizes(quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_kv_quant.json"
    from cluster.convert.hf import build_shards, engine_config

    res: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "torch": torch.__version__, "sizes": sz, "cache_max_entry_count": args.cache_max_entry_count,
                 "tbps_floor": args.tbps, "policies": {}}
    if args.tune_prefill and cuda:
        res["prefill_configs"] = tune_prefill()
    torch.manual_seed(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    hf_model = random_hf_model(args.shape, dtype, sz["session"], device=args.device)
    hf = hf_model.config.to_dict()
    state = hf_model.state_dict()

    def get(name: str) -> torch.Tensor:
        return state[name]

    get.names = set(state)
    cfg = engine_config(hf, str(dtype).split(".")[-1], 1, "random")
    shard = {k: (v if k == "rotary.inv_freq" else v.contiguous()).to(args.device)
             for k, v in build_shards(get, hf, cfg, 1)[0].items()}
    weight_bytes = sum(v.numel() * v.element_size() for k, v in shard.items() if "embed_tokens" not in k)
    del hf_model, state
    free()
    vocab = SHAPES[args.shape]["vocab_size"]
    check = rand_prompts(sz["check_n"], 48, vocab, random.Random(7))
    base_tokens = None
    for policy in [p if not p.isdigit() else int(p) for p in args.policies.split(",")]:
        print(f"quant_policy {policy}", flush=True)
        eng = engine_from_shard(cfg, shard, args.device, quant_policy=policy, session_len=sz["session"],
                                max_batch_size=256, max_prefill_token_num=8192,
                                cache_max_entry_count=args.cache_max_entry_count)
        tokens = greedy(eng, check, sz["check_new"])
        base_tokens = base_tokens or tokens
        r = measure(eng, sz, vocab, 3, args.tbps * 1e12, weight_bytes)
        r["agreement_with_bf16_cache"] = agreement(base_tokens, tokens)
        res["policies"][str(policy)] = r
        path.write_text(json.dumps(res, indent=2, default=str))
        eng.runner.close()
        del eng
        free()
    base = res["policies"].get("0")
    print(f"\n{'cache':<6} {'tokens':>9} {'x':>5} {'decode-1':>9} {'x':>5} {'step-64 ms':>10} {'x':>5} "
          f"{'floor':>6} {'mix tok/s':>9} {'x':>5} {'at once':>7} {'agree':>6}")
    for name, r in res["policies"].items():
        rel = (lambda k, sub, inv=False: (base[k][sub] / r[k][sub] if inv else r[k][sub] / base[k][sub])
               if base else float("nan"))
        ag = r["agreement_with_bf16_cache"]
        print(f"{name:<6} {r['kv_tokens']:>9} {r['kv_tokens'] / base['kv_tokens'] if base else 0:5.2f} "
              f"{r['decode-1']['tok_s']:9.1f} {rel('decode-1', 'tok_s'):5.2f} {r['step-64']['ms']:10.2f} "
              f"{rel('step-64', 'ms', True):5.2f} {r['step-64']['of_floor']:6.2f} {r['mix']['out_tok_s']:9.0f} "
              f"{rel('mix', 'out_tok_s'):5.2f} {r['mix']['peak_running']:7d} {ag['identical']}/{ag['of']}")
    print("targets: mix >= 1.2x bf16 with int8 or fp8; x = speed over bf16 (step: bf16 ms / this ms)")


if __name__ == "__main__":
    main()
