#!/usr/bin/env python3
"""W4A16 on the GPU: check `cluster.kernels.w4a16` against the fp32 reference, sweep its launch configs, and time
the tuned path against bf16 (the Triton GEMV at M = 1, cuBLAS above) on Llama-3-8B's shapes.

Run on the GPU machine from the repository root:  python3 benchmarks/gpu_w4a16.py [--budget SECONDS]
Only `cluster.kernels` and `cluster.quant.int4` are imported (no pydantic, Ray, transformers). Every check draws
fresh random inputs, poisons the outputs with NaN and compares ||out - ref|| / ||ref|| with the reference in fp32.
Every timing replays a CUDA graph holding one call per distinct weight copy (together more than L2 holds), as a
decode step's graph does: a Python launch takes longer than a decode-sized kernel, so plain do_bench timings of one
call measure the host (run 1 of docs/benchmarks.md's W4A16 section). Rates count the bytes a call must read: 4-bit weights plus bf16 zeros and scales (bf16: the weight). Writes $OUT/w4a16.json when OUT is set.
"""
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "cluster" not in sys.modules:  # import cluster.kernels without cluster/__init__.py (it pulls in pydantic)
    _pkg = types.ModuleType("cluster")
    _pkg.__path__ = [str(ROOT / "cluster")]
    sys.modules["cluster"] = _pkg

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from cluster.kernels import gemv, reference, w4a16  # noqa: E402
from cluster.quant import int4  # noqa: E402

DEV = torch.device("cuda")
PEAK_BW = 4.0e12
SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 2 * 14336, 4096, True),
          ("down", 4096, 14336, False)]
MS = [1, 8, 16, 64, 256]
SWEEP_MS = [int(m) for m in os.environ.get("SWEEP_MS", "1,64,16,8,256").split(",")]
T0 = time.time()
OUT: dict = dict(checks=[], sweep=[], table=[], errors=[])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def weight(rows: int, K: int, dtype=torch.bfloat16, group: int = 128):
    q, zeros, scales = int4.quantize(torch.randn(rows, K, device=DEV) * 0.02, group)
    return int4.pack(q), zeros.to(dtype), scales.to(dtype)


def w4_bytes(qw, z, s) -> int:
    return qw.numel() * qw.element_size() + z.numel() * z.element_size() + s.numel() * s.element_size()


def want_of(x, qw, z, s, b, gated):
    y = reference.linear_w4(x.float(), qw, z.float(), s.float(), None if b is None else b.float())
    return reference.silu_and_mul(y.to(x.dtype)).float() if gated else y


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=30, return_mode="median")


