"""Triton scatter of this step's K/V into the paged cache (see reference.store_kvcache for the semantics), and the
row quantizations (int8, 4-bit, fp8) shared with the rotary kernel's store.

The kernels' QUANT constant: 0 the model dtype, 8 int8 rows, 4 4-bit rows, FP8 e4m3 with a scale per kv head."""
import torch
import triton
import triton.language as tl

FP8 = tl.constexpr(1)
FP8_MAX = tl.constexpr(448.0)  # cluster.quant.fp8.FP8_MAX


@triton.jit
def scale_index(slot, h, H, PAGE: tl.constexpr):
    """Index of the scale of (slot, head h) in a [num_blocks, H, PAGE] scale array (reference.py's layout)."""
    return ((slot // PAGE) * H + h) * PAGE + slot % PAGE


@triton.jit
def to_fp8(x, head_scale):
    """x fp32 [H, D] over its head's scale [H], saturated (an out-of-range cast is NaN), as e4m3."""
    return tl.clamp(x / head_scale[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)


@triton.jit
def row_scale(amax):
    """Scale of a row whose largest |value| is amax (reference.quantize_int8)."""
    return tl.maximum(amax, 1e-6) / 127.0  # reference.MIN_AMAX, reference.INT8_MAX


@triton.jit
def to_int8(x, scale):
    """x / scale rounded half away from zero, as int8 (x fp32 [H, D], scale [H])."""
    y = x / scale[:, None]
    y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int32)
    return tl.minimum(tl.maximum(y, -127), 127).to(tl.int8)


@triton.jit
def store_int4_rows(ae, ao, be, bo, cache_ptr, param_ptr, dst, srow, mask, QUARTER: tl.constexpr):
    """Store rows [H, D] given as the even/odd values of their first half (ae, ao) and of their second half (be, bo),
    each [H, D / 4] fp32, as 4-bit: bytes [dst, dst + D / 4) hold the first half, the next D / 4 the second (value
    2j in the low nibble of byte j); (scale, min) of each row at param_ptr + 2 * srow (reference.quantize_int4)."""
    big = float("inf")
    lo = tl.minimum(tl.minimum(tl.min(tl.where(mask, ae, big), 1), tl.min(tl.where(mask, ao, big), 1)),
                    tl.minimum(tl.min(tl.where(mask, be, big), 1), tl.min(tl.where(mask, bo, big), 1)))
    hi = tl.maximum(tl.maximum(tl.max(tl.where(mask, ae, -big), 1), tl.max(tl.where(mask, ao, -big), 1)),
                    tl.maximum(tl.max(tl.where(mask, be, -big), 1), tl.max(tl.where(mask, bo, -big), 1)))
    scale = tl.maximum(hi - lo, 1e-6) / 15.0  # reference.MIN_AMAX, reference.INT4_MAX
    tl.store(cache_ptr + dst, _nibbles(ae, ao, lo, scale), mask=mask)
    tl.store(cache_ptr + dst + QUARTER, _nibbles(be, bo, lo, scale), mask=mask)
    row_ok = tl.max(mask.to(tl.int32), axis=1) > 0
    tl.store(param_ptr + 2 * srow, scale, mask=row_ok)
    tl.store(param_ptr + 2 * srow + 1, lo, mask=row_ok)


@triton.jit
def _nibbles(xe, xo, lo, scale):
    """Two values a byte: round((x - min) / scale) in 0..15 (x >= min, so +0.5 and truncation round half up)."""
    qe = tl.minimum(((xe - lo[:, None]) / scale[:, None] + 0.5).to(tl.int32), 15)
    qo = tl.minimum(((xo - lo[:, None]) / scale[:, None] + 0.5).to(tl.int32), 15)
    return (qe | (qo << 4)).to(tl.uint8)


@triton.jit
def _store_int4_token(row, cache_ptr, param_ptr, dst, srow, mask, D: tl.constexpr):
    """row: pointers to values 2j of each head's row, j < D / 4."""
    store_int4_rows(tl.load(row, mask=mask).to(tl.float32), tl.load(row + 1, mask=mask).to(tl.float32),
                    tl.load(row + D // 2, mask=mask).to(tl.float32), tl.load(row + D // 2 + 1, mask=mask).to(tl.float32),
                    cache_ptr, param_ptr, dst, srow, mask, D // 4)


@triton.jit
def _store_rows(x, cache_ptr, scale_ptr, dst, srow, heads, H, mask, QUANT: tl.constexpr):
    """Store rows x [H, D] at dst (mask [H, D]); QUANT 8: as int8 with their scales at srow [H]; FP8: as e4m3 over
    the scales of `heads` [H]."""
    if QUANT == 8:
        xf = x.to(tl.float32)
        scale = row_scale(tl.max(tl.where(mask, tl.abs(xf), 0.0), axis=1))
        tl.store(cache_ptr + dst, to_int8(xf, scale), mask=mask)
        tl.store(scale_ptr + srow, scale, mask=tl.max(mask.to(tl.int32), axis=1) > 0)
    elif QUANT == FP8:
        head_scale = tl.load(scale_ptr + heads, mask=heads < H, other=1.0)
        tl.store(cache_ptr + dst, to_fp8(x.to(tl.float32), head_scale), mask=mask)
    else:
        tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kvcache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_cb, stride_cs, stride_ch,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                          PAGE: tl.constexpr, QUANT: tl.constexpr):
    # One program per token: all Hkv*D values of K and V go to one slot, so the slot id is read once.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch slot): nothing to store
        return
    heads = tl.arange(0, BLOCK_H)
    h = heads[:, None]
    srow = scale_index(slot, heads, H, PAGE)
    if QUANT == 4:  # pairs (2j, 2j + 1) of each half of the row, packed into bytes
        j = tl.arange(0, BLOCK_D // 4)[None, :]
        mask = (h < H) & (j < D // 4)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + j
        _store_int4_token(k_ptr + t * stride_kt + h * stride_kh + 2 * j, kc_ptr, ks_ptr, dst, srow, mask, D)
        _store_int4_token(v_ptr + t * stride_vt + h * stride_vh + 2 * j, vc_ptr, vs_ptr, dst, srow, mask, D)
    else:
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        _store_rows(k, kc_ptr, ks_ptr, dst, srow, heads, H, mask, QUANT)
        _store_rows(v, vc_ptr, vs_ptr, dst, srow, heads, H, mask, QUANT)


def quant_bits(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, D: int) -> int:
    """The kernels' QUANT: 0 (model dtype), 8 (int8 cache), 4 (uint8 cache, two values a byte) or FP8 (e4m3
    cache), with the scales' shapes checked against reference.py's layouts."""
    if k_scale is None:
        return 0
    assert k_scale.is_contiguous() and v_scale is not None and v_scale.is_contiguous()
    nb, page, hkv = k_cache.shape[:3]
    if k_cache.dtype == torch.float8_e4m3fn:
        assert tuple(k_scale.shape) == (hkv,) == tuple(v_scale.shape) and k_cache.shape[3] == D
        return FP8.value
    bits = 4 if k_cache.dtype == torch.uint8 else 8
    want = (nb, hkv, page) + ((2,) if bits == 4 else ())
    assert tuple(k_scale.shape) == want == tuple(v_scale.shape) and k_cache.shape[3] * (2 if bits == 4 else 1) == D
    return bits


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write K/V [T, Hkv, D] (any token/head strides, contiguous head dim) into their slots; slot -1 is skipped.

    Unlike the reference there is no boolean filtering, so no host sync: safe inside a CUDA graph.
    """
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    quant = quant_bits(k_cache, k_scale, v_scale, D)
    _store_kvcache_kernel[(T,)](
        k, v, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=H, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), PAGE=k_cache.shape[1],
        QUANT=quant, num_warps=4)
