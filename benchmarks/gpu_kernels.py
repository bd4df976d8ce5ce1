#!/usr/bin/env python3
"""Check every Triton kernel against the reference at real sizes (Llama-3-8B: Hq=32, Hkv=8, D=128, bf16), then time it.

Run on the GPU machine from the repository root:  python3 benchmarks/gpu_kernels.py [--sweep]
    python3 benchmarks/gpu_kernels.py --features   # only the Gemma 2 / 3 and Baichuan-13B attention rows (a minute)
    python3 benchmarks/gpu_kernels.py --features-sweep   # Gemma-2-9B's batch-1 decode attention under tile configs
Only `cluster.kernels` is imported (no pydantic, Ray, transformers needed). Each check draws fresh random inputs,
poisons the kernel's outputs with NaN and compares by ||out - ref|| / ||ref|| against the fp32 reference. Timings are
`triton.testing.do_bench` medians (L2 flushed before each call); decode is also timed as replays of a CUDA graph holding
one call per layer over distinct caches (as the engine's decode graph does). Figures are against 3.0 TB/s and
800 TFLOP/s (bf16 dense), the H100 ceilings measured on this workplace's machine. --sweep also times launch configs.
Writes $OUT/kernels.json when OUT is set.
"""
import json
import os
import sys
import time
import traceback
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "cluster" not in sys.modules:  # import cluster.kernels without cluster/__init__.py (it pulls in pydantic)
    _pkg = types.ModuleType("cluster")
    _pkg.__path__ = [str(ROOT / "cluster")]
    sys.modules["cluster"] = _pkg

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from cluster.kernels import activation, attention, gemv, kvcache, moe, norm, reference, rotary, w4a16  # noqa: E402

PEAK_BW, PEAK_FLOPS = 3.0e12, 800e12
TOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
HQ, HKV, D, HIDDEN, FFN = 32, 8, 128, 4096, 14336
DEV = torch.device("cuda")
ROWS: list[dict] = []
SWEEPS: list[dict] = []
T0 = time.time()


@contextmanager
def poisoned():
    """Inside: every float tensor from torch.empty starts as NaN, so an output element never written shows up."""
    real = torch.empty

    def empty(*a, **k):
        t = real(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def record(kernel: str, shape: str, err: float, dtype: torch.dtype, ms: float, nbytes: float = 0.0,
           flops: float = 0.0, note: str = "") -> None:
    ok = err == err and err < TOL[dtype]
    row = dict(kernel=kernel, shape=shape, rel_err=err, ok=ok, ms=ms, gbps=nbytes / ms / 1e6 if nbytes else None,
               tflops=flops / ms / 1e9 if flops else None, note=note)
    row["frac"] = (row["gbps"] * 1e9 / PEAK_BW) if nbytes else (row["tflops"] * 1e12 / PEAK_FLOPS) if flops else None
    ROWS.append(row)
    rate = f"{row['gbps']:8.0f} GB/s" if nbytes else f"{row['tflops']:8.1f} TF/s" if flops else " " * 13
    frac = f"{row['frac']:6.1%}" if row["frac"] is not None else " " * 6
    print(f"  {kernel:<22} {shape:<34} err={err:.2e} {'ok' if ok else 'FAIL'} {ms * 1e3:9.1f} us {rate} "
          f"{frac} {note}", flush=True)


def guarded(fn):
    """Run one benchmark case; a failure is printed and recorded, the rest still run."""
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            ROWS.append(dict(kernel=fn.__name__, shape=str(a), ok=False, error=repr(e)[:300]))
    return run


# -- elementwise kernels ---------------------------------------------------------------------------------------------
@guarded
def bench_rms_norm(T: int, dtype=torch.bfloat16) -> None:
    x, r = (torch.randn(T, HIDDEN, dtype=dtype, device=DEV) for _ in range(2))
    w = torch.randn(HIDDEN, dtype=dtype, device=DEV)
    with poisoned():
        out, res = norm.rms_norm(x, w, 1e-5, r)
    ro, rr = reference.rms_norm(x, w, 1e-5, r)
    err = max(rel_err(out, ro), rel_err(res, rr))
    record("rms_norm+residual", f"[{T},{HIDDEN}]", err, dtype, bench(lambda: norm.rms_norm(x, w, 1e-5, r)),
           nbytes=4 * x.numel() * x.element_size())


@guarded
def bench_silu(T: int, dtype=torch.bfloat16) -> None:
    x = torch.randn(T, 2 * FFN, dtype=dtype, device=DEV)
    with poisoned():
        out = activation.silu_and_mul(x)
    record("silu_and_mul", f"[{T},{2 * FFN}]", rel_err(out, reference.silu_and_mul(x)), dtype,
           bench(lambda: activation.silu_and_mul(x)), nbytes=1.5 * x.numel() * x.element_size())


@guarded
def bench_gemv_gated(dtype=torch.bfloat16) -> None:
    x, w = torch.randn(1, HIDDEN, dtype=dtype, device=DEV), torch.randn(2 * FFN, HIDDEN, dtype=dtype, device=DEV) * 0.02
    with poisoned():
        out = gemv.gemv(x, w, None, gated=True)
    want = reference.silu_and_mul(torch.nn.functional.linear(x.float(), w.float()).to(dtype))
    record("gemv gated (gate_up)", f"[1,{HIDDEN}] x [{2 * FFN},{HIDDEN}]", rel_err(out, want), dtype,
           bench(lambda: gemv.gemv(x, w, None, gated=True)), nbytes=w.numel() * w.element_size())
    two = activation.silu_and_mul(gemv.gemv(x, w))
    record("gemv, silu_and_mul", "the same as two launches", rel_err(two, want), dtype,
           bench(lambda: activation.silu_and_mul(gemv.gemv(x, w))), nbytes=w.numel() * w.element_size())


@guarded
def bench_w4a16(M: int, N: int, K: int = HIDDEN, group: int = 128, dtype=torch.bfloat16) -> None:
    """4-bit weights (AWQ's layout after conversion): rated by the bytes they occupy (half a byte a weight, plus a
    zero and a scale per group), the whole of what decode at small M must read."""
    from cluster.quant import int4

    q, zeros, scales = int4.quantize(torch.randn(N, K, device=DEV) * 0.02, group)
    qweight, zeros, scales = int4.pack(q), zeros.to(dtype), scales.to(dtype)
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    with poisoned():
        out = w4a16.linear_w4(x, qweight, zeros, scales)
    err = rel_err(out, reference.linear_w4(x.float(), qweight, zeros.float(), scales.float()))
    nbytes = qweight.numel() + 2 * zeros.numel() * zeros.element_size()
    record("linear_w4", f"[{M},{K}] x [{N},{K}] g{group}", err, dtype,
           bench(lambda: w4a16.linear_w4(x, qweight, zeros, scales)), nbytes=nbytes)


@guarded
def bench_moe(T: int, E: int = 8, k: int = 2, dtype=torch.bfloat16) -> None:
    """Mixtral's experts (8 x [14336, 4096], top 2). Decode is rated by the bytes of the experts it chose (it should
    read only those), prefill by its FLOPs."""
    x = torch.randn(T, HIDDEN, dtype=dtype, device=DEV)
    w13 = torch.randn(E, 2 * FFN, HIDDEN, dtype=dtype, device=DEV) * 0.02
    w2 = torch.randn(E, HIDDEN, FFN, dtype=dtype, device=DEV) * 0.02
    weights, experts = torch.rand(T, k, device=DEV).softmax(-1), torch.rand(T, E, device=DEV).topk(k).indices
    with poisoned():
        out = moe.moe_experts(x, w13, w2, weights, experts)
    err = rel_err(out, reference.moe_experts(x.float(), w13.float(), w2.float(), weights, experts))
    chosen = experts.unique().numel()
    nbytes = chosen * 3 * FFN * HIDDEN * w13.element_size()
    flops = 2 * T * k * 3 * FFN * HIDDEN
    decode = T <= 64
    record("moe_experts", f"T={T} E={E} k={k} (experts hit {chosen})", err, dtype,
           bench(lambda: moe.moe_experts(x, w13, w2, weights, experts)), nbytes=nbytes if decode else 0.0,
           flops=0.0 if decode else flops, note=f"tile {moe.tile_rows(T * k, E)} rows")


def _qkv_views(T: int, dtype: torch.dtype):
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, dtype=dtype, device=DEV)
    return (t.view(T, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))


