"""Why CPU weights are packed for oneDNN: the matmuls of one decode step of SmolLM2-135M (30 layers of fused qkv,
o, fused gate/up and down, plus the LM head) at several batch sizes, through torch's default `F.linear` and
through the engine's packed path (`cluster.layers.linear.matmul`), in fp32 or bf16 (`--dtype bfloat16`: oneDNN's
AVX512-BF16 / AMX kernels where the CPU has them); both paths give the same result up to rounding.

    python benchmarks/bench_cpu_matmul.py [--dtype float32|bfloat16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cluster.layers.linear import cpu_pack, matmul

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 576, 1536, 9, 3, 64, 49152, 30
SHAPES = {  # name: (out, in, times per step)
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, LAYERS),
    "o": (HEADS * HEAD_DIM, HIDDEN, LAYERS),
    "gate_up": (2 * FFN, HIDDEN, LAYERS),
    "down": (HIDDEN, FFN, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}


def ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,128")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for m in tqdm(rows, desc="batch sizes"):
        plain = packed = 0.0
        for out_f, in_f, times in SHAPES.values():
            w, x = torch.randn(out_f, in_f, dtype=dt), torch.randn(m, in_f, dtype=dt)
            p = cpu_pack(w)
            if p is None:
                raise SystemExit("this torch has no oneDNN packed linear; nothing to compare")
            tol = dict(rtol=1e-4, atol=1e-3) if dt == torch.float32 else dict(rtol=2e-2, atol=0.5)
            torch.testing.assert_close(matmul(x, w, None, p).float(), F.linear(x, w).float(), **tol)
            reps = 10 if out_f == VOCAB else 30
            plain += times * ms(lambda: F.linear(x, w), reps)
            packed += times * ms(lambda: matmul(x, w, None, p), reps)
        results.append({"rows": m, "f_linear_ms": plain, "packed_ms": packed, "speedup": plain / packed})
    print(f"\n{'rows':>5} {'F.linear ms':>12} {'packed ms':>10} {'speedup':>8}   (matmuls of one SmolLM2 step, {args.dtype}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()})")
    for r in results:
        print(f"{r['rows']:>5} {r['f_linear_ms']:12.1f} {r['packed_ms']:10.1f} {r['speedup']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
