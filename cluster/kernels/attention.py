"""Triton attention over the paged KV cache (semantics and shapes: reference.py).

* `paged_attention`: varlen causal attention for any mix of prefill, chunked prefill (cached prefix) and decode.
  Programs are (query tile, kv head). A tile holds BLOCK_Q tokens x GROUP q heads of one kv head as its BLOCK_M
  rows, so every K/V tile loaded serves the whole GQA group. Tiles are laid out without any host-side mapping:
  sequence b owns programs [cu[b] // BLOCK_Q + b, ...), an upper bound that needs only cu_seqlens_q, and each
  program finds its sequence by binary search (surplus programs exit at once). So there is no host sync.
* `paged_decode_attention`: one query per sequence, flash-decoding. Programs are (seq, kv head, split); each split
  covers an equal, BLOCK_N-aligned share of the sequence's *actual* context and writes a partial (output, log-sum-exp)
  that a second kernel merges. The split count is a run-time argument (changing it does not recompile) chosen from
  python ints only (batch, heads, an upper bound of the context), never from tensor values: the pair of launches can
  be captured in a CUDA graph and replayed for any context up to that bound.

Both gather K/V one BLOCK_N-key tile at a time: each key's page id comes from block_tables, so a tile may span several
pages (block_size 16) or part of one (block_size 256). Softmax runs online in base 2 with fp32 accumulators.
"""
import os

import torch
import triton
import triton.language as tl

from cluster.kernels import pdl
from cluster.kernels.kvcache import quant_bits
from cluster.kernels.pdl import wait_for_previous
from cluster.kernels.w4a16 import _deq_fast, _deq_plain

# The quantized caches' values become fp16 in integer ops (inline PTX: byte permutes into 0x6400 | x, one packed
# subtract) on the GPU, and through plain casts under Triton's interpreter, which runs no PTX.
FAST_CVT = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

LOG2E = 1.4426950408889634

# Launch parameters; module-level so the benchmark can sweep them and the tests can shrink them. Defaults from the H100
# sweeps of benchmarks/gpu_kernels.py (bf16, D=128, Hq/Hkv=32/8, block_size 16):
# * prefill-heavy batches (>= MIXED_BELOW query tokens per sequence on average): 128x32 tiles, 4 warps, 3 stages
#   (342 TF/s on 16x2048; 128x64/8 warps gave 298, 64x64/4 warps 315);
# * decode-heavy mixed batches: 64x64 tiles, 2 stages (2048 prefill + 63 decodes at ctx 2048: 278 us against 339 us
#   with the prefill tiles; the decode rows take the one-query path either way);
# * decode: 64-key tiles, 4 warps, 3 stages (2.75-2.97 TB/s at batch 64); a split per 64+ keys, up to ~2 waves of
#   programs (batch 1: 8 splits at ctx 512 took 7.2 us against 11.4 with 2; 32 at ctx 2048 took 10.7 us against 13.4).
PREFILL_CONFIG = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3, DECODE_ROWS=True)
MIXED_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, DECODE_ROWS=True)
MIXED_BELOW = 64
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3, MIN_SPLIT_TOKENS=64, MAX_SPLITS=64)
# At batch 1 the graphs' 33 splits leave each program a tile or few: 2 stages there took 7.8 us per layer against 9.6
# (Llama-3-8B, ctx 560) and 9.8 against 12.5 (Gemma-2-9B's 256-wide heads; gpu_kernels.py --features-sweep, H200).
MANY_SPLITS = 8
# Per quantized cache (kvcache.py's QUANT), what differs from DECODE_CONFIG; from the sweeps of gpu_kernels.py --kv.
# H200 (run 1 of issue 18): 2 warps a program instead of 4 took B=64 ctx 2048 from 180 to 116 us (int8), 152 to 116
# (fp8), 217 to 154 (4-bit): each program's 16 query rows leave 4 warps mostly converting for one another.
# Session 3's sweep: fp8 at 128-key tiles, 2 stages, 94 us at B=64 ctx 2048 (0.69x bf16) and 19.4 us at B=1 ctx 8192.
DECODE_CONFIG_BY_QUANT: dict[int, dict] = {8: dict(num_warps=2), 1: dict(BLOCK_N=128, num_warps=2, num_stages=2),
                                           4: dict(num_warps=2)}
# Likewise for paged_attention's prefill and mixed tiles (whichever the batch picks): the least time over 16 x 2048
# packed and 2048 + 63 decodes in the H200 sweep of bench_kv_quant.py --tune-prefill.
PREFILL_CONFIG_BY_QUANT: dict[int, dict] = {
    8: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    1: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    4: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)}


