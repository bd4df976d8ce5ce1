"""A/B of launch-time switches on one engine: the batch-1 (and batch-64) steady decode step under each setting of
CLUSTER_L2_PREFETCH (weights pulled into L2 during latency-bound kernels) and CLUSTER_ATTN_PREWAIT (decode attention
loading its first K/V tile before waiting on the kernel before it) and CLUSTER_ATTN_FUSED_MERGE (the last split
merges the partials: no reduce kernel), graphs recaptured for each, rounds interleaved.
Each setting's greedy tokens are checked against PDL off (plain stream order): a kernel that read another's output
before it was written would change them.

    python3 benchmarks/decode_variants.py [--shape gemma2-9b llama3-8b] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics

import torch

from bench_engine import engine_from_hf, rand_prompts, random_hf_model, steady_step_ms, weight_bytes_read

ATTN = {"CLUSTER_ATTN_PREWAIT": "1", "CLUSTER_ATTN_FUSED_MERGE": "1"}
VARIANTS = {  # name: the switches (CLUSTER_L2_PREFETCH, CLUSTER_ATTN_PREWAIT, CLUSTER_ATTN_FUSED_MERGE)
    "base": {"CLUSTER_L2_PREFETCH": "0", "CLUSTER_ATTN_PREWAIT": "0", "CLUSTER_ATTN_FUSED_MERGE": "0"},
    "prewait": {"CLUSTER_L2_PREFETCH": "0", "CLUSTER_ATTN_PREWAIT": "1", "CLUSTER_ATTN_FUSED_MERGE": "0"},
    "merge": {"CLUSTER_L2_PREFETCH": "0", "CLUSTER_ATTN_PREWAIT": "0", "CLUSTER_ATTN_FUSED_MERGE": "1"},
    "o32": {"CLUSTER_L2_PREFETCH": "o=32", "CLUSTER_ATTN_PREWAIT": "0", "CLUSTER_ATTN_FUSED_MERGE": "0"},
    "attn": {"CLUSTER_L2_PREFETCH": "0", **ATTN},
    "attn+o32": {"CLUSTER_L2_PREFETCH": "o=32", **ATTN},
    "attn+o32,gu8,qkv8": {"CLUSTER_L2_PREFETCH": "o=32,gate_up=8,qkv=8", **ATTN},
    "attn+o32,gu16,qkv16": {"CLUSTER_L2_PREFETCH": "o=32,gate_up=16,qkv=16", **ATTN},
    "attn+o16,gu8,qkv8": {"CLUSTER_L2_PREFETCH": "o=16,gate_up=8,qkv=8", **ATTN},
}
B64 = ("base", "attn", "attn+o32,gu8,qkv8")


def tokens(eng, prompts, gen) -> list[list[int]]:
    out = [r.token_ids for r in eng.generate(prompts, gen)]
    return out + [r.token_ids for r in eng.generate(prompts[:1], gen)]  # batch 1: the GEMV path


def run_shape(shape: str, rounds: int) -> list[str]:
    from cluster.config import GenerationConfig
    from gemv_headroom import bandwidths

    hf = random_hf_model(shape, torch.bfloat16, 8192)
    vocab, wbytes = hf.config.vocab_size, weight_bytes_read(hf)
    eng = engine_from_hf(hf, "bfloat16", session_len=4096, max_batch_size=64, max_prefill_token_num=8192,
                         cache_max_entry_count=0.5)
    del hf
    torch.cuda.empty_cache()
    read_bw = bandwidths()[0] * 1e12
    eng.bm.enable_prefix_caching = False  # a cache hit changes what is prefilled, so the roundings, so tokens
    rng = random.Random(0)
    check = rand_prompts(4, 200, vocab, rng)
    one, many = rand_prompts(1, 512, vocab, rng), rand_prompts(64, 512, vocab, rng)
    gen = GenerationConfig(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    want = {}
    for fused in ("0", "1"):  # the merge's summation order is the kernels' own: a reference for each
        os.environ.update({"CLUSTER_PDL": "0", "CLUSTER_ATTN_FUSED_MERGE": fused})
        eng.runner.capture()
        want[fused] = tokens(eng, check, gen)
    os.environ["CLUSTER_PDL"] = "1"
    b1: dict[str, list[float]] = {k: [] for k in VARIANTS}
    b64: dict[str, list[float]] = {k: [] for k in VARIANTS}
    same: dict[str, bool] = {}
    for r in range(rounds):
        for name, env in VARIANTS.items():
            os.environ.update(env)
            eng.runner.capture()
            if r == 0:
                same[name] = tokens(eng, check, gen) == want[env["CLUSTER_ATTN_FUSED_MERGE"]]
            b1[name].append(steady_step_ms(eng, one))
            if name in B64:
                b64[name].append(steady_step_ms(eng, many, steps=30))
            print(f"{shape} round {r} {name:<24} b1 {b1[name][-1]:.3f} ms  tokens == PDL off: {same[name]}",
                  flush=True)
    floor = wbytes / read_bw * 1e3
    lines = [f"{shape}: weights {wbytes / 1e9:.2f} GB, read probe {read_bw / 1e12:.2f} TB/s, b1 weight floor "
             f"{floor:.3f} ms"]
    for name in VARIANTS:
        m = statistics.median(b1[name])
        s64 = f"{statistics.median(b64[name]):7.3f}" if b64[name] else "      -"
        lines.append(f"  {name:<24} b1 {m:.3f} ms ({', '.join(f'{x:.3f}' for x in b1[name])})  of floor "
                     f"{floor / m:.3f}  b64 {s64} ms  tokens ok {same[name]}")
    del eng
    torch.cuda.empty_cache()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="+", default=["gemma2-9b", "llama3-8b"])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    table = []
    for shape in args.shape:
        table += run_shape(shape, args.rounds)
    print("\n".join(table))


if __name__ == "__main__":
    main()