def _llama3_cos_sin() -> torch.Tensor:
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    freqs = torch.outer(torch.arange(8192, device=DEV).float(), inv)
    return torch.cat((freqs.cos(), freqs.sin()), -1)


@guarded
def bench_store_kvcache(T: int, page: int = 16, dtype=torch.bfloat16) -> None:
    kvo = torch.randn(T, 2 * HKV * D, dtype=dtype, device=DEV)
    k, v = (t.view(T, HKV, D) for t in kvo.split([HKV * D, HKV * D], dim=-1))
    nblocks = 2 * T // page + 4
    slots = torch.randperm(nblocks * page, device=DEV)[:T]
    slots[::7] = -1
    caches = [torch.full((nblocks, page, HKV, D), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    reference.store_kvcache(k, v, caches[0], caches[1], slots)
    kvcache.store_kvcache(k, v, caches[2], caches[3], slots)
    pairs = ((caches[0], caches[2]), (caches[1], caches[3]))
    same = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in pairs)
    record("store_kvcache", f"T={T} [{HKV},{D}] page={page}", 0.0 if same else float("nan"), dtype,
           bench(lambda: kvcache.store_kvcache(k, v, caches[2], caches[3], slots)),
           nbytes=4 * k.numel() * k.element_size())


@guarded
def bench_rotary_and_store(T: int, page: int = 16, dtype=torch.bfloat16) -> None:
    q, k, v = _qkv_views(T, dtype)
    pos = torch.randint(0, 8192, (T,), device=DEV)
    cos_sin = _llama3_cos_sin()
    nblocks = 2 * T // page + 4
    slots = torch.randperm(nblocks * page, device=DEV)[:T]
    slots[::7] = -1
    caches = [torch.full((nblocks, page, HKV, D), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    rq = reference.rotary_and_store(q.clone(), k, v, pos, cos_sin, caches[0], caches[1], slots)
    with poisoned():
        oq = rotary.rotary_and_store(q.clone(), k, v, pos, cos_sin, caches[2], caches[3], slots)
    pairs = ((caches[0], caches[2]), (caches[1], caches[3]))
    err = max([rel_err(oq, rq)] + [rel_err(b.nan_to_num(0.0), a.nan_to_num(0.0)) for a, b in pairs])
    if not all(torch.equal(a.isnan(), b.isnan()) for a, b in pairs):
        err = float("nan")  # a skipped (-1) or unused slot was written, or a slot was missed
    record("rotary_and_store", f"T={T} q[{HQ},{D}] kv[{HKV},{D}] page={page}", err, dtype,
           bench(lambda: rotary.rotary_and_store(q, k, v, pos, cos_sin, caches[2], caches[3], slots)),
           nbytes=(2 * q.numel() + 4 * k.numel()) * q.element_size() + T * D * 4)


# -- attention -------------------------------------------------------------------------------------------------------
def make_cache(ctx_lens: list[int], q_lens: list[int], page: int, dtype: torch.dtype, copies: int = 1,
               heads: tuple[int, int, int] = (HQ, HKV, D)):
    """Random caches with scattered pages (a fragmented pool) and this step's queries. Returns q, [(kc, vc)], tables,
    context_lens, cu_seqlens_q. heads: (Hq, Hkv, D), Llama-3-8B's unless given."""
    hq, hkv, d = heads
    need = [-(-c // page) for c in ctx_lens]
    nblocks = sum(need) + 8
    width = max(need)
    perm = torch.randperm(nblocks, device=DEV)[:sum(need)].to(torch.int32)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[at:at + n]
        at += n
    caches = [(torch.randn(nblocks, page, hkv, d, dtype=dtype, device=DEV),
               torch.randn(nblocks, page, hkv, d, dtype=dtype, device=DEV)) for _ in range(copies)]
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=DEV)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, caches, tables, torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), cu


def ref_attention(q, kc, vc, tables, ctx, cu, scale):
    return reference.paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, cu, scale)


def attn_flops(q_lens: list[int], ctx_lens: list[int]) -> float:
    """QK^T and PV over the causally visible keys: 4 * Hq * D per (query, visible key)."""
    pairs = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(q_lens, ctx_lens))
    return 4.0 * HQ * D * pairs


@guarded
def bench_prefill(name: str, q_lens: list[int], ctx_lens: list[int], page: int = 16, dtype=torch.bfloat16,
                  timed: bool = True) -> None:
    q, [(kc, vc)], tables, ctx, cu = make_cache(ctx_lens, q_lens, page, dtype)
    scale = D ** -0.5
    with poisoned():
        out = attention.paged_attention(q, kc, vc, tables, ctx, cu, scale)
    err = rel_err(out, ref_attention(q, kc, vc, tables, ctx, cu, scale))
    ms = bench(lambda: attention.paged_attention(q, kc, vc, tables, ctx, cu, scale)) if timed else float("nan")
    record("paged_attention", f"{name} page={page} {str(dtype)[6:]}", err, dtype, ms,
           flops=attn_flops(q_lens, ctx_lens))


def kv_bytes(ctx_lens: list[int], dtype: torch.dtype) -> float:
    return 2.0 * sum(ctx_lens) * HKV * D * torch.tensor([], dtype=dtype).element_size()


@guarded
def bench_decode(B: int, ctx_len: int, page: int = 16, dtype=torch.bfloat16, graph: bool = True) -> None:
    """Eager (do_bench) and CUDA-graph timings; the graph is captured at the table's full capacity and replayed after
    the context lengths change in place, as the engine does."""
    ctx_lens = [ctx_len] * B
    nbytes = kv_bytes(ctx_lens, dtype)
    copies = max(1, min(128, int(-(-200e6 // nbytes))))  # distinct caches (>> 50 MB L2) as one per layer
    q, caches, tables, ctx, cu = make_cache(ctx_lens, [1] * B, page, dtype, copies)
    kc, vc = caches[0]
    scale = D ** -0.5
    want = ref_attention(q, kc, vc, tables, ctx, cu, scale)
    with poisoned():
        out = attention.paged_decode_attention(q, kc, vc, tables, ctx, scale, ctx_len)
    splits = attention.decode_num_splits(B, HKV, ctx_len, DEV)
    shape = f"B={B} ctx={ctx_len} page={page}"
    record("paged_decode", shape, rel_err(out, want), dtype,
           bench(lambda: attention.paged_decode_attention(q, kc, vc, tables, ctx, scale, ctx_len)),
           nbytes=nbytes, note=f"eager splits={splits}")
    if not graph:
        return
    bound = tables.shape[1] * page
    g, outs = capture(lambda kc_i, vc_i: attention.paged_decode_attention(q, kc_i, vc_i, tables, ctx, scale, bound),
                      caches)
    err = max(rel_err(o, ref_attention(q, kc_i, vc_i, tables, ctx, cu, scale)) for o, (kc_i, vc_i) in
              zip(outs[:2], caches[:2]))
    # new, shorter lengths written in place: the captured graph must follow them
    ctx.copy_(torch.randint(1, ctx_len + 1, (B,), device=DEV, dtype=torch.int32))
    outs[0].fill_(float("nan"))
    g.replay()
    err = max(err, rel_err(outs[0], ref_attention(q, kc, vc, tables, ctx, cu, scale)))
    ctx.fill_(ctx_len)
    ms = bench(g.replay) / len(caches)
    record("paged_decode", shape, err, dtype, ms, nbytes=nbytes,
           note=f"graph x{len(caches)} splits={attention.decode_num_splits(B, HKV, bound, DEV)}")


@guarded
def check_features(name: str, heads: tuple[int, int, int], q_lens: list[int], ctx_lens: list[int],
                   softcap: float = 0.0, window: int = 0, alibi: bool = False, dtype=torch.bfloat16) -> None:
    """Gemma 2 / 3's soft-cap and sliding window and Baichuan-13B's ALiBi at their head shapes: the prefill kernel
    (untimed), then each sequence's next token as a decode CUDA graph, replayed at the captured lengths and at
    new, shorter ones written in place, against the fp32 reference; the graph's time per call."""
    from cluster.convert.rope import alibi_slopes

    hq, hkv, d = heads
    q, [(kc, vc)], tables, ctx, cu = make_cache(ctx_lens, q_lens, 16, dtype, heads=heads)
    q = q * 3  # scores of several units, so a cap of a few bites
    kw = dict(softcap=softcap, window=window, alibi=alibi_slopes(hq).to(DEV) if alibi else None)
    scale = d ** -0.5

    def want(qq, cu_q):
        return reference.paged_attention(qq.float(), kc.float(), vc.float(), tables, ctx, cu_q, scale, **kw)

    with poisoned():
        out = attention.paged_attention(q, kc, vc, tables, ctx, cu, scale, **kw)
    shape = f"{name} Hq={hq} Hkv={hkv} D={d}"
    record("paged_attention", shape, rel_err(out, want(q, cu)), dtype, float("nan"),
           note=f"softcap={softcap} window={window} alibi={alibi}")
    dq = q[(cu[1:] - 1).long()].contiguous()
    dcu = torch.arange(len(ctx_lens) + 1, dtype=torch.int32, device=DEV)
    bound = tables.shape[1] * 16
    g, outs = capture(lambda k_, v_: attention.paged_decode_attention(dq, k_, v_, tables, ctx, scale, bound, **kw),
                      [(kc, vc)])
    err = rel_err(outs[0], want(dq, dcu))
    full = ctx.clone()
    ctx.copy_(torch.randint(1, int(ctx.max()) + 1, ctx.shape, device=DEV, dtype=torch.int32))
    outs[0].fill_(float("nan"))
    g.replay()
    err = max(err, rel_err(outs[0], want(dq, dcu)))
    ctx.copy_(full)
    seen = [min(c, window) if window else c for c in ctx_lens]
    record("paged_decode", shape, err, dtype, bench(g.replay), nbytes=2.0 * sum(seen) * hkv * d * dq.element_size(),
           note=f"graph softcap={softcap} window={window} alibi={alibi}")


def feature_rows() -> None:
    """Gemma-2-9B (16 / 8 heads of 256, cap 50, window 4096), Gemma-3-1B (4 / 1 of 256, window 512) and
    Baichuan-13B (40 heads of 128, ALiBi): windows shorter and longer than the contexts, prefill chunks."""
    mixed = ([2048, 300, 1, 1], [2048, 5000, 6000, 100])
    for dtype in (torch.bfloat16, torch.float32):
        check_features("gemma2-9b", (16, 8, 256), *mixed, softcap=50.0, window=4096, dtype=dtype)
        check_features("gemma2-9b cap 5", (16, 8, 256), *mixed, softcap=5.0, dtype=dtype)
        check_features("gemma3-1b", (4, 1, 256), *mixed, window=512, dtype=dtype)
        check_features("window 9", (8, 2, 128), [40, 1, 1], [40, 70, 9], window=9, dtype=dtype)
        check_features("baichuan-13b", (40, 40, 128), *mixed, alibi=True, dtype=dtype)
        check_features("alibi + window", (6, 2, 64), *mixed, alibi=True, window=100, softcap=5.0, dtype=dtype)
    check_features("gemma2-9b B=64 ctx 8192", (16, 8, 256), [1] * 64, [8192] * 64, softcap=50.0, window=4096)


KV_POLICIES = (8, "fp8", 4)


def quant_cache(cache: torch.Tensor, bits) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 cache as the engine stores it under quant_policy `bits` (scales in the cache's layout)."""
    if bits == "fp8":
        head_scale = torch.ones(cache.shape[2], device=cache.device)
        return reference.quantize_fp8(cache, head_scale), head_scale
    q, s = (reference.quantize_int8 if bits == 8 else reference.quantize_int4)(cache)
    return q, reference.scales_to_layout(s)


def row_bytes(bits) -> int:
    """Bytes of one cached (token, head) row of K or V, scales included (bf16 for the unquantized cache)."""
    return reference.kv_row_bytes(bits, D, 2)


@guarded
def bench_decode_quant(B: int, ctx_len: int, bits, page: int = 16) -> None:
    """Decode over a quantized cache beside bf16 on the same shape, as graph replays over distinct caches (one per
    layer, as the engine's decode graph holds them), the context lengths changed in place after capture. Checked
    against the reference reading the same cache; rated by the bytes each reads."""
    nbytes = 2.0 * B * ctx_len * HKV * row_bytes(bits)
    copies = max(1, min(128, int(-(-200e6 // nbytes))))
    q, caches, tables, ctx, cu = make_cache([ctx_len] * B, [1] * B, page, torch.bfloat16, copies)
    qcaches = [(quant_cache(kc, bits), quant_cache(vc, bits)) for kc, vc in caches]
    caches = None
    scale = D ** -0.5
    bound = tables.shape[1] * page

    def call(kv_k, kv_v):
        return attention.paged_decode_attention(q, kv_k[0], kv_v[0], tables, ctx, scale, bound, k_scale=kv_k[1],
                                                v_scale=kv_v[1])

    def want(i):
        (kq, ks), (vq, vs) = qcaches[i]
        return reference.paged_attention(q.float(), kq, vq, tables, ctx, cu, scale, ks, vs)

    g, outs = capture(call, qcaches)
    err = max(rel_err(o, want(i)) for i, o in enumerate(outs[:2]))
    ctx.copy_(torch.randint(1, ctx_len + 1, (B,), device=DEV, dtype=torch.int32))
    outs[0].fill_(float("nan"))
    g.replay()
    err = max(err, rel_err(outs[0], want(0)))
    ctx.fill_(ctx_len)
    ms = bench(g.replay) / len(qcaches)
    record(f"paged_decode {bits}", f"B={B} ctx={ctx_len} page={page}", err, torch.bfloat16, ms, nbytes=nbytes,
           note=f"graph x{len(qcaches)}")


@guarded
def bench_prefill_quant(name: str, q_lens: list[int], ctx_lens: list[int], bits, page: int = 16) -> None:
    q, [(kc, vc)], tables, ctx, cu = make_cache(ctx_lens, q_lens, page, torch.bfloat16)
    (kq, ks), (vq, vs) = quant_cache(kc, bits), quant_cache(vc, bits)
    scale = D ** -0.5
    with poisoned():
        out = attention.paged_attention(q, kq, vq, tables, ctx, cu, scale, ks, vs)
    err = rel_err(out, reference.paged_attention(q.float(), kq, vq, tables, ctx, cu, scale, ks, vs))
    ms = bench(lambda: attention.paged_attention(q, kq, vq, tables, ctx, cu, scale, ks, vs))
    record(f"paged_attention {bits}", f"{name} page={page}", err, torch.bfloat16, ms,
           flops=attn_flops(q_lens, ctx_lens))


@guarded
def check_store_quant(T: int, bits, page: int = 16) -> None:
    """rotary_and_store and store_kvcache into a quantized cache: the bytes (and scales) the reference writes."""
    dtype = torch.bfloat16
    q, k, v = _qkv_views(T, dtype)
    pos = torch.randint(0, 8192, (T,), device=DEV)
    nblocks = -(-T // page) + 2
    slots = torch.randperm(nblocks * page, device=DEV)[:T]
    cos_sin = _llama3_cos_sin()
    worst, diff = 0.0, []
    for fn, kernel in (("store_kvcache", kvcache.store_kvcache), ("rotary_and_store", rotary.rotary_and_store)):
        made = []
        for impl in (getattr(reference, fn), kernel):
            kc, ks = quant_cache(torch.zeros(nblocks, page, HKV, D, dtype=dtype, device=DEV), bits)
            vc, vs = quant_cache(torch.zeros(nblocks, page, HKV, D, dtype=dtype, device=DEV), bits)
            args = (k, v) if fn == "store_kvcache" else (q.clone(), k, v, pos, cos_sin)
            impl(*args, kc, vc, slots, ks, vs)
            made.append((kc, vc, ks, vs))
        (rk, rv, rks, rvs), (gk, gv, gks, gvs) = made
        for which, got, want, gs, ws in (("k", gk, rk, gks, rks), ("v", gv, rv, gvs, rvs)):
            g_deq = reference.dequantize_cache(got, gs, torch.float32)
            w_deq = reference.dequantize_cache(want, ws, torch.float32)
            diff.append((got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item())
            if fn == "rotary_and_store" and which == "k":
                # the rotated key may round one bf16 step apart, which may move a value one quantization step
                if bits == "fp8":
                    step = w_deq.abs() / 8 + 2 ** -9
                else:
                    sc = torch.maximum(gs, ws).transpose(1, 2)
                    step = (sc[..., :1] if bits == 4 else sc.unsqueeze(-1))
                if not ((g_deq - w_deq).abs() <= 1.01 * step + w_deq.abs() / 128 + 1e-6).all():  # + a bf16 ulp
                    worst = float("nan")
            else:
                worst = max(worst, rel_err(g_deq, w_deq) if w_deq.norm() > 0 else 0.0)
    record(f"store {bits}", f"T={T} kv[{HKV},{D}] page={page}", worst, dtype, float("nan"),
           note="bytes differing from the reference: " + " ".join(f"{x:.1e}" for x in diff))


def capture(call, caches) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """One graph holding call(kc, vc) for every cache (like one decode step over the layers), replayed once with
    its outputs NaN-poisoned first (outside the graph, so the fill is not part of what is timed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside capture
        for kc_i, vc_i in caches:
            call(kc_i, vc_i)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [call(kc_i, vc_i) for kc_i, vc_i in caches]
    for o in outs:
        o.fill_(float("nan"))
    g.replay()
    return g, outs


# -- sweeps and host overhead ------------------------------------------------------------------------------------------
PREFILL_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, DECODE_ROWS=dr)
                 for bm, bn, w, st, dr in [(128, 32, 4, 3, True), (128, 32, 4, 3, False), (128, 32, 4, 4, True),
                                           (128, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 32, 8, 3, True),
                                           (64, 32, 4, 3, True), (64, 64, 4, 2, True), (64, 32, 4, 4, True)]]


def sweep_prefill(name: str, q_lens: list[int], ctx_lens: list[int], page: int = 16) -> None:
    q, [(kc, vc)], tables, ctx, cu = make_cache(ctx_lens, q_lens, page, torch.bfloat16)
    want = ref_attention(q, kc, vc, tables, ctx, cu, 0.088)
    base = attention.PREFILL_CONFIG, attention.MIXED_CONFIG
    flops = attn_flops(q_lens, ctx_lens)
    for cfg in PREFILL_SWEEP:
        if time.time() - T0 > 330:
            break
        attention.PREFILL_CONFIG = attention.MIXED_CONFIG = cfg  # whichever the batch picks
        try:
            with poisoned():
                err = rel_err(attention.paged_attention(q, kc, vc, tables, ctx, cu, 0.088), want)
            ms = bench(lambda: attention.paged_attention(q, kc, vc, tables, ctx, cu, 0.088))
        except Exception as e:  # noqa: BLE001 (e.g. out of shared memory)
            err, ms = float("nan"), float("nan")
            print("   ", cfg, repr(e)[:120])
        SWEEPS.append(dict(kernel="prefill", case=name, cfg=cfg, err=err, ms=ms, tflops=flops / ms / 1e9))
        print(f"   prefill {name} page={page} {cfg} err={err:.1e} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TF/s",
              flush=True)
    attention.PREFILL_CONFIG, attention.MIXED_CONFIG = base


def sweep_decode_graph(B: int, ctx_len: int, page: int = 16) -> None:
    """Graph-replay time per call for each split count and a few tile configs: sizes the split heuristic."""
    nbytes = kv_bytes([ctx_len] * B, torch.bfloat16)
    copies = max(1, min(128, int(-(-200e6 // nbytes))))
    q, caches, tables, ctx, cu = make_cache([ctx_len] * B, [1] * B, page, torch.bfloat16, copies)
    want = ref_attention(q, *caches[0], tables, ctx, cu, 0.088)
    base = attention.DECODE_CONFIG
    options = [(n, {}) for n in (1, 2, 4, 8, 16, 32, 64)]
    options += [(None, dict(BLOCK_N=bn, num_warps=w, num_stages=st))
                for bn, w, st in [(32, 4, 3), (64, 4, 4), (64, 8, 3)]]
    for splits, over in options:
        if time.time() - T0 > 330:
            break
        attention.DECODE_CONFIG = {**base, **over}
        try:
            g, outs = capture(lambda kc_i, vc_i: attention.paged_decode_attention(
                q, kc_i, vc_i, tables, ctx, 0.088, ctx_len, num_splits=splits), caches)
            err, ms = rel_err(outs[0], want), bench(g.replay) / len(caches)
        except Exception as e:  # noqa: BLE001
            err, ms = float("nan"), float("nan")
            print("   ", splits, over, repr(e)[:120])
        used = splits or attention.decode_num_splits(B, HKV, ctx_len, DEV)
        SWEEPS.append(dict(kernel="decode-graph", B=B, ctx=ctx_len, splits=used, cfg=over, err=err, ms=ms,
                           gbps=nbytes / ms / 1e6))
        print(f"   decode graph B={B} ctx={ctx_len} splits={used} {over} err={err:.1e} {ms * 1e3:6.1f} us "
              f"{nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    attention.DECODE_CONFIG = base


def sweep_feature_decode(name: str, heads: tuple[int, int, int], ctx_len: int, bound: int, softcap: float = 0.0,
                         window: int = 0, B: int = 1, layers: int = 42) -> None:
    """One decode step's attention at a feature shape (Gemma-2-9B: 16 / 8 heads of 256, soft-cap): `layers` distinct
    caches in one graph, the split count sized by `bound` as the engine's graphs are, under a few tile configs and
    MIN_SPLIT_TOKENS: sizes DECODE_CONFIG for wide heads."""
    hq, hkv, d = heads
    q, caches, tables, ctx, cu = make_cache([ctx_len] * B, [1] * B, 16, torch.bfloat16, layers, heads=heads)
    kw = dict(softcap=softcap, window=window)
    want = reference.paged_attention(q.float(), caches[0][0].float(), caches[0][1].float(), tables, ctx, cu,
                                     d ** -0.5, **kw)
    base, many = attention.DECODE_CONFIG, attention.MANY_SPLITS
    attention.MANY_SPLITS = 1 << 30  # each config's num_stages as given, not clamped at many splits
    for bn, w, st, mst in [(64, 4, 3, 64), (32, 4, 3, 32), (32, 4, 2, 32), (32, 2, 3, 32), (64, 8, 3, 64),
                           (64, 4, 2, 32), (16, 4, 3, 16), (32, 8, 2, 32)]:
        over = dict(BLOCK_N=bn, num_warps=w, num_stages=st, MIN_SPLIT_TOKENS=mst)
        attention.DECODE_CONFIG = {**base, **over}
        try:
            g, outs = capture(lambda kc_i, vc_i: attention.paged_decode_attention(
                q, kc_i, vc_i, tables, ctx, d ** -0.5, bound, **kw), caches)
            err, ms = rel_err(outs[0], want), bench(g.replay) / len(caches)
        except Exception as e:  # noqa: BLE001
            err, ms = float("nan"), float("nan")
            print("   ", over, repr(e)[:120])
        splits = attention.decode_num_splits(B, hkv, min(bound, window + bn) if window else bound, DEV)
        SWEEPS.append(dict(kernel="decode-feature", case=name, ctx=ctx_len, splits=splits, cfg=over, err=err, ms=ms))
        print(f"   decode {name} B={B} ctx={ctx_len} bound={bound} splits={splits} {over} err={err:.1e} "
              f"{ms * 1e3:6.2f} us", flush=True)
    attention.DECODE_CONFIG, attention.MANY_SPLITS = base, many


def host_overhead() -> None:
    """CPU time per call of each wrapper on tiny inputs (the GPU idles): what eager (non-graph) steps pay per launch."""
    T, page = 4, 16
    x, r, w = torch.randn(T, HIDDEN, device=DEV), torch.randn(T, HIDDEN, device=DEV), torch.randn(HIDDEN, device=DEV)
    gu = torch.randn(T, 2 * FFN, device=DEV)
    qk = torch.randn(T, HQ + HKV, D, device=DEV)
    pos = torch.arange(T, device=DEV)
    cs = torch.randn(64, D, device=DEV)
    q, [(kc, vc)], tables, ctx, cu = make_cache([64] * T, [1] * T, page, torch.float32)
    slots = torch.arange(T, device=DEV)
    calls = {
        "rms_norm+residual": lambda: norm.rms_norm(x, w, 1e-5, r),
        "silu_and_mul": lambda: activation.silu_and_mul(gu),
        "rotary_and_store": lambda: rotary.rotary_and_store(qk[:, :HQ], qk[:, HQ:], qk[:, HQ:], pos, cs, kc, vc, slots),
        "store_kvcache": lambda: kvcache.store_kvcache(qk[:, HQ:], qk[:, HQ:], kc, vc, slots),
        "paged_attention": lambda: attention.paged_attention(q, kc, vc, tables, ctx, cu, 0.1),
        "paged_decode (2 launches)": lambda: attention.paged_decode_attention(q, kc, vc, tables, ctx, 0.1, 8192),
    }
    for name, fn in calls.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        us = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        SWEEPS.append(dict(kernel="host-overhead", name=name, us=us))
        print(f"   host overhead {name:<26} {us:6.1f} us/call", flush=True)


def kv_quant_rows() -> None:
    """Issue 18's cases: each quantized cache beside bf16 (graph-captured decode, prefill and mixed batches)."""
    for bits in KV_POLICIES:
        check_store_quant(4096, bits)
    for B, c in ((64, 2048), (1, 8192), (64, 8192), (16, 4096)):
        bench_decode(B, c, graph=True)
        for bits in KV_POLICIES:
            bench_decode_quant(B, c, bits)
    for name, ql, cl in (("16x2048 packed", [2048] * 16, [2048] * 16),
                         ("4x512 chunk over 3584 cached", [512] * 4, [4096] * 4),
                         ("2048 prefill + 63 decodes", [2048] + [1] * 63, [2048] * 64)):
        bench_prefill(name, ql, cl)
        for bits in KV_POLICIES:
            bench_prefill_quant(name, ql, cl, bits)


def sweep_decode_quant(B: int, ctx_len: int, bits, page: int = 16) -> None:
    """Graph-replay time per call of a few tile configs for one quantized cache: sizes DECODE_CONFIG_BY_QUANT."""
    nbytes = 2.0 * B * ctx_len * HKV * row_bytes(bits)
    copies = max(1, min(128, int(-(-200e6 // nbytes))))
    q, caches, tables, ctx, cu = make_cache([ctx_len] * B, [1] * B, page, torch.bfloat16, copies)
    qcaches = [(quant_cache(kc, bits), quant_cache(vc, bits)) for kc, vc in caches]
    caches = None
    (kq, ks), (vq, vs) = qcaches[0]
    want = reference.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.088, ks, vs)
    quant = kvcache.quant_bits(kq, ks, vs, D)
    base = dict(attention.DECODE_CONFIG_BY_QUANT)
    for over, splits in [(dict(BLOCK_N=bn, num_warps=w, num_stages=st), n) for bn, w, st, n in
                         [(64, 2, 3, None), (64, 2, 3, 2), (64, 2, 3, 4), (128, 2, 2, None), (128, 2, 2, 2),
                          (64, 4, 3, None), (128, 4, 2, None), (32, 2, 3, None)]]:
        attention.DECODE_CONFIG_BY_QUANT[quant] = over
        over = {**over, "splits": splits}
        try:
            g, outs = capture(lambda kk, vv: attention.paged_decode_attention(
                q, kk[0], vv[0], tables, ctx, 0.088, ctx_len, k_scale=kk[1], v_scale=vv[1], num_splits=splits),
                qcaches)
            err, ms = rel_err(outs[0], want), bench(g.replay) / len(qcaches)
        except Exception as e:  # noqa: BLE001
            err, ms = float("nan"), float("nan")
            print("   ", over, repr(e)[:120])
        SWEEPS.append(dict(kernel=f"decode-graph {bits}", B=B, ctx=ctx_len, cfg=over, err=err, ms=ms,
                           gbps=nbytes / ms / 1e6))
        print(f"   decode {bits} B={B} ctx={ctx_len} {over} err={err:.1e} {ms * 1e3:6.1f} us "
              f"{nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    attention.DECODE_CONFIG_BY_QUANT.clear()
    attention.DECODE_CONFIG_BY_QUANT.update(base)


def sweep_prefill_quant(name: str, q_lens: list[int], ctx_lens: list[int], bits, page: int = 16) -> None:
    """paged_attention over a quantized cache for a few tile configs: sizes PREFILL_CONFIG_BY_QUANT."""
    q, [(kc, vc)], tables, ctx, cu = make_cache(ctx_lens, q_lens, page, torch.bfloat16)
    (kq, ks), (vq, vs) = quant_cache(kc, bits), quant_cache(vc, bits)
    want = reference.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.088, ks, vs)
    quant = kvcache.quant_bits(kq, ks, vs, D)
    flops = attn_flops(q_lens, ctx_lens)
    base = dict(attention.PREFILL_CONFIG_BY_QUANT)
    for bm, bn, w, st in [(128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                          (64, 32, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)]:
        over = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        attention.PREFILL_CONFIG_BY_QUANT[quant] = over
        try:
            err = rel_err(attention.paged_attention(q, kq, vq, tables, ctx, cu, 0.088, ks, vs), want)
            ms = bench(lambda: attention.paged_attention(q, kq, vq, tables, ctx, cu, 0.088, ks, vs))
        except Exception as e:  # noqa: BLE001 (e.g. out of shared memory)
            err, ms = float("nan"), float("nan")
            print("   ", over, repr(e)[:120])
        SWEEPS.append(dict(kernel=f"prefill {bits}", case=name, cfg=over, err=err, ms=ms, tflops=flops / ms / 1e9))
        print(f"   prefill {bits} {name} {over} err={err:.1e} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TF/s",
              flush=True)
    attention.PREFILL_CONFIG_BY_QUANT.clear()
    attention.PREFILL_CONFIG_BY_QUANT.update(base)


def kv_quant_table() -> None:
    """Each quantized cache's time over bf16's on the same case, against issue 18's targets."""
    target = {("decode", 8): 0.8, ("decode", "fp8"): 0.8, ("decode", 4): 0.7}
    base = {r["shape"].split(" page")[0]: r["ms"] for r in ROWS
            if r.get("kernel") in ("paged_decode", "paged_attention") and "graph" in (r.get("note") or "graph")
            and r.get("ms") == r.get("ms")}
    print(f"\n{'kernel':<24} {'case':<34} {'ok':>4} {'us':>8} {'bf16 us':>8} {'x bf16':>7} {'GB/s':>6} {'target':>7}")
    for r in ROWS:
        k = r.get("kernel", "")
        if not any(k.startswith(p + " ") for p in ("paged_decode", "paged_attention", "store")):
            continue
        case = r["shape"].split(" page")[0]
        b = base.get(case)
        kind, bits = k.split(" ")[0], k.split(" ")[-1]
        bits = int(bits) if bits.isdigit() else bits
        tgt = target.get(("decode", bits)) if kind == "paged_decode" else None
        if tgt and case.startswith("B=1 "):
            tgt = 1.0
        ratio = r["ms"] / b if b and r.get("ms") == r.get("ms") else float("nan")
        gbps = f"{r['gbps']:6.0f}" if r.get("gbps") else "     -"
        print(f"{k:<24} {case:<34} {'ok' if r.get('ok') else 'FAIL':>4} {r.get('ms', float('nan')) * 1e3:8.1f} "
              f"{(b or float('nan')) * 1e3:8.1f} {ratio:7.2f} {gbps} {tgt or '':>7}")


def main() -> None:
    sweep = "--sweep" in sys.argv
    if "--features-sweep" in sys.argv:  # Gemma-2-9B's decode attention at batch 1, global and windowed layers
        for ctx_len in (560, 2048):
            sweep_feature_decode("gemma2-9b global", (16, 8, 256), ctx_len, 8192, softcap=50.0)
            sweep_feature_decode("gemma2-9b window", (16, 8, 256), ctx_len, 8192, softcap=50.0, window=4096)
        sweep_feature_decode("llama3-8b", (HQ, HKV, D), 560, 8192, layers=32)
        return
    if "--features" in sys.argv:
        torch.manual_seed(int(time.time()))
        feature_rows()
        print(f"all ok: {all(r['ok'] for r in ROWS)}  ({time.time() - T0:.0f} s)")
        return
    if "--kv" in sys.argv:  # issue 18's rows only, then their config sweeps
        torch.manual_seed(int(time.time()))
        if "--sweep-only" not in sys.argv:
            kv_quant_rows()
        if sweep:
            for B, c in ((64, 2048), (1, 8192)):
                for bits in KV_POLICIES:
                    sweep_decode_quant(B, c, bits)
        if "--sweep-prefill" in sys.argv:
            for bits in KV_POLICIES:
                sweep_prefill_quant("16x2048 packed", [2048] * 16, [2048] * 16, bits)
                sweep_prefill_quant("2048 prefill + 63 decodes", [2048] + [1] * 63, [2048] * 64, bits)
        kv_quant_table()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "kernels_kv.json").write_text(json.dumps({"rows": ROWS, "sweeps": SWEEPS},
                                                                                indent=1, default=str))
        return
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} SMs={props.multi_processor_count} torch {torch.__version__} triton {triton.__version__}")
    print(f"prefill {attention.PREFILL_CONFIG} mixed {attention.MIXED_CONFIG} decode {attention.DECODE_CONFIG}",
          flush=True)
    torch.manual_seed(int(time.time()))
    for T in (64, 4096):
        bench_rms_norm(T)
    bench_silu(4096)
    bench_store_kvcache(4096)
    bench_store_kvcache(4096, page=128)
    bench_rotary_and_store(1)
    bench_rotary_and_store(4096)
    bench_gemv_gated()
    for T in (1, 8, 64, 4096):
        bench_moe(T)
    for M in (1, 64):
        bench_w4a16(M, 6144)
        bench_w4a16(M, 2 * FFN)
    bench_prefill("16x2048 packed", [2048] * 16, [2048] * 16)
    bench_prefill("16x2048 packed", [2048] * 16, [2048] * 16, page=64)
    bench_prefill("4x512 chunk over 3584 cached", [512] * 4, [4096] * 4)
    bench_prefill("2048 prefill + 63 decodes", [2048] + [1] * 63, [2048] + [2048] * 63)
    bench_prefill("fp16 3x300 ragged", [300, 17, 1], [300, 800, 77], dtype=torch.float16, timed=False)
    for B in (1, 64):
        for c in (512, 2048, 8192):
            bench_decode(B, c)
    bench_decode(64, 2048, page=64)
    kv_quant_rows()
    bench_decode(64, 2048, page=256, graph=False)
    bench_decode(8, 1000, dtype=torch.float16, graph=False)
    bench_decode(3, 777, page=32, dtype=torch.float32, graph=False)
    feature_rows()
    if sweep:
        print("\nsweeps", flush=True)
        host_overhead()
        sweep_prefill("16x2048", [2048] * 16, [2048] * 16)
        sweep_prefill("2048+63 decodes", [2048] + [1] * 63, [2048] * 64)
        for B, c in ((1, 512), (1, 2048), (1, 8192), (8, 4096)):
            sweep_decode_graph(B, c)

    print(f"\n{'kernel':<22} {'shape':<42} {'rel_err':>8} {'ok':>4} {'ms':>9} {'GB/s':>7} {'TF/s':>6} {'frac':>6}"
          "  note")
    for r in ROWS:
        if "error" in r:
            print(f"{r['kernel']:<22} {r['shape'][:42]:<42} ERROR {r['error'][:80]}")
            continue
        gb = f"{r['gbps']:7.0f}" if r["gbps"] else f"{'':>7}"
        tf = f"{r['tflops']:6.1f}" if r["tflops"] else f"{'':>6}"
        print(f"{r['kernel']:<22} {r['shape'][:42]:<42} {r['rel_err']:8.1e} {'ok' if r['ok'] else 'FAIL':>4} "
              f"{r['ms']:9.4f} {gb} {tf} {'' if r['frac'] is None else format(r['frac'], '6.1%'):>6}  {r['note']}")
    print(f"all ok: {all(r['ok'] for r in ROWS)}  ({time.time() - T0:.0f} s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(dict(
            device=props.name, torch=torch.__version__, triton=triton.__version__,
            prefill_config=attention.PREFILL_CONFIG, mixed_config=attention.MIXED_CONFIG,
            decode_config=attention.DECODE_CONFIG,
            rows=ROWS, sweeps=SWEEPS), indent=1, default=str))


if __name__ == "__main__":
    main()
