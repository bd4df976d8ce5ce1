"""How much faster can a batch-1 decode step get than cuBLAS makes it? Measures, on the GPU, the read-only and
copy bandwidth, then the weight matmuls of one Llama-3-8B decode step at one row (32 layers of fused qkv, o, fused
gate/up, down, and the LM head; distinct weights, so nothing stays in L2) as a CUDA graph, through cuBLAS
(`F.linear`) and through the engine's Triton GEMV (cluster/kernels/gemv.py), checked against float32 first.

    python benchmarks/gemv_headroom.py [--json out.json] [--shape gemma2-9b] [--sweep]
    TRITON_INTERPRET=1 python benchmarks/gemv_headroom.py --check-only   # the kernel's correctness, on the CPU
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from gpu_kernels import poisoned, rel_err  # first: it imports cluster.kernels without pydantic

from cluster.kernels.gemv import chosen_configs, gemv

MODEL_SHAPES = {  # name: ({matmul: (N, K)}, layers, vocab, hidden)
    "llama3-8b": ({"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
                  32, 128256, 4096),
    "gemma2-9b": ({"qkv": (8192, 3584), "o": (3584, 4096), "gate_up": (28672, 3584), "down": (3584, 14336)},
                  42, 256000, 3584),
}


def sweep(shapes: dict[str, tuple[int, int]], layers: int) -> list[dict]:
    """Each matmul shape alone, `layers` distinct weights in one graph, under the autotuner's pick and under every
    config: how far the pick is from the best config, per shape (PDL off: each kernel's own time)."""
    import triton

    from cluster.kernels.gemv import CONFIGS, _gemv_kernel

    os.environ["CLUSTER_PDL"] = "0"
    rows = []
    for name, (n, k) in shapes.items():
        copies = min(layers, max(2, -(-1_500_000_000 // (n * k * 2))))  # together far beyond L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x, y = torch.randn(1, k, device="cuda", dtype=torch.bfloat16), torch.empty(1, n, device="cuda",
                                                                                  dtype=torch.bfloat16)
        nbytes = n * k * 2 * copies
        picked = graph_ms(lambda: [gemv(x, w) for w in ws])
        best = (float("inf"), None)
        for c in CONFIGS:
            def run(c=c):
                for w in ws:
                    _gemv_kernel.fn[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
                        x, w, y, y, n, k, False, False, 0, False, **c.kwargs, num_warps=c.num_warps,
                        num_stages=c.num_stages)
            ms = graph_ms(run)
            best = min(best, (ms, str(c)), key=lambda t: t[0])
        rows.append({"matmul": name, "N": n, "K": k, "picked TB/s": nbytes / picked / 1e9,
                     "best TB/s": nbytes / best[0] / 1e9, "best config": best[1]})
        print(f"{name:<8} N={n:<6} K={k:<6} picked {rows[-1]['picked TB/s']:.2f} TB/s, best "
              f"{rows[-1]['best TB/s']:.2f} TB/s ({best[1]})", flush=True)
        del ws
    os.environ["CLUSTER_PDL"] = "1"
    return rows

def check(device: str, sizes: list[tuple[int, int]]) -> float:
    """Largest relative error against a float32 reference, on fresh random inputs and a poisoned output
    (an element never written stays NaN, and rel_err reports NaN)."""
    worst = 0.0
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for n, k in sizes:
        w = torch.randn(n, k, device=device, dtype=dtype)
        x = torch.randn(1, k, device=device, dtype=dtype)
        with poisoned():
            y = gemv(x, w)
        err = rel_err(y, x.float() @ w.float().T)
        worst = err if err != err else max(worst, err)
    return worst


def graph_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bandwidths(nbytes: int = 4 << 30) -> tuple[float, float]:
    """(read-only, copy) bytes per second over 4 GiB: a sum reads each byte once; a copy reads and writes it."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    read_ms = graph_ms(lambda: src.view(torch.int64).sum())
    copy_ms = graph_ms(lambda: dst.copy_(src))
    return nbytes / read_ms / 1e9, 2 * nbytes / copy_ms / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also each shape under every config")
    args = ap.parse_args()
    shapes, layers, vocab, hidden = MODEL_SHAPES[args.shape]
    if args.check_only:
        print("relative error:", check("cpu", [(40, 300), (33, 1024)]))
        return
    torch.manual_seed(0)
    err = check("cuda", [(4096, 4096), (6144, 4096), (4096, 14336), (128256, 4096)])
    assert err < 1e-2, err  # NaN fails too
    read_bw, copy_bw = bandwidths()
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes.values()]
               for _ in range(layers)]
    head = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes.values()}
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer) + head.numel() * 2

    def step(mm):
        for layer in weights:
            for w in layer:
                mm(xs[w.shape[1]], w)
        mm(xs[hidden], head)

    for w in (*weights[0], head):  # autotune outside the graph
        gemv(xs[w.shape[1]], w)
    cublas_ms = graph_ms(lambda: step(lambda x, w: F.linear(x, w)))
    os.environ["CLUSTER_PDL"] = "0"
    triton_plain_ms = graph_ms(lambda: step(gemv))
    os.environ["CLUSTER_PDL"] = "1"  # each GEMV starts loading its weights while the one before finishes
    triton_ms = graph_ms(lambda: step(gemv))
    rows = {"read TB/s": read_bw, "copy TB/s (read+write)": copy_bw, "weight GB": nbytes / 1e9,
            "cuBLAS step ms": cublas_ms, "cuBLAS TB/s": nbytes / cublas_ms / 1e9,
            "Triton GEMV step ms, no PDL": triton_plain_ms, "Triton GEMV TB/s, no PDL": nbytes / triton_plain_ms / 1e9,
            "Triton GEMV step ms": triton_ms, "Triton GEMV TB/s": nbytes / triton_ms / 1e9,
            "floor at read bandwidth, ms": nbytes / read_bw / 1e9, "Triton rel error": err}
    for k, v in rows.items():
        print(f"{k:<32} {v:8.3f}")
    print("autotuned configs:", chosen_configs())
    del weights, head
    per_shape = sweep({**shapes, "lm_head": (vocab, hidden)}, layers) if args.sweep else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, **rows, "configs": chosen_configs(), "per_shape": per_shape}, f, indent=2)


if __name__ == "__main__":
    main()
