"""Where a CPU decode step of the embedded SmolLM2 goes (issue 20): steady engine.step() time at one batch size and
dtype (random 60-token prompts, 40 steps in), then a torch profiler table of 5 steps by self CPU time.

    python benchmarks/profile_cpu_step.py [float32|bfloat16] [BATCH]
"""
from __future__ import annotations

import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    eng = LLMEngine(None, EngineConfig(dtype=dtype, session_len=1024, max_batch_size=max(64, batch)))
    rng = random.Random(0)
    gen = GenerationConfig(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        eng.add_request([rng.randrange(100, 40000) for _ in range(60)], gen)
    for _ in range(40):
        eng.step()
    t = time.perf_counter()
    for _ in range(20):
        eng.step()
    dt = (time.perf_counter() - t) / 20
    print(f"{dtype} batch {batch}: {dt * 1e3:.1f} ms/step, {batch / dt:.0f} tok/s, {torch.get_num_threads()} threads")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eng.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


if __name__ == "__main__":
    main()
