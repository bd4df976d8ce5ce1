"""Triton W4A16 matmul: y[M, N] = x[M, K] @ W[N, K].T with W 4-bit (reference.linear_w4 gives the layout).

The engine's qweight, uint8 [N, K / 2], is read as little-endian int32 words [N, K / 8]: channel 8j + i sits in
nibble i of word j, so weight rows stream along K in 16-byte vectors and each byte is loaded once.

M = 1 (decode at batch 1) goes to the CUDA-core GEMV of w4a16_gemv.py. Larger M goes to the tensor-core kernel
here: each program owns BLOCK_N weight rows and BLOCK_M activation rows and walks K in BLOCK_K steps (one group or
a part of one, so a step needs one zero and one scale per row, loaded a step ahead). It turns the words into
OFFSET + q in the activation dtype (OFFSET = 128 for bf16, 1024 for fp16: exact there), multiplies on the tensor
cores with the weights as the 64-row side (swap-AB: small M pads only the activation side, to 16), and corrects
each step's product in fp32: acc += (dot - (OFFSET + zero) * sum_k x) * scale = sum_k (q - zero) * scale * x. Per
8 weights the dequantization costs one shift, four byte permutes and four LOP3s (inline PTX: 0x4300 | q is the
bf16 128 + q); under the interpreter and for fp32 the same values come from plain Triton bit operations.

Few output tiles (o_proj / down_proj) split K over programs that write fp32 partials; a second kernel adds them,
the bias and the gate. GATED: W is the MLP's [gate; up] (2N rows) and the output silu(x @ gate.T) * (x @ up.T),
rounded to the dtype at the same points as gemv.py's. Launch configs are timed once per (shape, batch bucket) on
first use outside CUDA-graph capture (`tune`), from CUDA-graph replays; large M may pick dequantize-then-cuBLAS.
Measured on the H200 (docs/benchmarks.md): the GEMV beats the bf16 GEMV 1.3-1.7x; at M = 8..64 this kernel is
latency-bound (0.7-1.2x bf16 cuBLAS): the step waits on its own tensor-core result.
"""
import os

import torch
import triton
import triton.language as tl

from cluster.kernels import activation, jit_cache, pdl, reference
from cluster.kernels.pdl import wait_for_previous
from cluster.kernels.w4a16_gemv import _bcast8, _dequant_kernel, _gate, _gemv_kernel

OFFSETS = {torch.bfloat16: 128.0, torch.float16: 1024.0, torch.float32: 0.0}
MAGIC = {torch.bfloat16: "0x43004300", torch.float16: "0x64006400", torch.float32: ""}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1, split=1)
INTERPRETER_GEMV = dict(gemv=True, BLOCK_N=4, BLOCK_G=2, num_warps=4)


@triton.jit
def _deq_fast(w, mask, MAGIC: tl.constexpr, like):
    """int32 words [R, C] -> [R, C * 8] OFFSET + q in like's dtype (bf16 / fp16), k order; mask: 0x000F000F."""
    q = tl.inline_asm_elementwise(
        """{
        .reg .b32 hi, t0, t1, t2, t3;
        shr.b32 hi, $4, 4;
        prmt.b32 t0, $4, hi, 0x0400;
        prmt.b32 t1, $4, hi, 0x0501;
        prmt.b32 t2, $4, hi, 0x0602;
        prmt.b32 t3, $4, hi, 0x0703;
        lop3.b32 $0, t0, $12, """ + MAGIC + """, 0xEA;
        lop3.b32 $1, t1, $12, """ + MAGIC + """, 0xEA;
        lop3.b32 $2, t2, $12, """ + MAGIC + """, 0xEA;
        lop3.b32 $3, t3, $12, """ + MAGIC + """, 0xEA;
        }""",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [_bcast8(w), _bcast8(mask)], dtype=like.dtype, is_pure=True,
        pack=8)
    return tl.reshape(q, (w.shape[0], w.shape[1] * 8))


