"""Where a decode step's time goes on the GPU: host-side phases (schedule, prepare, execute, sample) timed with
synchronisation, then a torch profiler table. For finding the gap between measured decode speed and the floor.

    python benchmarks/profile_decode.py [--shape llama3-8b] [--batch 1 64]
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from bench_engine import engine_from_hf, rand_prompts, random_hf_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
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
    for bsz in args.batch:
        gen = GenerationConfig(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        rids = [eng.add_request(p, gen) for p in rand_prompts(bsz, 512, vocab, rng)]
        while any(s.num_uncomputed > 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(5):
            eng.step()
        phases = {"schedule": 0.0, "prepare": 0.0, "execute": 0.0, "sample+post": 0.0}
        n = 30
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
        graph = bsz <= getattr(runner, "_graph_max_bs", 0) and bool(runner.graphs)
        print(f"batch {bsz}: {total:.2f} ms/step ({bsz / total * 1e3:.0f} tok/s), graph={graph}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        torch.cuda.synchronize()
        print(f"batch {bsz}: engine.step() {(time.perf_counter() - t) * 1e3 / n:.2f} ms", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
        for r in rids:
            eng.abort(r)


if __name__ == "__main__":
    main()