def graph_ms(calls) -> float:
    """Median replay time of one CUDA graph holding every call, per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") / len(calls)


def guarded(fn):
    def run(*a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            OUT["errors"].append(f"{fn.__name__}{a}: {e!r}"[:400])
    return run


# -- correctness ------------------------------------------------------------------------------------------------------
@guarded
def check(name: str, M: int, rows: int, K: int, gated: bool, dtype=torch.bfloat16, bias=False, cfg=None, fast=None,
          group: int = 128) -> float:
    qw, z, s = weight(rows, K, dtype, group)
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    b = torch.randn(rows, dtype=dtype, device=DEV) * 0.1 if bias else None
    real_empty = torch.empty
    torch.empty = lambda *a, **k: (lambda t: poison(t) if t.is_floating_point() else t)(real_empty(*a, **k))
    try:
        if cfg is None:
            got = w4a16.linear_w4(x, qw, z, s, b, gated)
        else:
            got = w4a16.launch(x, qw.view(torch.int32), z, s, b, gated, cfg, fast=fast)
    finally:
        torch.empty = real_empty
    err = rel_err(got, want_of(x, qw, z, s, b, gated))
    tol = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 2e-3}[dtype]
    ok = err == err and err < tol
    OUT["checks"].append(dict(name=name, M=M, rows=rows, K=K, gated=gated, dtype=str(dtype), bias=bias,
                              cfg=str(cfg), fast=fast, err=err, ok=ok))
    print(f"  check {name:<10} M={M:<4} [{rows},{K}] {str(dtype)[6:]:<8} bias={bias:d} fast={fast} {cfg} "
          f"err={err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return err


def correctness() -> None:
    print("correctness", flush=True)
    for name, rows, K, gated in SHAPES:
        for M in (1, 3, 64, 256):
            check(name, M, rows, K, gated)
    small = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    for fast in (True, False):
        for split in (1, 3):
            check("o", 1, 4096, 4096, False, bias=True, cfg=dict(small, split=split), fast=fast)
            check("gate_up", 2, 2 * 1000, 4096, True, bias=True, cfg=dict(small, split=split), fast=fast)
    for gated in (False, True):
        check("gemv", 1, 2 * 1000 if gated else 1000, 4096, gated, bias=True, cfg=w4a16.gemv_config(4096, 128, 4, 4))
        check("gemv pref", 1, 2 * 500 if gated else 1000, 14336, gated, bias=True, cfg=w4a16.gemv_config(14336, 128, 4, 1))
    check("odd gated", 1, 2 * 300, 1024, True, dtype=torch.float16, bias=True)
    check("fp32", 3, 256, 512, False, dtype=torch.float32, bias=True)
    check("dequant", 256, 2 * 1024, 4096, True, bias=True, cfg=dict(dequant=True))


# -- sweep ------------------------------------------------------------------------------------------------------------
def sweep_configs(M: int, N: int, K: int) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    if M == 1:
        out += [w4a16.gemv_config(K, 128, bn, w) for bn, w in w4a16.GEMV_TILES]
        if K // 128 > 32:  # the one-step configs walk down_proj's K in 4 steps: with and without the early loads
            out += [dict(w4a16.gemv_config(K, 128, bn, w), prefetch=p) for bn, w in ((8, 4), (4, 4)) for p in (True, False)]
        if os.environ.get("SWEEP_GEMV_ONLY"):
            return out
    for bm in [min(64, max(16, triton.next_power_of_2(M)))]:
        tiles = w4a16.TILES_SMALL if bm <= 32 else w4a16.TILES_LARGE
        for bn, warps, stages in tiles:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=warps, num_stages=stages)
            auto = w4a16.auto_split(M, N, K, cfg, sms)
            for split in sorted({auto, max(1, auto // 2), min(8, auto * 2)}):
                out.append(dict(cfg, split=split))
    if M >= 64:
        out.append(dict(dequant=True))
    return out


def sweep(budget: float) -> dict:
    """Time every config per (shape, M); returns the best per key."""
    print("\nsweep", flush=True)
    best: dict = {}
    weights = {name: weight(rows, K) for name, rows, K, _ in SHAPES}
    order = [(M, shape) for M in SWEEP_MS for shape in sorted(SHAPES, key=lambda t: t[0] != "gate_up")]
    for M, (name, rows, K, gated) in order:
        qw, z, s = weights[name]
        qw32 = qw.view(torch.int32)
        N = rows // 2 if gated else rows
        nbytes = w4_bytes(qw, z, s)
        x = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
        for cfg in sweep_configs(M, N, K):
            if time.time() - T0 > budget:
                print("   sweep budget spent", flush=True)
                return best
            try:
                ms = w4a16.time_config(x, qw32, z, s, None, gated, cfg)
            except Exception as e:  # noqa: BLE001
                print(f"   {name} M={M} {cfg}: {e!r}"[:200], flush=True)
                continue
            OUT["sweep"].append(dict(shape=name, M=M, cfg=cfg, ms=ms, gbps=nbytes / ms / 1e6))
            print(f"   {name:<8} M={M:<4} {cfg} {ms * 1e3:8.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
            if (name, M) not in best or ms < best[(name, M)][1]:
                best[(name, M)] = (cfg, ms)
        tc = [r for r in OUT["sweep"] if r["shape"] == name and r["M"] == M and "BLOCK_M" in r["cfg"]]
        if M == 1 and tc:  # the plain-Triton dequantization, for the size of the inline-PTX gain
            cfg = min(tc, key=lambda r: r["ms"])["cfg"]
            ms = w4a16.time_config(x, qw32, z, s, None, gated, cfg, fast=False)
            OUT["sweep"].append(dict(shape=name, M=M, cfg=cfg, fast=False, ms=ms, gbps=nbytes / ms / 1e6))
            print(f"   {name:<8} M={M:<4} plain dequant {cfg} {ms * 1e3:8.1f} us", flush=True)
    return best


# -- final table ------------------------------------------------------------------------------------------------------
def bf16_gemv(x, w, gated):
    """The engine's bf16 GEMV with the config its autotuner picked on the H100 (2 rows, 1024 columns)."""
    n = w.shape[0] // 2 if gated else w.shape[0]
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    gemv._gemv_kernel.fn[(triton.cdiv(n, 2),)](x, w, y, y, n, w.shape[1], False, gated, BLOCK_N=2, BLOCK_K=1024,
                                              num_warps=4, num_stages=4, **gemv.pdl.launch_args(x))
    return y