@triton.jit
def _dot(a, b):
    """fp16/bf16: plain tensor-core dot. fp32: three tf32 passes (about fp32 accurate) where one would err ~1e-3."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(ptr, ptrs, n_ok, MASK: tl.constexpr):
    if MASK == 0:
        return tl.load(ptr + ptrs)
    else:  # masked loads: never-written slots past ctx may hold NaN
        return tl.load(ptr + ptrs, mask=n_ok[:, None], other=0.0)


@triton.jit
def _softmax_step(s, m_i, l_i, SAFE: tl.constexpr):
    """The online softmax's update for scores s: (p, the old rows' rescale, l_i, m_i)."""
    # Each row sees at least one key of its first tile (key 0, or the first key of a split), so m_new is finite from
    # then on and a row fully masked in a later tile gets p = 0 rather than NaN. Under a sliding window (SAFE) a row
    # may see no key of a tile before any other: its maximum stays -inf, and is taken as 0 so p and alpha are 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
    else:
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _softcap(s, cap):
    """cap * tanh(s / cap) (s and cap both in the scores' log2 units), tanh as 1 - 2 / (e^2x + 1) from exp2, which
    saturates to +-cap at either end and which Triton's interpreter runs as well."""
    return cap - 2.0 * cap / (tl.exp2(s * (2.8853900817779268 / cap)) + 1.0)  # 2.885... = 2 log2(e)


@triton.jit
def _v_weights(p, v_sc, dtype: tl.constexpr):
    """p * v_scale in the dots' dtype, and the factor the product takes back: in fp16, p * v_scale can fall below
    the normal range, so the weights are scaled to <= 1 first."""
    if dtype == tl.float16:
        v_top = tl.maximum(tl.max(v_sc, 0), 1e-30)
        return (p * (v_sc / v_top)[None, :]).to(dtype), v_top
    else:
        return (p * v_sc[None, :]).to(dtype), 1.0


@triton.jit
def _load_scales(ptr, idx, n_ok, MASK: tl.constexpr):
    if MASK == 0:
        return tl.load(ptr + idx)
    else:
        return tl.load(ptr + idx, mask=n_ok, other=0.0)


@triton.jit
def _to_dot_dtype(x, like, QUANT: tl.constexpr):
    """An int8 or e4m3 tile as like's dtype (exact in bf16 and fp16). int8 goes via fp32, which the interpreter casts
    right (its direct int8 -> bf16 cast does not); on the H200 that was also faster than byte permutes into
    0x6400 | (x ^ 0x80) in inline PTX (114 against 125 us at B=64, ctx 2048)."""
    if FAST_CVT and QUANT == 1 and like.dtype == tl.float16:
        return x.to(tl.float16)  # e4m3x2 -> f16x2 in one instruction (compute capability 8.9+)
    else:
        return x.to(tl.float32).to(like.dtype)


@triton.jit
def _dot_operand(q, QUANT: tl.constexpr):
    """q as the dots take it: over an e4m3 or 4-bit cache a 16-bit q becomes fp16 (exact for bf16 in fp16's range),
    the dtype those values convert to cheaply; fp32 stays. int8 keeps q's dtype: on the H200 its decode took 114 us
    in bf16 against 140 in fp16 (B=64, ctx 2048)."""
    if (QUANT == 1 or QUANT == 4) and q.dtype != tl.float32:
        return q.to(tl.float16)
    else:
        return q


@triton.jit
def _unpack4(w, like, BIAS: tl.constexpr):
    """int32 words [N, D / 8] of a 4-bit cache -> [N, D] values (0..15) - BIAS in like's dtype, in value order
    (value 2j in byte j's low nibble is nibble 2j of the little-endian words, as W4A16's weights, whose
    dequantization serves: it gives 1024 + q in fp16)."""
    if FAST_CVT and like.dtype == tl.float16:
        return _deq_fast(w, tl.full(w.shape, 0x000F000F, tl.int32), "0x64006400", like) - (1024.0 + BIAS)
    else:
        return _deq_plain(w, tl.full(w.shape, 0xF, tl.int32), -BIAS, like.dtype)


@triton.jit
def _row_params(ks_ptr, vs_ptr, page, n, n_ok, kv_head, PAGE: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr):
    """(k_sc, k_min, v_sc, v_min) [BLOCK_N] of keys n of an int8 (k_min, v_min unused) or 4-bit cache; zeros
    otherwise. (Loading them a tile ahead, as W4A16 does its zeros and scales, made int8 decode slower on the H200:
    162 against 125 us at B=64, ctx 2048.)"""
    srow = (page * tl.num_programs(1) + kv_head) * PAGE + n % PAGE  # grid axis 1 is the kv head in both kernels
    if QUANT == 4:  # (scale, min) pairs; V's min for values centred on 8 (-8..7, see _attend_tile)
        k_sc = _load_scales(ks_ptr, 2 * srow, n_ok, MASK)
        v_sc = _load_scales(vs_ptr, 2 * srow, n_ok, MASK)
        k_min = _load_scales(ks_ptr, 2 * srow + 1, n_ok, MASK)
        v_min = _load_scales(vs_ptr, 2 * srow + 1, n_ok, MASK) + 8.0 * v_sc
        return k_sc, k_min, v_sc, v_min
    elif QUANT == 8:
        k_sc = _load_scales(ks_ptr, srow, n_ok, MASK)
        v_sc = _load_scales(vs_ptr, srow, n_ok, MASK)
        return k_sc, k_sc, v_sc, v_sc
    else:
        z = tl.zeros(n.shape, tl.float32)
        return z, z, z, z


@triton.jit
def _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, ctx, pos, kv_head, qk_scale,
                 softcap, window, slopes, stride_cb, stride_cs, stride_ch,
                 D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with keys [start, start + BLOCK_N).

    MASK: 0 = every key valid and visible (interior tiles), 1 = keys must be < ctx, 2 = also causal (key <= pos),
    3 = also in the sliding window (pos - key < window). SOFTCAP: the scores (log2 units) become
    softcap * tanh(s / softcap) before the mask (softcap in the same units). ALIBI: then each row's slope (log2
    units, [rows]) times (key - pos) is added.
    A quantized cache (kvcache.py's QUANT; layouts in reference.py) goes into the dots as its integer (or e4m3)
    values, exact in q's dtype (fp16 for a 16-bit model: paged_attention's callers convert q); the scales act on
    the [rows, keys] scores and probabilities instead of on the [keys, D] tiles: s = (q . k_q) * k_scale
    (+ sum(q) * k_min for 4 bits), and p @ v = (p * v_scale) @ v_q (+ sum(p * v_min)). A 4-bit cache comes as int32
    words [keys, D / 8] (the caller's view).
    """
    k, v, page, n, n_ok = _load_tile(kc_ptr, vc_ptr, bt_row, start, ctx, kv_head, q, stride_cb, stride_cs,
                                     stride_ch, D, PAGE, BLOCK_N, MASK, QUANT)
    return _update_tile(acc, l_i, m_i, q, qsum, k, v, page, ks_ptr, vs_ptr, n, n_ok, pos, kv_head, qk_scale, softcap,
                        window, slopes, PAGE, MASK, QUANT, SOFTCAP, ALIBI)


@triton.jit
def _load_tile(kc_ptr, vc_ptr, bt_row, start, ctx, kv_head, like, stride_cb, stride_cs, stride_ch,
               D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr):
    """The K and V tile of keys [start, start + BLOCK_N) (those >= ctx masked unless MASK == 0) as the dots take
    them (like: q, whose dtype a quantized tile converts to), with the keys' pages, indices and validity."""
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < ctx
    if MASK == 0:
        page = tl.load(bt_row + n // PAGE).to(tl.int64)
    else:
        page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)  # unused table entries are arbitrary
    off = page * stride_cb + (n % PAGE) * stride_cs + kv_head * stride_ch
    if QUANT == 4:
        ptrs = off[:, None] + tl.arange(0, D // 8)[None, :]
        k = _unpack4(_load_rows(kc_ptr, ptrs, n_ok, MASK), like, 0.0)
        # V centred, -8..7: with 0..15 the two parts of p @ v, each several times the result, would cancel and
        # magnify the rounding of p * v_scale
        v = _unpack4(_load_rows(vc_ptr, ptrs, n_ok, MASK), like, 8.0)
    else:
        ptrs = off[:, None] + tl.arange(0, D)[None, :]
        k = _load_rows(kc_ptr, ptrs, n_ok, MASK)
        v = _load_rows(vc_ptr, ptrs, n_ok, MASK)
        if QUANT != 0:
            k, v = _to_dot_dtype(k, like, QUANT), _to_dot_dtype(v, like, QUANT)
    return k, v, page, n, n_ok


@triton.jit
def _update_tile(acc, l_i, m_i, q, qsum, k, v, page, ks_ptr, vs_ptr, n, n_ok, pos, kv_head, qk_scale, softcap, window,
                 slopes, PAGE: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr,
                 ALIBI: tl.constexpr):
    """_attend_tile's update once the tile (keys n, their pages) is loaded."""
    s = _dot(q, tl.trans(k))
    k_sc, k_min, v_sc, v_min = _row_params(ks_ptr, vs_ptr, page, n, n_ok, kv_head, PAGE, MASK, QUANT)
    if QUANT == 4:
        s = (s * k_sc[None, :] + qsum[:, None] * k_min[None, :]) * qk_scale
    elif QUANT == 8:
        s = s * (k_sc * qk_scale)[None, :]
    elif QUANT == 1:  # kvcache.FP8: one scale per kv head
        s = s * (qk_scale * tl.load(ks_ptr + kv_head))
    else:
        s = s * qk_scale
    if SOFTCAP:
        s = _softcap(s, softcap)
    if ALIBI:
        s += slopes[:, None] * (n[None, :] - pos[:, None]).to(tl.float32)
    if MASK == 1:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    if MASK == 2:
        s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
    if MASK == 3:
        seen = n_ok[None, :] & (n[None, :] <= pos[:, None]) & (n[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
    p, alpha, l_i, m_new = _softmax_step(s, m_i, l_i, MASK == 3)
    if QUANT == 8 or QUANT == 4:
        w, v_top = _v_weights(p, v_sc, q.dtype)
        pv = _dot(w, v) * v_top
        if QUANT == 4:
            pv += tl.sum(p * v_min[None, :], 1)[:, None]
        acc = acc * alpha[:, None] + pv
    elif QUANT == 1:  # one scale a head: after the dot (p * v_scale could fall below fp16's normal range)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v) * tl.load(vs_ptr + kv_head)
    else:
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attend_range(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, lo, hi, ctx, kv_head, qk_scale,
                  softcap, window, slopes, stride_cb, stride_cs, stride_ch,
                  D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
                  SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr):
    """Every row (one query, at position ctx - 1) attends to all keys [lo, hi) (lo BLOCK_N-aligned): whole tiles
    unmasked, then the ragged last one. WINDOW: it sees keys >= ctx - window only; lo is at or above the window's
    first tile, and that one tile is masked."""
    pos = tl.zeros([q.shape[0]], tl.int32) + (ctx - 1)  # the query's position (read by the window and ALiBi)
    first = lo
    if WINDOW:
        if lo < ctx - window:  # the window's first key lies inside this tile: the keys before it masked
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, lo, hi, pos,
                                         kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D, PAGE,
                                         BLOCK_N, 3, QUANT, SOFTCAP, ALIBI)
            first = tl.minimum(lo + BLOCK_N, hi)
    full = first + (hi - first) // BLOCK_N * BLOCK_N
    for start in range(first, full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, hi, pos,
                                     kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D, PAGE,
                                     BLOCK_N, 0, QUANT, SOFTCAP, ALIBI)
    for start in range(full, hi, BLOCK_N):  # at most one
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, hi, pos,
                                     kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D, PAGE,
                                     BLOCK_N, 1, QUANT, SOFTCAP, ALIBI)
    return acc, l_i, m_i


@triton.jit
def _alibi_slopes(al_ptr, head, ok, ALIBI: tl.constexpr):
    """The rows' ALiBi slopes in the scores' log2 units (ALIBI), else a placeholder nothing reads."""
    if ALIBI:
        return tl.load(al_ptr + head, mask=ok, other=0.0) * 1.4426950408889634  # log2(e)
    else:
        return 0.0


@triton.jit
def _window_start(ctx, window, BLOCK_N: tl.constexpr):
    """The first key tile (BLOCK_N-aligned) that a query at position ctx - 1 sees through its window."""
    return tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _find_seq(cu_ptr, pid, B, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile cu[b] // BLOCK_Q + b is <= pid (those starts strictly increase)."""
    lo: tl.int32 = 0
    hi: tl.int32 = B - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _query_tile(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, o_ptr, bt_row, q_start, q_len, tile, ctx, kv_head,
                qk_scale, softcap, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
                SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr):
    """BLOCK_Q query tokens x GROUP heads: unmasked tiles below the tile's first position, then causal ones. With a
    sliding window: tiles below every row's window skipped, those only some rows see masked (MASK 3), the causal
    ones masked by the window too."""
    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP  # token index within this step's queries of the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    pos = ctx - q_len + tok  # absolute position: sees keys 0..pos
    d = tl.arange(0, D)
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = _dot_operand(tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0), QUANT)
    qsum = tl.sum(q.to(tl.float32), 1)  # the 4-bit cache's min term (_attend_tile)
    slopes = _alibi_slopes(al_ptr, head, row_ok, ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    first_pos = ctx - q_len + tile * BLOCK_Q
    end = ctx - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # one past the last key any row sees
    interior = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles below this are visible to every row: no mask
    lo = 0  # the unmasked tiles' first
    if WINDOW:
        first = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N  # the first tile any row sees
        # from here every row's window holds the whole tile (the last row's window starts at end - window)
        lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(end - window, 0), BLOCK_N) * BLOCK_N, first), interior)
        for start in range(first, lo, BLOCK_N):
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, ctx,
                                         pos, kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D,
                                         PAGE, BLOCK_N, 3, QUANT, SOFTCAP, ALIBI)
    for start in range(lo, interior, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, ctx, pos,
                                     kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D, PAGE,
                                     BLOCK_N, 0, QUANT, SOFTCAP, ALIBI)
    for start in range(interior, end, BLOCK_N):  # causal (MASK 2), and in the window (MASK 3)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, ctx, pos,
                                     kv_head, qk_scale, softcap, window, slopes, stride_cb, stride_cs, stride_ch, D, PAGE,
                                     BLOCK_N, 2 + WINDOW, QUANT, SOFTCAP, ALIBI)
    out = acc / l_i[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _single_query(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, o_ptr, bt_row, t, ctx, kv_head, qk_scale, softcap,
                  window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                  ALIBI: tl.constexpr):
    """A decode token in a mixed batch: its GQA group (padded to 16) as the rows, all ctx keys visible. A full
    BLOCK_M query tile here would do BLOCK_M / GROUP times the tensor-core work for the same K/V bytes."""
    g = tl.arange(0, GROUP_P)
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, D)
    q = _dot_operand(tl.load(q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                             mask=g_ok[:, None], other=0.0), QUANT)
    qsum = tl.sum(q.to(tl.float32), 1)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    lo = 0
    if WINDOW:
        lo = _window_start(ctx, window, BLOCK_N)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, lo, ctx, ctx,
                                  kv_head, qk_scale, softcap, window, _alibi_slopes(al_ptr, head, g_ok, ALIBI),
                                  stride_cb, stride_cs, stride_ch, D, PAGE, BLOCK_N, QUANT, SOFTCAP, WINDOW, ALIBI)
    out = acc / l_i[:, None]
    o_off = t.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])


