"""Triton neox-style rotary embedding, applied in place to q and k (one program per token, all heads)."""
import torch
import triton
import triton.language as tl


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
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   HQ, HK, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate(q_ptr, stride_qt, stride_qh, t, HQ, cos, sin, BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate(k_ptr, stride_kt, stride_kh, t, HK, cos, sin, BLOCK_HK, HALF, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] IN PLACE (any token/head strides) and return them.

    In place because q and k are views of the fresh qkv projection: rewriting them saves an allocation and a copy.
    """
    T, HQ, D = q.shape
    HK = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.stride(1) == 1 and D % 2 == 0
    if T:
        _rotary_kernel[(T,)](q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             cos_sin.stride(0), HQ, HK, BLOCK_HQ=triton.next_power_of_2(HQ),
                             BLOCK_HK=triton.next_power_of_2(HK), HALF=D // 2,
                             BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4)
    return q, k