@triton.jit
def _nib(w, m, MAGIC: tl.constexpr, BASE: tl.constexpr):
    """(w & m) | MAGIC read as fp32 is BASE + q exactly (MAGIC's exponent puts the mantissa's unit at the nibble)."""
    return ((w & m) | MAGIC).to(tl.float32, bitcast=True) - BASE


@triton.jit
def _deq_plain(w, m, OFFSET: tl.constexpr, DTYPE: tl.constexpr):
    """The same values as _deq_fast from plain bit operations (the interpreter, fp32); m holds 0xF."""
    h = w >> 16
    m1, m2, m3 = m << 4, m << 8, m << 12
    n0 = _nib(w, m, 0x4B000000, 8388608.0 - OFFSET)
    n1 = _nib(w, m1, 0x49000000, 524288.0 - OFFSET)
    n2 = _nib(w, m2, 0x47000000, 32768.0 - OFFSET)
    n3 = _nib(w, m3, 0x45000000, 2048.0 - OFFSET)
    n4 = _nib(h, m, 0x4B000000, 8388608.0 - OFFSET)
    n5 = _nib(h, m1, 0x49000000, 524288.0 - OFFSET)
    n6 = _nib(h, m2, 0x47000000, 32768.0 - OFFSET)
    n7 = _nib(h, m3, 0x45000000, 2048.0 - OFFSET)
    # join adds a last axis, so the outermost join sets the lowest bit of a nibble's position
    q = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(q, (w.shape[0], w.shape[1] * 8)).to(DTYPE)


@triton.jit
def _dot_step(w_ptrs, n_ok, x, mbits, OFFSET: tl.constexpr, FAST: tl.constexpr, MAGIC: tl.constexpr):
    """[BN, BM] = (OFFSET + q of rows w_ptrs, this K step) @ x [BM, BK].T, in fp32."""
    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
    if FAST:
        wq = _deq_fast(w, mbits, MAGIC, x)
    else:
        wq = _deq_plain(w, mbits, OFFSET, x.dtype)
    if x.dtype == tl.float32:
        return tl.dot(wq, tl.trans(x), input_precision="ieee")
    return tl.dot(wq, tl.trans(x))


@triton.jit
def _zs(z_ptrs, s_ptrs, ok, OFFSET: tl.constexpr):
    """A step's OFFSET + zero and scale per row (fp32)."""
    z = tl.load(z_ptrs, mask=ok, other=0).to(tl.float32)
    return OFFSET + z, tl.load(s_ptrs, mask=ok, other=0).to(tl.float32)


@triton.jit
def _correct(acc, d, c, s, xs):
    """acc += sum_k (q - zero) * scale * x from d = sum_k (OFFSET + q) * x and xs = sum_k x."""
    return acc + (d - c[:, None] * xs[None, :]) * s[:, None]