# batch and table width vary every step: no recompiles; softcap and window are a layer's, not specialized on either
@triton.jit(do_not_specialize=["B", "stride_bt", "softcap", "window"])
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, o_ptr, bt_ptr, ctx_ptr, cu_ptr, qk_scale, softcap,
                    window, B,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    DECODE_ROWS: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                    ALIBI: tl.constexpr):
    # Reversed: each sequence's last (longest) tiles are scheduled first, so the light ones fill the tail.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    b = _find_seq(cu_ptr, pid, B, BLOCK_Q)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + b)
    if tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    if DECODE_ROWS and q_len == 1:
        _single_query(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, o_ptr, bt_row, q_start, ctx, kv_head, qk_scale,
                      softcap, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                      GROUP, GROUP_P, D, PAGE, BLOCK_N, QUANT, SOFTCAP, WINDOW, ALIBI)
    else:
        _query_tile(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, o_ptr, bt_row, q_start, q_len, tile, ctx, kv_head,
                    qk_scale, softcap, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs,
                    stride_ch, GROUP, D, PAGE, BLOCK_M, BLOCK_Q, BLOCK_N, QUANT, SOFTCAP, WINDOW, ALIBI)


def _words(k_cache: torch.Tensor, v_cache: torch.Tensor, quant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels read: a 4-bit cache as int32 words (four bytes, eight values a load), the others as they are."""
    if quant == 4:
        return k_cache.view(torch.int32), v_cache.view(torch.int32)
    return k_cache, v_cache


def _slopes_arg(alibi: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """ALiBi's fp32 slopes, one per q head of this rank (a placeholder pointer without them)."""
    if alibi is None:
        return q
    assert alibi.dtype == torch.float32 and alibi.is_contiguous() and alibi.numel() == q.shape[1]
    return alibi


def _log2_cap(softcap: float) -> float:
    """The soft-cap in the kernels' log2 units of the scores (they run the softmax in base 2); 1.0 when off (unused)."""
    return softcap * LOG2E if softcap > 0 else 1.0


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    hq, d = q.shape[1], q.shape[2]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    assert hq % hkv == 0, "q heads must be a multiple of kv heads"
    assert d >= 16 and d & (d - 1) == 0, "head_dim must be a power of two >= 16"
    assert page & (page - 1) == 0, "block_size must be a power of two"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    return hq // hkv, hkv, d


_SMEM: dict[int, int] = {}


def _shared_memory(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM:
        props = torch.cuda.get_device_properties(idx)
        _SMEM[idx] = getattr(props, "shared_memory_per_block_optin", 0) or 160 * 1024
    return _SMEM[idx]


def _shrink(cfg: dict) -> dict | None:
    """The next smaller tiling: one pipeline stage fewer, else key tiles half as wide; None at the smallest."""
    if cfg["num_stages"] > 1:
        return {**cfg, "num_stages": cfg["num_stages"] - 1}
    if cfg["BLOCK_N"] > 16:
        return {**cfg, "BLOCK_N": cfg["BLOCK_N"] // 2}
    return None


def fit_shared_memory(cfg: dict, d: int, elem: int, device: torch.device, q_rows: int) -> dict:
    """Fewer pipeline stages (then narrower key tiles) until the query tile and the staged K/V tiles fit the GPU's
    shared memory: head_dim 256 (Gemma) in fp32 asks for 262 KB at the prefill tiles, the H200 has 227 KB. An
    estimate: Triton's own count can be higher (launch_fitting shrinks further on its refusal)."""
    if not device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return cfg
    limit = _shared_memory(device)
    while (q_rows * d + cfg["num_stages"] * 2 * cfg["BLOCK_N"] * d) * elem > limit:
        smaller = _shrink(cfg)
        if smaller is None:
            break
        cfg = smaller
    return cfg


_FITTED: dict[tuple, dict] = {}  # a launch's first config -> the one the GPU took (launch_fitting)


def launch_fitting(kernel, grid, cfg: dict, key: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, BLOCK_N=, num_stages=, **kwargs) at cfg, or at the first smaller tiling (_shrink) the
    GPU's shared memory holds, by Triton's own count (it refuses before launching, so a retry is safe); the
    tiling that fit is kept for the key, so each shape pays for the refusals once."""
    from triton.runtime.errors import OutOfResources

    cfg = _FITTED.get(key, cfg)
    while True:
        try:
            kernel[grid](*args, BLOCK_N=cfg["BLOCK_N"], num_stages=cfg["num_stages"], **kwargs)
            return
        except OutOfResources:
            smaller = _shrink(cfg)
            if smaller is None:
                raise
            cfg = _FITTED[key] = smaller


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal varlen attention of q [T, Hq, D] (any token/head strides) over the paged cache -> [T, Hq, D].
    With k_scale/v_scale the cache is int8 or 4-bit (see reference); softcap, window, alibi: as the reference's."""
    group, hkv, d = _check(q, k_cache, v_cache)
    quant = quant_bits(k_cache, k_scale, v_scale, d)
    T, B = q.shape[0], context_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    cfg = PREFILL_CONFIG if T >= MIXED_BELOW * B else MIXED_CONFIG  # python ints only: no sync
    if quant:
        cfg = {**cfg, **PREFILL_CONFIG_BY_QUANT.get(quant, {})}
    if q.element_size() == 4:  # fp32 tiles are twice the bytes: the bf16 tile size would spill registers
        cfg = {**cfg, "BLOCK_M": min(cfg["BLOCK_M"], 64)}
    cfg = fit_shared_memory(cfg, d, q.element_size(), q.device, q_rows=cfg["BLOCK_M"])
    block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (T // block_q + B, hkv)
    page = k_cache.shape[1]
    k_cache, v_cache = _words(k_cache, v_cache, quant)
    key = ("prefill", d, q.element_size(), quant, block_m, cfg["BLOCK_N"], cfg["num_stages"], q.device)
    launch_fitting(
        _prefill_kernel, grid, cfg, key,
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, _slopes_arg(alibi, q), out,
        block_tables,
        context_lens, cu_seqlens_q, scale * LOG2E, _log2_cap(softcap), int(window), B,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), D=d, PAGE=page, BLOCK_M=block_m,
        BLOCK_Q=block_q, DECODE_ROWS=cfg["DECODE_ROWS"], QUANT=quant,
        SOFTCAP=softcap > 0, WINDOW=window > 0, ALIBI=alibi is not None, num_warps=cfg["num_warps"])
    return out


@triton.jit(do_not_specialize=["stride_bt", "NUM_SPLITS", "softcap", "window"])
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, al_ptr, bt_ptr, ctx_ptr, o_ptr, mo_ptr, mlse_ptr,
                         cnt_ptr, qk_scale, softcap, window,
                         stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                         NUM_SPLITS, GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, QUANT: tl.constexpr,
                         USE_PDL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr,
                         PREWAIT: tl.constexpr, FUSED_MERGE: tl.constexpr, SPLITS_P: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Until wait_for_previous only what no kernel of the step writes: the lengths and block tables (copied in before
    # the step) and, with PREWAIT, the first tile of K/V, all but its newest row (the kernel before stores that one).
    ctx = tl.load(ctx_ptr + b)
    if WINDOW:  # the splits share out the window's tiles only
        base = _window_start(ctx, window, BLOCK_N)
        split_len = tl.cdiv(tl.cdiv(ctx - base, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = base + split * split_len
    else:
        split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)

    g = tl.arange(0, GROUP_P)  # the q heads of this kv head, padded to a tl.dot-able 16 rows
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    q_row = q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    d = tl.arange(0, D)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    if PREWAIT:
        # (like: unused, an unquantized tile is not converted; q is not loaded yet)
        k, v, page, n, n_ok = _load_tile(kc_ptr, vc_ptr, bt_row, lo, hi, kv_head, 0.0, stride_cb, stride_cs,
                                         stride_ch, D, PAGE, BLOCK_N, 1, QUANT)
        newest = ctx - 1
        new_off = (tl.load(bt_row + newest // PAGE).to(tl.int64) * stride_cb + (newest % PAGE) * stride_cs
                   + kv_head * stride_ch)
        wait_for_previous(USE_PDL)
        q = tl.load(q_row + d[None, :], mask=g_ok[:, None], other=0.0)
        is_new = (n == newest)[:, None]
        k = tl.where(is_new, tl.load(kc_ptr + new_off + d)[None, :], k)
        v = tl.where(is_new, tl.load(vc_ptr + new_off + d)[None, :], v)
        slopes = _alibi_slopes(al_ptr, head, g_ok, ALIBI)
        if lo < hi:  # an empty split's tile stays out: its scores would all be -inf
            pos = tl.zeros([GROUP_P], tl.int32) + newest
            acc, l_i, m_i = _update_tile(acc, l_i, m_i, q, q, k, v, page, ks_ptr, vs_ptr, n, n_ok, pos, kv_head,
                                         qk_scale, softcap, window, slopes, PAGE, 1 + 2 * WINDOW, QUANT, SOFTCAP,
                                         ALIBI)
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                                      tl.minimum(lo + BLOCK_N, hi), hi, ctx, kv_head, qk_scale, softcap, window,
                                      slopes, stride_cb, stride_cs, stride_ch, D, PAGE, BLOCK_N, QUANT, SOFTCAP,
                                      WINDOW, ALIBI)
    else:
        wait_for_previous(USE_PDL)
        q = _dot_operand(tl.load(q_row + d[None, :], mask=g_ok[:, None], other=0.0), QUANT)
        qsum = tl.sum(q.to(tl.float32), 1)  # the 4-bit cache's min term
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, qsum, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, lo, hi, ctx,
                                      kv_head, qk_scale, softcap, window, _alibi_slopes(al_ptr, head, g_ok, ALIBI),
                                      stride_cb, stride_cs, stride_ch, D, PAGE, BLOCK_N, QUANT, SOFTCAP, WINDOW, ALIBI)
    _write_decode(acc, l_i, m_i, d, b, head, g_ok, split, o_ptr, mo_ptr, mlse_ptr, stride_ob, stride_oh,
                  NUM_SPLITS, GROUP, D, SPLIT)
    if FUSED_MERGE:  # the last split of (b, kv head) to finish merges them all: no second kernel
        tl.debug_barrier()  # every thread's partial stored before the count says so (the atomic releases them)
        slot = cnt_ptr + b * tl.num_programs(1) + kv_head
        if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            tl.store(slot, 0)  # zero again for the next launch (graph replays reuse the counters)
            for j in tl.static_range(GROUP):
                h = kv_head * GROUP + j
                row = (b * (GROUP * tl.num_programs(1)) + h).to(tl.int64) * NUM_SPLITS
                _merge_splits(mo_ptr, mlse_ptr, o_ptr, row, b.to(tl.int64) * stride_ob + h * stride_oh, NUM_SPLITS,
                              D, SPLITS_P)


@triton.jit
def _write_decode(acc, l_i, m_i, cols, b, head, g_ok, split, o_ptr, mo_ptr, mlse_ptr, stride_ob, stride_oh,
                  NUM_SPLITS, GROUP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr):
    """Output columns `cols` of a split's rows: final (a single split), or the partial result, normalised, with its
    log2-sum-exp2 for the reduce pass (an empty split, past ctx, gets weight 0)."""
    if not SPLIT:
        out = acc / l_i[:, None]
        o_off = b.to(tl.int64) * stride_ob + head * stride_oh
        tl.store(o_ptr + o_off[:, None] + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (b * (GROUP * tl.num_programs(1)) + head).to(tl.int64) * NUM_SPLITS + split  # [B, Hq, S] index
        tl.store(mo_ptr + row[:, None] * D + cols[None, :], out, mask=g_ok[:, None])
        tl.store(mlse_ptr + row, lse, mask=g_ok)


@triton.jit
def _merge_splits(mo_ptr, mlse_ptr, o_ptr, row, o_off, NUM_SPLITS, D: tl.constexpr, SPLITS_P: tl.constexpr):
    """One head's output from its splits' partials (rows row .. row + NUM_SPLITS of the [B, H, S] buffers). The
    loads bypass L1: in the fused path they read what other SMs have just written."""
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D)
    lse = tl.load(mlse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf"), cache_modifier=".cg")
    # Every split's row loaded at once, not masked by its lse (which would wait for that load first); an empty
    # split's, never written, may hold anything and is dropped by the where.
    parts = tl.load(mo_ptr + (row + s)[:, None] * D + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0,
                    cache_modifier=".cg")
    live = lse > float("-inf")
    w = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.where(live[:, None], parts, 0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    tl.store(o_ptr + o_off + d, out.to(o_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _decode_reduce_kernel(mo_ptr, mlse_ptr, o_ptr, stride_ob, stride_oh, NUM_SPLITS,
                          D: tl.constexpr, SPLITS_P: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * tl.num_programs(1) + h).to(tl.int64) * NUM_SPLITS
    _merge_splits(mo_ptr, mlse_ptr, o_ptr, row, b.to(tl.int64) * stride_ob + h * stride_oh, NUM_SPLITS, D, SPLITS_P)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_num_splits(batch: int, kv_heads: int, max_context_len: int, device: torch.device,
                      cfg: dict | None = None) -> int:
    """Enough (seq, kv head, split) programs for ~2 waves over the SMs, but no split under MIN_SPLIT_TOKENS keys."""
    cfg = cfg or DECODE_CONFIG
    want = triton.cdiv(2 * _sm_count(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_context_len, cfg["MIN_SPLIT_TOKENS"]), cfg["MAX_SPLITS"]))


_COUNTERS: dict[int, torch.Tensor] = {}
MERGE_COUNTERS = 1 << 16  # (sequence, kv head) pairs a fused decode launch can count; past that, the reduce kernel


def merge_counters(device: torch.device, pairs: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one per (sequence, kv head), that the fused merge counts finished splits in (and zeroes
    again). One buffer per device, made before any graph capture (the warm-up's first launch): the decode launches of
    a device run one after another in stream order, so they can share it. None where the pairs do not fit (or,
    never expected, where a capture would have to make the buffer). Under the interpreter, on CPU tensors, the
    programs run one by one and the same counting picks the last."""
    if pairs > MERGE_COUNTERS:
        return None
    idx = -1 if device.type != "cuda" else device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[idx] = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[idx]


def split_buffers(out: torch.Tensor, splits: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's partial output [B, H, splits, width] and log-sum-exp [B, H, splits] for _decode_reduce_kernel
    (out itself, unused, with one split)."""
    if splits == 1:
        return out, out
    B, H = out.shape[:2]
    return (torch.empty((B, H, splits, width), dtype=torch.float32, device=out.device),
            torch.empty((B, H, splits), dtype=torch.float32, device=out.device))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context_len: int | None = None,
                           *, num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, softcap: float = 0.0, window: int = 0,
                           alibi: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] -> [B, Hq, D]. CUDA-graph safe: no sync, value-independent grids.

    max_context_len only sizes the split count (default: the block table's capacity, an upper bound that needs no
    sync); each sequence's real length is read on the device, so a graph captured at the bound stays correct.
    num_splits overrides the split count (tests, benchmarks). softcap, window, alibi: as the reference's; a window
    shares out only its own tiles among the splits (and sizes their count by itself, not the bound).
    """
    group, hkv, d = _check(q, k_cache, v_cache)
    quant = quant_bits(k_cache, k_scale, v_scale, d)
    B, hq = q.shape[0], q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    cfg = {**DECODE_CONFIG, **DECODE_CONFIG_BY_QUANT.get(quant, {})} if quant else DECODE_CONFIG
    cfg = fit_shared_memory(cfg, d, q.element_size(), q.device, q_rows=max(16, triton.next_power_of_2(group)))
    bound = max_context_len if max_context_len is not None else block_tables.shape[1] * k_cache.shape[1]
    if window > 0:
        bound = min(int(bound), int(window) + cfg["BLOCK_N"])  # python ints: the split count stays value-independent
    splits = num_splits or decode_num_splits(B, hkv, int(bound), q.device, cfg)
    if splits >= MANY_SPLITS:  # each program attends a tile or few: a third stage buys nothing, costs shared memory
        cfg = {**cfg, "num_stages": min(cfg["num_stages"], 2)}
    mid_o, mid_lse = split_buffers(out, splits, d)
    page = k_cache.shape[1]
    k_cache, v_cache = _words(k_cache, v_cache, quant)
    counts = merge_counters(q.device, B * hkv) if splits > 1 else None
    fused = counts is not None and os.environ.get("CLUSTER_ATTN_FUSED_MERGE", "0") == "1"
    _decode_split_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, _slopes_arg(alibi, q),
        block_tables, context_lens, out, mid_o, mid_lse, counts if fused else out, scale * LOG2E, _log2_cap(softcap),
        int(window),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        splits, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), D=d, PAGE=page,
        BLOCK_N=cfg["BLOCK_N"], SPLIT=splits > 1, QUANT=quant, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], SOFTCAP=softcap > 0, WINDOW=window > 0, ALIBI=alibi is not None,
        PREWAIT=not quant and os.environ.get("CLUSTER_ATTN_PREWAIT", "0") == "1", FUSED_MERGE=fused,
        SPLITS_P=triton.next_power_of_2(splits), **pdl.launch_args(q))
    if splits > 1 and not fused:
        _decode_reduce_kernel[(B, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), splits, D=d,
                                       SPLITS_P=triton.next_power_of_2(splits), num_warps=4, **pdl.launch_args(q))
    return out