@guarded
def table_row(name: str, rows: int, K: int, gated: bool, M: int, best: dict) -> None:
    copies_w4 = max(2, min(16, int(-(-400e6 // (rows * K / 2)))))
    ws = [weight(rows, K) for _ in range(copies_w4)]
    x = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
    N = rows // 2 if gated else rows
    # tuned path (what the engine runs): correct on fresh inputs, then timed in a graph
    err = rel_err(w4a16.linear_w4(x, *ws[0], None, gated), want_of(x, *ws[0], None, gated))
    cfg = w4a16.tune(x, ws[0][0].view(torch.int32), ws[0][1], ws[0][2], None, gated)
    ms = graph_ms([lambda w=w: w4a16.linear_w4(x, *w, None, gated) for w in ws])
    nbytes = w4_bytes(*ws[0])
    del ws
    wb = [torch.randn(rows, K, dtype=torch.bfloat16, device=DEV) * 0.02 for _ in range(2)]
    if M == 1:
        base = graph_ms([lambda w=w: bf16_gemv(x, w, gated) for w in wb])
    else:
        def dense(w):
            y = torch.nn.functional.linear(x, w)
            return reference.silu_and_mul(y) if gated else y
        base = graph_ms([lambda w=w: dense(w) for w in wb])
    del wb
    sweep_best = best.get((name, M))
    row = dict(shape=name, rows=rows, K=K, gated=gated, M=M, ms=ms, gbps=nbytes / ms / 1e6,
               frac=nbytes / (ms * 1e-3) / PEAK_BW, bf16_ms=base, bf16_gbps=rows * K * 2 / base / 1e6,
               speedup=base / ms, err=err, cfg=str(cfg),
               sweep_best=None if sweep_best is None else dict(cfg=sweep_best[0], ms=sweep_best[1]))
    OUT["table"].append(row)
    print(f"  {name:<8} M={M:<4} w4 {ms * 1e3:7.1f} us {row['gbps']:6.0f} GB/s {row['frac']:6.1%}  bf16 {base * 1e3:7.1f} "
          f"us  x{row['speedup']:.2f}  err={err:.1e}  {cfg}", flush=True)


def ceilings() -> None:
    x = torch.randn(2 ** 30, dtype=torch.bfloat16, device=DEV)  # 2 GiB
    y = torch.empty_like(x)
    read = bench(lambda: x.sum())
    copy = bench(lambda: y.copy_(x))
    OUT["read_tbps"] = x.numel() * 2 / read / 1e9
    OUT["copy_tbps"] = 2 * x.numel() * 2 / copy / 1e9
    print(f"read (sum) {OUT['read_tbps']:.2f} TB/s, copy {OUT['copy_tbps']:.2f} TB/s (read + write)", flush=True)
    del x, y


def main() -> None:
    budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 330.0
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} SMs={props.multi_processor_count} torch {torch.__version__} triton {triton.__version__}",
          flush=True)
    torch.manual_seed(int(time.time()))
    ceilings()
    correctness()
    best = sweep(budget)
    print("\ntable (CUDA-graph replay per call; bytes = 4-bit weights + zeros + scales)", flush=True)
    for name, rows, K, gated in SHAPES:
        for M in MS:
            table_row(name, rows, K, gated, M, best)
    OUT["tuned"] = w4a16.chosen_configs()
    print(f"\n{'shape':<8} {'M':>4} {'w4 us':>8} {'GB/s':>6} {'of 4TB/s':>8} {'bf16 us':>8} {'x bf16':>7} {'err':>8}")
    for r in OUT["table"]:
        print(f"{r['shape']:<8} {r['M']:>4} {r['ms'] * 1e3:8.1f} {r['gbps']:6.0f} {r['frac']:8.1%} "
              f"{r['bf16_ms'] * 1e3:8.1f} {r['speedup']:7.2f} {r['err']:8.1e}")
    fails = [c for c in OUT["checks"] if not c["ok"]]
    print(f"checks: {len(OUT['checks']) - len(fails)}/{len(OUT['checks'])} ok; errors: {len(OUT['errors'])}; "
          f"read {OUT['read_tbps']:.2f} TB/s  ({time.time() - T0:.0f} s)")
    for e in OUT["errors"]:
        print("  ERROR", e[:300])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "w4a16.json").write_text(json.dumps(dict(
            device=props.name, torch=torch.__version__, triton=triton.__version__, **OUT), indent=1, default=str))


if __name__ == "__main__":
    main()
