"""Triton neox-style rotary embedding fused with the store of this step's K/V into the paged cache (one program per
token, all heads): q is rotated in place, k is rotated on its way into the cache."""
import torch
import triton
import triton.language as tl

from cluster.kernels import pdl
from cluster.kernels.kvcache import FP8, quant_bits, row_scale, scale_index, store_int4_rows, to_fp8, to_int8
from cluster.kernels.pdl import wait_for_previous


@triton.jit
def _rotate(ptr, stride_t, stride_h, t, H, cos, sin, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (d < HALF)
    p1 = ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_int8_halves(x1, x2, cache_ptr, scale_ptr, dst, srow, mask, HALF: tl.constexpr):
    """Store a row given as its two halves [H, HALF] (fp32) as int8, one scale for the whole row."""
    amax = tl.maximum(tl.max(tl.where(mask, tl.abs(x1), 0.0), axis=1),
                      tl.max(tl.where(mask, tl.abs(x2), 0.0), axis=1))
    scale = row_scale(amax)
    tl.store(cache_ptr + dst, to_int8(x1, scale), mask=mask)
    tl.store(cache_ptr + dst + HALF, to_int8(x2, scale), mask=mask)
    tl.store(scale_ptr + srow, scale, mask=tl.max(mask.to(tl.int32), axis=1) > 0)


@triton.jit
def _rotate_store_int4(k_ptr, v_ptr, cs_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, t, pos, slot, h, stride_kt, stride_kh,
                       stride_vt, stride_vh, stride_cs, stride_cb, stride_cslot, stride_ch, HK,
                       BLOCK_HK: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE: tl.constexpr):
    """The 4-bit store (kvcache.store_int4_rows): values taken in (even, odd) pairs of each half, rotated there."""
    j = tl.arange(0, BLOCK_HALF // 2)[None, :]
    de = 2 * j
    j_ok = j < HALF // 2
    mask = (h < HK) & j_ok
    cs = cs_ptr + pos * stride_cs + de
    ce, co = tl.load(cs, mask=j_ok, other=0.0).to(tl.float32), tl.load(cs + 1, mask=j_ok, other=0.0).to(tl.float32)
    se = tl.load(cs + HALF, mask=j_ok, other=0.0).to(tl.float32)
    so = tl.load(cs + HALF + 1, mask=j_ok, other=0.0).to(tl.float32)
    kb = k_ptr + t * stride_kt + h * stride_kh + de
    k1e, k1o = tl.load(kb, mask=mask, other=0.0).to(tl.float32), tl.load(kb + 1, mask=mask, other=0.0).to(tl.float32)
    k2e = tl.load(kb + HALF, mask=mask, other=0.0).to(tl.float32)
    k2o = tl.load(kb + HALF + 1, mask=mask, other=0.0).to(tl.float32)
    in_ty = k_ptr.dtype.element_ty  # the rotated key rounded to the model dtype, as the reference's
    r1e, r1o = (k1e * ce - k2e * se).to(in_ty).to(tl.float32), (k1o * co - k2o * so).to(in_ty).to(tl.float32)
    r2e, r2o = (k2e * ce + k1e * se).to(in_ty).to(tl.float32), (k2o * co + k1o * so).to(in_ty).to(tl.float32)
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cslot + h * stride_ch + j
    srow = scale_index(slot, tl.arange(0, BLOCK_HK), HK, PAGE)
    store_int4_rows(r1e, r1o, r2e, r2o, kc_ptr, ks_ptr, dst, srow, mask, HALF // 2)
    vb = v_ptr + t * stride_vt + h * stride_vh + de
    store_int4_rows(tl.load(vb, mask=mask, other=0.0).to(tl.float32), tl.load(vb + 1, mask=mask, other=0.0).to(tl.float32),
                    tl.load(vb + HALF, mask=mask, other=0.0).to(tl.float32),
                    tl.load(vb + HALF + 1, mask=mask, other=0.0).to(tl.float32), vc_ptr, vs_ptr, dst, srow, mask,
                    HALF // 2)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                         stride_cb, stride_cslot, stride_ch, HQ, HK,
                         BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate(q_ptr, stride_qt, stride_qh, t, HQ, cos, sin, BLOCK_HQ, HALF, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # -1: a padding token (a CUDA-graph batch slot), nothing to store
        h = tl.arange(0, BLOCK_HK)[:, None]
        mask = (h < HK) & (d < HALF)
        kp = k_ptr + t * stride_kt + h * stride_kh + d
        k1 = tl.load(kp, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mask, other=0.0).to(tl.float32)
        vp = v_ptr + t * stride_vt + h * stride_vh + d
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cslot + h * stride_ch + d
        if QUANT == 4:
            _rotate_store_int4(k_ptr, v_ptr, cs_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, t, pos, slot, h, stride_kt,
                               stride_kh, stride_vt, stride_vh, stride_cs, stride_cb, stride_cslot, stride_ch, HK,
                               BLOCK_HK, HALF, BLOCK_HALF, PAGE)
        elif QUANT == 8:
            srow = scale_index(slot, tl.arange(0, BLOCK_HK), HK, PAGE)  # scales: [num_blocks, HK, PAGE]
            in_ty = k_ptr.dtype.element_ty  # the rotated key rounded to the model dtype, as the reference's
            r1 = (k1 * cos - k2 * sin).to(in_ty).to(tl.float32)
            r2 = (k2 * cos + k1 * sin).to(in_ty).to(tl.float32)
            _store_int8_halves(r1, r2, kc_ptr, ks_ptr, dst, srow, mask, HALF)
            v1 = tl.load(vp, mask=mask, other=0.0).to(tl.float32)
            v2 = tl.load(vp + HALF, mask=mask, other=0.0).to(tl.float32)
            _store_int8_halves(v1, v2, vc_ptr, vs_ptr, dst, srow, mask, HALF)
        elif QUANT == FP8:
            heads = tl.arange(0, BLOCK_HK)
            k_hs = tl.load(ks_ptr + heads, mask=heads < HK, other=1.0)  # [HK]: each head's scale
            v_hs = tl.load(vs_ptr + heads, mask=heads < HK, other=1.0)
            in_ty = k_ptr.dtype.element_ty
            r1 = (k1 * cos - k2 * sin).to(in_ty).to(tl.float32)
            r2 = (k2 * cos + k1 * sin).to(in_ty).to(tl.float32)
            tl.store(kc_ptr + dst, to_fp8(r1, k_hs), mask=mask)
            tl.store(kc_ptr + dst + HALF, to_fp8(r2, k_hs), mask=mask)
            tl.store(vc_ptr + dst, to_fp8(tl.load(vp, mask=mask, other=0.0).to(tl.float32), v_hs), mask=mask)
            tl.store(vc_ptr + dst + HALF, to_fp8(tl.load(vp + HALF, mask=mask, other=0.0).to(tl.float32), v_hs),
                     mask=mask)
        else:
            out_ty = kc_ptr.dtype.element_ty
            tl.store(kc_ptr + dst, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty).to(out_ty), mask=mask)
            tl.store(kc_ptr + dst + HALF, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty).to(out_ty), mask=mask)
            tl.store(vc_ptr + dst, tl.load(vp, mask=mask).to(out_ty), mask=mask)
            tl.store(vc_ptr + dst + HALF, tl.load(vp + HALF, mask=mask).to(out_ty), mask=mask)


def rotary_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q IN PLACE and return it; rotate k straight into its cache slot and copy v beside it (k itself is
    left as it was: attention reads keys from the cache). One launch where rotary and store_kvcache would take two."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and cos_sin.stride(1) == 1 and D % 2 == 0
    assert k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    quant = quant_bits(k_cache, k_scale, v_scale, D)
    if T:
        _rotary_store_kernel[(T,)](
            q, k, v, positions, cos_sin, k_cache, v_cache, k_scale if quant else k_cache,
            v_scale if quant else v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HQ, HK,
            BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK), HALF=D // 2,
            BLOCK_HALF=triton.next_power_of_2(D // 2), PAGE=k_cache.shape[1], QUANT=quant, num_warps=4,
            **pdl.launch_args(q))
    return q
