"""The CPU's prefill attention: cpu_native's one-query-at-a-time C kernel against the reference (a gather, a mask
and SDPA per sequence) at SmolLM2's heads (9 over 3 kv heads of 64), per layer: which shapes go to the C kernel
(cpu_native.PREFILL_MAX_TOKENS and PREFILL_MAX_PAIRS).

    python benchmarks/bench_cpu_prefill_attention.py [bfloat16|float32]
"""
from __future__ import annotations

import sys

import torch

from bench_cpu_matmul import ms as per_call_ms
from cluster.kernels import cpu_native, reference


def main() -> None:
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
    hq, hkv, d, page = 9, 3, 64, 16
    print(f"{'sequences x (new, context)':<30} {'reference ms':>13} {'C ms':>8} {'x':>6}")
    for B, ql, ctx in ((1, 64, 64), (1, 128, 128), (1, 256, 256), (1, 512, 512), (1, 1024, 1024), (32, 128, 128),
                       (4, 128, 640), (16, 48, 48)):
        width = -(-ctx // page)
        nb = B * width + 1
        kc, vc = torch.randn(nb, page, hkv, d, dtype=dtype), torch.randn(nb, page, hkv, d, dtype=dtype)
        tables = torch.randperm(nb)[:B * width].view(B, width).to(torch.int32)
        lens = torch.full((B,), ctx, dtype=torch.int32)
        cu = torch.arange(0, (B + 1) * ql, ql, dtype=torch.int32)
        q = torch.randn(B * ql, hq, d, dtype=dtype)
        reps = max(2, int(2e6 // (B * ql * ctx)))
        ref = per_call_ms(lambda: reference.paged_attention(q, kc, vc, tables, lens, cu, 0.125), reps)
        saved, cpu_native.PREFILL_MAX_PAIRS = cpu_native.PREFILL_MAX_PAIRS, 1 << 40  # the C kernel for every case
        nat = per_call_ms(lambda: cpu_native.paged_attention(q, kc, vc, tables, lens, cu, 0.125), reps)
        cpu_native.PREFILL_MAX_PAIRS = saved
        print(f"{B:>3} x ({ql:>4}, {ctx:>4}){'':<16} {ref:13.2f} {nat:8.2f} {ref / nat:6.2f}", flush=True)


if __name__ == "__main__":
    main()
