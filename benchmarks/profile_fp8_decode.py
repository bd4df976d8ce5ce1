"""Where the FP8 decode step's time goes, beside bf16 (issue 19: FP8 decode-1 is 1.31x bf16 end to end while its
GEMVs alone run 1.6x): random Llama-3-8B-shape weights, the bf16 engine and the FP8 engine on the same weights in
one process, steady batch-1 (and batch-8) decode steps, then a profiler table of each one's kernels per step (time
and launches), so the kernels that are not the weights' bytes show up; with programmatic dependent launch on and
off (on, a kernel's profiled time starts at its early launch, waits included).

    python3 benchmarks/profile_fp8_decode.py [--shape llama3-8b] [--batch 1 8] [--steps 50] [--engines bf16 fp8]
"""
from __future__ import annotations

import argparse
import gc
import os
import random
from collections import defaultdict

import torch

import fp8_parts
from bench_engine import decoding, rand_prompts, steady_step_ms
from bench_w4a16_e2e import engine_from_shard, random_shard


def kernel_table(eng, prompts: list[list[int]], steps: int = 10, top: int = 14) -> list[tuple[str, float, float]]:
    """(kernel, us per step, launches per step) of steady decode steps, most time first."""
    from torch.profiler import ProfilerActivity, profile

    with decoding(eng, prompts, steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
    us, n = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            name = ev.name[:60]
            us[name] += ev.device_time / steps if hasattr(ev, "device_time") else ev.cuda_time / steps
            n[name] += 1
    rows = sorted(((k, us[k], n[k] / steps) for k in us), key=lambda r: -r[1])
    total = sum(us.values())
    print(f"    GPU busy {total:.0f} us/step over {len(us)} kernels", flush=True)
    for k, t, c in rows[:top]:
        print(f"    {t:8.1f} us  x{c:5.1f}  {k}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--engines", nargs="+", default=["bf16", "fp8"])
    args = ap.parse_args()
    from cluster.convert.hf import engine_config
    from cluster.quant.fp8_export import quantization_config

    torch.manual_seed(1)
    hf, _, cfg, shard = random_shard(args.shape, torch.bfloat16, "cuda")
    f8 = fp8_parts.fp8_shard(shard)
    kw = dict(session_len=4096, max_batch_size=64, max_prefill_token_num=8192, cache_max_entry_count=0.3)
    vocab = hf["vocab_size"]
    rng = random.Random(0)
    summary = []
    for name, c, sh in (("bf16", cfg, shard),
                        ("fp8", engine_config(dict(hf, quantization_config=quantization_config()), "bfloat16", 1,
                                              "random"), f8)):
        eng = engine_from_shard(c, sh, "cuda", **kw)
        if name not in args.engines:
            continue
        # PDL off too: with it on, a kernel's profiled time starts at its early launch (waits included)
        for v, pdl in (("-", "1"), ("-", "0")):
            os.environ["CLUSTER_PDL"] = pdl
            eng.runner.capture()
            for b in (args.batch if pdl == "1" else args.batch[:1]):
                prompts = rand_prompts(b, 256, vocab, rng)
                ms = steady_step_ms(eng, prompts, args.steps)
                label = 'PDL' if pdl == '1' else 'noPDL'
                print(f"{name} gemv={label} batch {b}: {ms:.3f} ms/step ({b / ms * 1e3:.0f} tok/s)", flush=True)
                summary.append((name, label, b, ms))
                kernel_table(eng, prompts)
        os.environ["CLUSTER_PDL"] = "1"
        if name == "fp8":
            from cluster.kernels import fp8 as kfp8

            print("tuned:", kfp8.chosen_configs(), flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    print("\nengine  gemv         batch  ms/step  tok/s  vs bf16 (PDL on)")
    base = {b: ms for n, v, b, ms in summary if n == "bf16" and v == "-"}
    for n, v, b, ms in summary:
        vs = f"{base[b] / ms:7.2f}x" if b in base else ""
        print(f"{n:<7} {v:<12} {b:5d} {ms:8.3f} {b / ms * 1e3:6.0f} {vs}")


if __name__ == "__main__":
    main()
