"""Where a decode step's time goes on the GPU: engine.step() with overlapped steps on and off, the host-side phases of
a serial step (schedule, prepare, execute, sample) timed with synchronisation, then a torch profiler table of
overlapped steps. For finding the gap between measured decode speed and the floor.

    python benchmarks/profile_decode.py [--shape llama3-8b] [--batch 1 64] [--no-pdl]

--no-pdl: no PDL check, and the steps run (and are profiled) with PDL off, so each kernel's time in the table is its
own: with PDL on a kernel starts before its predecessor ends and its time includes that wait.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

from bench_engine import engine_from_hf, rand_prompts, random_hf_model, steady_step_ms


def check_pdl(eng, prompts: list[list[int]]) -> None:
    """Greedy tokens with programmatic dependent launch off, then on (graphs recaptured each time): a kernel that
    read its predecessor's output before waiting for it would change them. Then the step time of each, at batch 1."""
    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    runner, tokens = eng.runner, {}
    eng.bm.enable_prefix_caching = False  # a cache hit changes what is prefilled, so the bf16 roundings, so tokens
    for flag in ("0", "1"):
        os.environ["CLUSTER_PDL"] = flag
        runner.capture()
        tokens[flag] = [r.token_ids for r in eng.generate(prompts, gen)]  # batch 4, then 3.. 1 as they finish
        tokens[flag] += [r.token_ids for r in eng.generate(prompts[:1], gen)]  # batch 1: the GEMV path
        ms = steady_step_ms(eng, prompts[:1])
        print(f"PDL {'on ' if flag == '1' else 'off'}: batch 1 engine.step() {ms:.2f} ms ({1e3 / ms:.0f} tok/s)",
              flush=True)
    eng.bm.enable_prefix_caching = True
    same = tokens["0"] == tokens["1"]
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(tokens["0"], tokens["1"])]
    print(f"PDL on == off, greedy tokens of 5 requests x 48: {same} (first difference per request: {firsts})",
          flush=True)
    assert same, "programmatic dependent launch changed the tokens"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-pdl", action="store_true", help="profile with PDL off (each kernel's own time)")
    args = ap.parse_args()
    from cluster.config import GenerationConfig

    hf = random_hf_model(args.shape, torch.bfloat16, 8192)
    eng = engine_from_hf(hf, "bfloat16", session_len=4096, max_batch_size=256, max_prefill_token_num=8192,
                         cache_max_entry_count=0.5)
    vocab = hf.config.vocab_size
    del hf
    torch.cuda.empty_cache()
    rng = random.Random(0)
    runner = eng.runner
    if args.no_pdl:
        os.environ["CLUSTER_PDL"] = "0"
        runner.capture()
    else:
        check_pdl(eng, rand_prompts(4, 200, vocab, rng))
    for bsz in args.batch:
        prompts = rand_prompts(bsz, 512, vocab, rng)
        for overlap in (True, False):
            eng.overlap = overlap
            ms = steady_step_ms(eng, prompts)
            print(f"batch {bsz}: engine.step() {ms:.2f} ms ({bsz / ms * 1e3:.0f} tok/s), overlap "
                  f"{'on' if overlap else 'off'}", flush=True)
        gen = GenerationConfig(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        rids = [eng.add_request(p, gen) for p in prompts]
        while any(s.num_uncomputed > 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        n = 30
        phases = {"schedule": 0.0, "prepare": 0.0, "execute": 0.0, "sample+post": 0.0}  # overlap off: serial
        t_all = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            plan = eng.scheduler.schedule()
            t1 = time.perf_counter()
            step = runner.prepare(plan, eng.bm)
            t2 = time.perf_counter()
            logits = runner.execute(step)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            from cluster.engine.sampler import sample

            sampled = [s for s, k in plan]
            eng.scheduler.after_step(plan)
            res = sample(logits, sampled)
            for s, tok, lp in zip(sampled, res.tokens, res.logprobs):
                eng._append_token(s, tok, lp)
            t4 = time.perf_counter()
            for k, a, b in (("schedule", t0, t1), ("prepare", t1, t2), ("execute", t2, t3), ("sample+post", t3, t4)):
                phases[k] += (b - a) * 1e3 / n
        total = (time.perf_counter() - t_all) * 1e3 / n
        graph = bsz <= runner.max_graph_batch
        print(f"batch {bsz}: {total:.2f} ms/step ({bsz / total * 1e3:.0f} tok/s), graph={graph}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
        eng.overlap = True
        for _ in range(3):
            eng.step()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / 5
        print(f"batch {bsz}: kernels' own time {gpu_us / 1e3:.2f} ms per step", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
        for r in rids:
            eng.abort(r)


if __name__ == "__main__":
    main()