@triton.jit(do_not_specialize=["M"])
def _w4_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, k_split, mbits,
               GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr,
               FAST: tl.constexpr, OFFSET: tl.constexpr, MAGIC: tl.constexpr, USE_PDL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """PARTIAL: y is the fp32 workspace [splits, M, N (2N if GATED)], bias and gate left to _reduce_kernel."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(2) * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    n_ok, m_ok = rn < N, rm < M
    KW = tl.multiple_of(K // 8, 4)
    G = K // GROUP
    rows = rn.to(tl.int64)
    w_ptrs = qw_ptr + rows[:, None] * KW + (k_lo // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    z_ptrs = z_ptr + rows * G + k_lo // GROUP
    s_ptrs = s_ptr + rows * G + k_lo // GROUP
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_lo + tl.arange(0, BLOCK_K))[None, :]
    up_w, up_g = N.to(tl.int64) * KW, N.to(tl.int64) * G  # GATED: the up rows, N below their gate rows
    mask = tl.full((BLOCK_N, BLOCK_K // 8), 0, tl.int32) + mbits  # a register, not an immediate (see _deq_*)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Each step's zeros and scales are loaded a step ahead: 2-byte loads are too narrow for the async copies that
    # bring the weights and x, so loaded in the step that needs them they would stall it.
    c, s = _zs(z_ptrs, s_ptrs, n_ok, OFFSET)
    cu, su = c, s
    if GATED:
        cu, su = _zs(z_ptrs + up_g, s_ptrs + up_g, n_ok, OFFSET)
    wait_for_previous(USE_PDL)  # x comes from the kernel before; everything else is weights
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(x_ptrs + (k0 - k_lo), mask=m_ok[:, None], other=0.0)
        xs = tl.sum(x.to(tl.float32), axis=1)
        g1 = (k0 + BLOCK_K - k_lo) // GROUP
        nxt = n_ok & (rn * 0 + k0 + BLOCK_K < k_hi)
        c1, s1 = _zs(z_ptrs + g1, s_ptrs + g1, nxt, OFFSET)
        acc = _correct(acc, _dot_step(w_ptrs + (k0 - k_lo) // 8, n_ok, x, mask, OFFSET, FAST, MAGIC), c, s, xs)
        c, s = c1, s1
        if GATED:
            cu1, su1 = _zs(z_ptrs + up_g + g1, s_ptrs + up_g + g1, nxt, OFFSET)
            du = _dot_step(w_ptrs + up_w + (k0 - k_lo) // 8, n_ok, x, mask, OFFSET, FAST, MAGIC)
            acc_up = _correct(acc_up, du, cu, su, xs)
            cu, su = cu1, su1
    out_ok = n_ok[:, None] & m_ok[None, :]
    if PARTIAL:
        width = 2 * N if GATED else N
        ws = y_ptr + (tl.program_id(2).to(tl.int64) * M + rm[None, :]) * width + rn[:, None]
        tl.store(ws, acc, mask=out_ok)
        if GATED:
            tl.store(ws + N, acc_up, mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if GATED:
                acc_up += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if GATED:
            acc = _gate(acc, acc_up, y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm.to(tl.int64)[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=["M", "splits"])
def _reduce_kernel(ws_ptr, b_ptr, y_ptr, M, N, splits, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                   USE_PDL: tl.constexpr, BLOCK: tl.constexpr):
    """y[m] = sum of the split partials (+ bias, gate), one row a program column."""
    m = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    width = 2 * N if GATED else N
    wait_for_previous(USE_PDL)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        row = ws_ptr + (s * M + m) * width
        acc += tl.load(row + cols, mask=ok, other=0.0)
        if GATED:
            up += tl.load(row + N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if GATED:
            up += tl.load(b_ptr + N + cols, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        acc = _gate(acc, up, y_ptr.dtype.element_ty)
    tl.store(y_ptr + m * N + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


# -- launch and configs ---------------------------------------------------------------------------------------------
_TUNED: dict[tuple, dict] = {}
_SMS: dict[int, int] = {}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _sms(dev: torch.device) -> int:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def block_ks(group: int) -> list[int]:
    """K steps that stay inside one group (so a step needs one zero and scale per row)."""
    return [bk for bk in (128, 64, 32) if group % bk == 0] or [group]


def auto_split(M: int, N: int, K: int, cfg: dict, sms: int) -> int:
    """Split K until the grid covers the GPU about twice (o_proj / down_proj at small M), at most 8 ways."""
    programs = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
    split, steps = 1, K // cfg["BLOCK_K"]
    while programs * split < 2 * sms and split * 2 <= min(8, steps):
        split *= 2
    return split


# timed by `tune`: (BLOCK_N, num_warps) of the M = 1 GEMV; (BLOCK_N, num_warps, num_stages) of the tensor-core
# kernel for BLOCK_M <= 32 (decode) and above
GEMV_TILES = [(4, 4), (8, 4), (2, 4), (4, 1), (8, 1), (2, 1), (4, 2)]
TILES_SMALL = [(128, 4, 3), (64, 4, 4), (128, 8, 4)]
TILES_LARGE = [(128, 4, 3), (128, 8, 3), (64, 4, 3), (64, 8, 3)]


def gemv_config(K: int, group: int, bn: int, warps: int) -> dict:
    """A step of the GEMV spans what its threads cover: 4 words a thread, so 1024 / group groups a warp."""
    bg = min(triton.next_power_of_2(K // group), max(1, warps * 1024 // group))
    return dict(gemv=True, BLOCK_N=bn, BLOCK_G=bg, num_warps=warps)


def candidates(M: int, N: int, K: int, group: int, sms: int) -> list[dict]:
    """The configs `tune` times for one (shape, batch bucket): the CUDA-core GEMV at M = 1 (the tensor-core kernel
    was slower there at every tile, docs/benchmarks.md), each tensor-core tile with the split that fills the GPU
    above, and dequantize-then-cuBLAS for large M."""
    if M == 1:
        return [gemv_config(K, group, bn, warps) for bn, warps in GEMV_TILES]
    out = []
    bm = min(64, max(16, triton.next_power_of_2(M)))
    bk = block_ks(group)[0]
    for bn, warps, stages in TILES_SMALL if bm <= 32 else TILES_LARGE:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        cfg["split"] = auto_split(M, N, K, cfg, sms)
        out.append(cfg)
    if M >= 128:
        out.append(dict(dequant=True))
    return out


def launch(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None, gated: bool, cfg: dict, fast: bool | None = None) -> torch.Tensor:
    """x [M, K] (K contiguous) -> [M, N] with one launch config (`tune` picks it; benchmarks call this directly)."""
    M, K = x.shape
    N = qweight.shape[0] // 2 if gated else qweight.shape[0]
    group = K // scales.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if cfg.get("dequant"):
        w = torch.empty((qweight.shape[0], K), dtype=x.dtype, device=x.device)
        bk = block_ks(group)[0]
        _dequant_kernel[(triton.cdiv(w.shape[0], 32), K // bk)](qweight, zeros, scales, w, w.shape[0], K, GROUP=group,
                                                                  BLOCK_N=32, BLOCK_K=bk, num_warps=4)
        out = torch.nn.functional.linear(x, w, bias)
        return activation.silu_and_mul(out) if gated else out
    b = bias if bias is not None else y  # any pointer; unread without HAS_BIAS
    if cfg.get("gemv"):
        assert M == 1, M
        _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, qweight, zeros, scales, b, y, N, K, 0xF, GROUP=group,
                                                        HAS_BIAS=bias is not None, GATED=gated, BLOCK_N=cfg["BLOCK_N"],
                                                        BLOCK_G=cfg["BLOCK_G"], num_warps=cfg["num_warps"],
                                                        PREFETCH=cfg.get("prefetch", K // group > cfg["BLOCK_G"]),
                                                        num_stages=1, **pdl.launch_args(x))
        return y
    if fast is None:
        fast = x.dtype != torch.float32 and not _interpreted()
    split = cfg.get("split", 1)
    bk = cfg["BLOCK_K"]
    k_split = triton.cdiv(K // bk, split) * bk
    split = triton.cdiv(K, k_split)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    common = dict(GROUP=group, GATED=gated, FAST=fast, OFFSET=OFFSETS[x.dtype], MAGIC=MAGIC[x.dtype],
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **pdl.launch_args(x))
    mbits = 0x000F000F if fast else 0xF
    if split == 1:
        _w4_kernel[grid](x, qweight, zeros, scales, b, y, M, N, K, x.stride(0), k_split, mbits,
                         HAS_BIAS=bias is not None, PARTIAL=False, **common)
        return y
    ws = torch.empty((split, M, 2 * N if gated else N), dtype=torch.float32, device=x.device)
    _w4_kernel[grid](x, qweight, zeros, scales, b, ws, M, N, K, x.stride(0), k_split, mbits, HAS_BIAS=False,
                     PARTIAL=True, **common)
    block = min(1024, triton.next_power_of_2(N))
    _reduce_kernel[(triton.cdiv(N, block), M)](ws, b, y, M, N, split, HAS_BIAS=bias is not None, GATED=gated,
                                               BLOCK=block, num_warps=4, **pdl.launch_args(x))
    return y


def time_config(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, gated: bool, cfg: dict, fast: bool | None = None) -> float:
    """ms a call, replayed from a CUDA graph over copies of the weight that together overflow L2 (as a decode
    step's layers do): a Python launch costs more than a decode-sized kernel, so plain timing measures the host."""
    from triton.testing import do_bench

    copies = max(2, min(16, -(-(128 << 20) // (qweight.numel() * 4))))
    ws = [(torch.empty_like(qweight), zeros.clone(), scales.clone()) for _ in range(copies - 1)]
    ws = [(qweight, zeros, scales)] + ws
    launch(x, qweight, zeros, scales, bias, gated, cfg, fast)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            launch(x, *w, bias, gated, cfg, fast)
    return do_bench(g.replay, warmup=5, rep=25, return_mode="median") / copies


def tune(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
         bias: torch.Tensor | None, gated: bool) -> dict:
    """The fastest candidate for this (shape, batch bucket), timed once on first use. Under CUDA-graph capture or
    with CLUSTER_W4_TUNE=0 the first candidate is used untimed (the engine's warm-up runs every bucket first)."""
    M, K = x.shape
    N = qweight.shape[0] // 2 if gated else qweight.shape[0]
    group = K // scales.shape[1]
    bucket = 1 if M == 1 else max(16, min(4096, triton.next_power_of_2(M)))
    key = (bucket, N, K, group, gated, x.dtype, bias is not None)
    if key in _TUNED:
        return _TUNED[key]
    saved = jit_cache.load_picks("w4a16").get(str(key))  # timed on an earlier start of this model on this GPU
    if saved is not None:
        _TUNED[key] = saved
        return saved
    options = candidates(M, N, K, group, _sms(x.device))
    if os.environ.get("CLUSTER_W4_TUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return options[0]
    # Two rounds, each config's best kept: with one round the picks for o_proj and down_proj on the H200 ran about
    # 20% slower than the sweep's best (docs/benchmarks.md, W4A16 run 3).
    times: dict[int, float] = {}
    for _ in range(2):
        for i, cfg in enumerate(options):
            try:
                ms = time_config(x, qweight, zeros, scales, bias, gated, cfg)
            except Exception:  # noqa: BLE001 (a config this GPU cannot run, e.g. out of shared memory)
                continue
            times[i] = min(ms, times.get(i, float("inf")))
    best = options[min(times, key=times.get)] if times else options[0]
    _TUNED[key] = best
    if times:
        jit_cache.save_pick("w4a16", str(key), best)
    return best


def linear_w4(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for a 4-bit weight; gated: silu_and_mul of the result, fused (see module doc)."""
    lead, K = x.shape[:-1], x.shape[-1]
    group = K // scales.shape[-1]
    if K % 32 or group < 16 or group & (group - 1) or x.dtype not in OFFSETS or not qweight.is_contiguous():
        y = reference.linear_w4(x, qweight, zeros, scales, bias)
        return reference.silu_and_mul(y) if gated else y
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qw = qweight.view(torch.int32)
    zeros, scales = zeros.contiguous(), scales.contiguous()
    if _interpreted():
        cfg = INTERPRETER_GEMV if x2.shape[0] == 1 else \
            dict(INTERPRETER_CONFIG, BLOCK_K=min(INTERPRETER_CONFIG["BLOCK_K"], block_ks(group)[-1]))
    else:
        cfg = tune(x2, qw, zeros, scales, bias, gated)
    y = launch(x2, qw, zeros, scales, bias, gated, cfg)
    return y.reshape(*lead, y.shape[-1])


def chosen_configs() -> dict:
    """`tune`'s pick per key, for benchmark reports."""
    return {str(k[:5]): str(v) for k, v in _TUNED.items()}
