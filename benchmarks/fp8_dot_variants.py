"""FP8 weights at 2-64 rows (decode batches), issue 19: the widening dot kernel's variants (WIDEN 0: conversion
instructions to bf16, 1: bit moves to bf16) against torch._scaled_mm (x quantized per token) and bf16
(kernels.linear), at the Llama-3-8B layer shapes, from CUDA graphs (fp8_parts._graph_ms). Each result is checked
against the dequantized weights in fp32 (W8A16) first.

    python3 benchmarks/fp8_dot_variants.py [--rows 2 8 16]
"""
from __future__ import annotations

import argparse

import torch

import fp8_parts
from cluster import kernels as k
from cluster.kernels import fp8 as k8
from cluster.quant import fp8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16])
    ap.add_argument("--tbps", type=float, default=4.1)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'layer':<28} {'M':>3} {'bf16':>7} {'W0':>7} {'W1':>7} {'smm':>7}  best/bf16  fp8 floor  err(W0,W1)")
    for label, n, kk, gated in fp8_parts.KERNEL_SHAPES["llama3-8b"]:
        w = torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s = fp8.quantize_weight(w)
        deq = fp8.dequantize(q, s, torch.float32)
        wb = fp8.dequantize(q, s, torch.bfloat16)
        floor_ms = n * kk / (args.tbps * 1e12) * 1e3
        for m in args.rows:
            x = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ deq.t()
            if gated:
                want = k.silu_and_mul(want.to(torch.bfloat16)).float()
            t = {"bf16": fp8_parts._graph_ms(lambda: k.linear(x, wb, None, gated))}
            errs = []
            for v in (0, 1):
                got = k8.gemv(x, q, s, None, gated, widen=v).float()
                errs.append(((got - want).norm() / want.norm()).item())
                t[f"W{v}"] = fp8_parts._graph_ms(lambda: k8.gemv(x, q, s, None, gated, widen=v))
            t["smm"] = fp8_parts._graph_ms(lambda: k8.scaled_mm(x, q, s, None, gated))
            best = min(t[c] for c in ("W0", "W1", "smm"))
            print(f"{label:<28} {m:3d} " + " ".join(f"{t[c] * 1e3:7.1f}" for c in ("bf16", "W0", "W1", "smm"))
                  + f"  {t['bf16'] / best:8.2f}x  {floor_ms / best:8.0%}  " + ",".join(f"{e:.1e}" for e in errs),
                  flush=True)
        del w, q, s, deq, wb
    print("times in us; tuned:", {str(kk): str(c) for kk, c in k8._gemv_dot_kernel.cache.items()})


if __name__ == "__main__":
    main()
