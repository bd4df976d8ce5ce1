"""Triton scatter of this step's K/V into the paged cache (see reference.store_kvcache for the semantics), and the
int8 row quantization shared with the rotary kernel's store."""
import torch
import triton
import triton.language as tl

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
def _store_rows(x, cache_ptr, scale_ptr, dst, srow, mask, QUANT: tl.constexpr):
    """Store rows x [H, D] at dst; QUANT: as int8 with their scales at srow [H] (mask [H, D])."""
    if QUANT:
        xf = x.to(tl.float32)
        scale = row_scale(tl.max(tl.where(mask, tl.abs(xf), 0.0), axis=1))
        tl.store(cache_ptr + dst, to_int8(xf, scale), mask=mask)
        tl.store(scale_ptr + srow, scale, mask=tl.max(mask.to(tl.int32), axis=1) > 0)
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
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
    srow = slot * H + tl.arange(0, BLOCK_H)  # scales: [num_blocks, PAGE, H] contiguous
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    _store_rows(k, kc_ptr, ks_ptr, dst, srow, mask, QUANT)
    _store_rows(v, vc_ptr, vs_ptr, dst, srow, mask, QUANT)


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
    quant = k_scale is not None
    if quant:
        assert k_scale.is_contiguous() and v_scale.is_contiguous() and k_scale.shape == k_cache.shape[:3]
    _store_kvcache_kernel[(T,)](
        k, v, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=H, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), PAGE=k_cache.shape[1],
        QUANT=quant, num_warps=4)
