"""The FP8 parts of benchmarks/bench_w4a16_e2e.py (issue 19, part 3): the engine's FP8 shard from a bf16 one,
the kernels' correctness and speed alone at the Llama-3-8B layer shapes, and the converter's own path checked
against the in-memory shard (tiny shape).

Kernel reference: the weight dequantized (q * scale) in fp32. The GEMV (up to 16 rows) keeps activations in bf16
(W8A16), so it is compared with x @ W.T; torch._scaled_mm quantizes them per token (W8A8), so it is compared with
the per-token-rounded x @ W.T, and its distance from the W8A16 product is reported too (what the activations cost).
"""
from __future__ import annotations

import re

import torch

from cluster.quant import fp8

LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
# (label, N rows of the weight, K, gated): Llama-3-8B's gate/up (two 14336-row halves), down, and fused qkv
KERNEL_SHAPES = {"llama3-8b": [("gate_up 4096->2x14336 gated", 2 * 14336, 4096, True),
                               ("down 14336->4096", 4096, 14336, False), ("qkv 4096->6144", 6144, 4096, False),
                               ("o 4096->4096", 4096, 4096, False)],
                 "tiny": [("gate_up 256->2x512 gated", 1024, 256, True), ("down 512->256", 256, 512, False),
                          ("qkv 256->384", 384, 256, False)]}
ROWS = (1, 8, 64, 512, 4096)


def fp8_shard(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 shard -> the engine's FP8 shard: each decoder linear's e4m3 weight and fp32 weight_scale [out]; the
    rest shared with `shard`, not copied. `shard` is left as it is."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in shard.items():
            if LINEAR.fullmatch(name):
                out[name], out[name[: -len(".weight")] + ".weight_scale"] = fp8.quantize_weight(t)
            else:
                out[name] = t
    return out


def load_dequantized(shard: dict[str, torch.Tensor], f8: dict[str, torch.Tensor]) -> None:
    """Overwrite the bf16 shard's linears in place (the bf16 engine's parameters) with the FP8 weights dequantized."""
    with torch.no_grad():
        for name, t in shard.items():
            if LINEAR.fullmatch(name):
                t.copy_(fp8.dequantize(f8[name], f8[name[: -len(".weight")] + ".weight_scale"], t.dtype))


def check_converter(hf: dict, hf_state: dict[str, torch.Tensor], f8: dict[str, torch.Tensor]) -> dict:
    """The same model as a `cluster lite fp8` checkpoint (compressed-tensors, channel scales [out, 1]) through the
    converter's build_shards: byte-identical e4m3 values and scales."""
    from cluster.convert.hf import build_shards, engine_config
    from cluster.quant.fp8_export import LINEAR as HF_LINEAR, quantization_config

    state = {}
    for name, t in hf_state.items():
        if HF_LINEAR.fullmatch(name):
            q, s = fp8.quantize_weight(t.cpu())
            state[name], state[name[: -len(".weight")] + ".weight_scale"] = q, s[:, None]
        else:
            state[name] = t.cpu()
    def get(name: str) -> torch.Tensor:
        return state[name]

    get.names = set(state)  # type: ignore[attr-defined]  # what the converter's reader knows of a checkpoint
    hf_q = dict(hf, quantization_config=quantization_config())
    ref = build_shards(get, hf_q, engine_config(hf_q, "bfloat16", 1, "random"), 1)[0]
    assert set(ref) == set(f8), sorted(set(ref) ^ set(f8))
    for k, v in f8.items():
        if v.dtype == fp8.FP8 or k.endswith(".weight_scale"):
            r = ref[k].to(v.device)
            assert r.dtype == v.dtype and torch.equal(r.view(torch.uint8) if v.dtype == fp8.FP8 else r,
                                                      v.view(torch.uint8) if v.dtype == fp8.FP8 else v), k
    return {"tensors": len(f8), "identical": True}


def _graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call, from a CUDA graph of `reps` calls (no launch gaps: what a captured step sees)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(5):
        g.replay()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / (5 * reps)


def kernels(shape: str, tbps: float) -> dict:
    """Correctness (`ok` / `FAIL` lines), then time of bf16 (kernels.linear: GEMV at 1 row, cuBLAS above) and FP8
    (kernels.linear_fp8) at each shape and row count, with bandwidth, TFLOP/s and the FP8 weight-read floor."""
    from cluster import kernels as k

    if not torch.cuda.is_available():
        print("fp8 kernels: skipped (no CUDA; the CPU runs the dequantizing reference, tests/test_fp8_kernels.py)")
        return {"skipped": "no CUDA"}
    res: dict = {"checks": [], "timing": []}
    torch.manual_seed(0)
    for label, n, kk, gated in KERNEL_SHAPES[shape]:
        w = torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s = fp8.quantize_weight(w)
        deq = fp8.dequantize(q, s, torch.float32)
        wb = fp8.dequantize(q, s, torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            got = k.linear_fp8(x, q, s, gated=gated).float()
            w8a16 = x.float() @ deq.t()
            xq, xs = fp8.quantize_tokens(x)
            w8a8 = (xq.float() * xs) @ deq.t()
            if gated:
                w8a16, w8a8 = (k.silu_and_mul(r.to(torch.bfloat16)).float() for r in (w8a16, w8a8))
            path = "gemv" if m <= 16 else "scaled_mm"
            want = w8a16 if path == "gemv" else w8a8
            err = ((got - want).norm() / want.norm()).item()
            act = ((got - w8a16).norm() / w8a16.norm()).item()
            ok = bool(torch.isfinite(got).all()) and err < 1e-2 and act < 6e-2
            res["checks"].append({"layer": label, "M": m, "path": path, "rel_err": err, "rel_err_vs_w8a16": act,
                                  "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} fp8 {path:<9} {label:<28} M={m:<5} rel err {err:.2e} "
                  f"(vs W8A16 {act:.2e})", flush=True)
            t16 = _graph_ms(lambda: k.linear(x, wb, None, gated))
            t8 = _graph_ms(lambda: k.linear_fp8(x, q, s, None, gated))
            out_n = n // 2 if gated else n
            flops = 2 * m * n * kk
            bytes16 = n * kk * 2 + m * (kk + out_n) * 2
            bytes8 = n * kk + n * 4 + m * (kk + out_n) * 2
            row = {"layer": label, "M": m, "bf16_ms": t16, "fp8_ms": t8, "speedup": t16 / t8,
                   "bf16_tbps": bytes16 / t16 / 1e9, "fp8_tbps": bytes8 / t8 / 1e9,
                   "bf16_tflops": flops / t16 / 1e9, "fp8_tflops": flops / t8 / 1e9,
                   "fp8_of_floor": (bytes8 / (tbps * 1e12)) * 1e3 / t8}
            res["timing"].append(row)
            print(f"     {label:<28} M={m:<5} bf16 {t16:.4f} ms ({row['bf16_tbps']:.2f} TB/s, "
                  f"{row['bf16_tflops']:.0f} TFLOP/s)  fp8 {t8:.4f} ms ({row['fp8_tbps']:.2f} TB/s, "
                  f"{row['fp8_tflops']:.0f} TFLOP/s)  {row['speedup']:.2f}x; fp8 at {row['fp8_of_floor']:.0%} of "
                  "its read floor", flush=True)
        del w, q, s, deq, wb
    from cluster.kernels import fp8 as kfp8

    res["tuned_configs"] = kfp8.chosen_configs()
    res["all_ok"] = all(c["ok"] for c in res["checks"])
    return res
