"""How much faster can a batch-1 decode step get than cuBLAS makes it? Measures, on the GPU, the read-only and
copy bandwidth, then the weight matmuls of one Llama-3-8B decode step at one row (32 layers of fused qkv, o, fused
gate/up, down, and the LM head; distinct weights, so nothing stays in L2) as a CUDA graph, through cuBLAS
(`F.linear`) and through a plain Triton GEMV, each checked against a float32 reference first.

    python benchmarks/gemv_headroom.py [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/gemv_headroom.py --check-only   # the kernel's correctness, on the CPU
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS, VOCAB = 32, 128256

CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for bn in (2, 4, 8, 16) for bk in (512, 1024) for w in (4, 8) for s in (2, 4)
           if bn * bk <= 8192]


@triton.autotune(configs=CONFIGS, key=["N", "K"])
@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[N] = W[N, K] @ x[K]: each program owns BLOCK_N rows and streams them along K (contiguous loads)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rn < N)


def gemv(x: torch.Tensor, w: torch.Tensor, fixed: dict | None = None) -> torch.Tensor:
    """`fixed` block sizes skip the autotuner (the interpreter has no device to time on)."""
    n, k = w.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    if fixed:
        _gemv.fn[(triton.cdiv(n, fixed["BLOCK_N"]),)](x, w, y, n, k, **fixed)
    else:
        _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, w, y, n, k)
    return y


def check(device: str, sizes: list[tuple[int, int]]) -> float:
    """Largest relative error against a float32 reference, on fresh random inputs and a poisoned output."""
    worst = 0.0
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for n, k in sizes:
        w = torch.randn(n, k, device=device, dtype=dtype)
        x = torch.randn(k, device=device, dtype=dtype)
        ref = w.float() @ x.float()
        y = gemv(x, w, None if device == "cuda" else {"BLOCK_N": 4, "BLOCK_K": 256}).float()
        assert torch.isfinite(y).all()
        worst = max(worst, ((y - ref).norm() / ref.norm()).item())
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.check_only:
        print("relative error:", check("cpu", [(40, 300), (33, 1024)]))
        return
    torch.manual_seed(0)
    err = check("cuda", [(4096, 4096), (6144, 4096), (4096, 14336), (128256, 4096)])
    assert err < 1e-2, err
    buf = torch.empty(4 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    read_ms = graph_ms(lambda: buf.view(torch.int64).sum())  # not in a graph-unsafe way: one reduction
    dst = torch.empty_like(buf)
    copy_ms = graph_ms(lambda: dst.copy_(buf))
    read_bw, copy_bw = buf.numel() / read_ms / 1e9, 2 * buf.numel() / copy_ms / 1e9
    del buf, dst
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in SHAPES.values()]
               for _ in range(LAYERS)]
    head = torch.randn(VOCAB, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer) + head.numel() * 2

    def step(mm):
        for layer in weights:
            for w in layer:
                mm(xs[w.shape[1]], w)
        mm(xs[4096], head)

    for w in (*weights[0], head):  # autotune outside the graph
        gemv(xs[w.shape[1]][0], w)
    cublas_ms = graph_ms(lambda: step(lambda x, w: F.linear(x, w)))
    triton_ms = graph_ms(lambda: step(lambda x, w: gemv(x[0], w)))
    rows = {"read TB/s": read_bw, "copy TB/s (read+write)": copy_bw, "weight GB": nbytes / 1e9,
            "cuBLAS step ms": cublas_ms, "cuBLAS TB/s": nbytes / cublas_ms / 1e9,
            "Triton GEMV step ms": triton_ms, "Triton GEMV TB/s": nbytes / triton_ms / 1e9,
            "floor at read bandwidth, ms": nbytes / read_bw / 1e9, "Triton rel error": err}
    for k, v in rows.items():
        print(f"{k:<32} {v:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
