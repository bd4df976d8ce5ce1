"""FP8 (e4m3) weights with one fp32 scale per output channel, activations quantized per token at run time (W8A8).

e4m3 (torch.float8_e4m3fn) holds +-448 with a 3-bit mantissa: about 2 significant decimal digits at every
magnitude, which is why one scale per output row is enough for weights (no groups, no zero points). Values are
clamped to +-448 before the cast: torch's cast of an out-of-range value is NaN on some versions (and on the GPU).

The weight is q.float() * scale[:, None]. Checkpoints that scale 128 x 128 blocks (DeepSeek-V3, Qwen3-FP8:
`weight_scale_inv`) are read by `from_blocks`, which dequantizes them and rounds again per output channel: a
second rounding, so such a model is not bit-identical to its checkpoint (the error stays within one e4m3 step).
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
BLOCK = 128  # the block side of DeepSeek-V3 / Qwen3-FP8 checkpoints


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to e4m3's range, then cast (an out-of-range cast may be NaN)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q e4m3 [out, in], scale fp32 [out]) with max |w| of each row at 448."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8(w / scale[:, None]), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of activations: x [M, K] -> (q e4m3 [M, K], scale fp32 [M, 1])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8(x / scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [out, in] e4m3 and scale [out] (or [out, 1], or one per tensor) -> the weight in `dtype`."""
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    return (q.float() * s).to(dtype)


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
                      ) -> torch.Tensor:
    """q [out, in] and one scale per block [ceil(out / bo), ceil(in / bi)] (multiplied, despite the name
    `weight_scale_inv` the checkpoints give it) -> the fp32 weight."""
    bo, bi = block
    out_f, in_f = q.shape
    want = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"block scales of shape {tuple(scale_inv.shape)} do not tile a [{out_f}, {in_f}] weight in "
                         f"{bo} x {bi} blocks (expected {want}); the checkpoint's weight_block_size is wrong")
    s = scale_inv.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out_f, :in_f]
    return q.float() * s


def from_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-scaled weight -> per-channel (q, scale): dequantized, then rounded again per output row."""
    return quantize_weight(dequantize_blocks(q, scale_inv, block))


def check_device(device: torch.device, what: str = "FP8", fix: str = "--quant awq or no --quant") -> None:
    """e4m3 (FP8 weights, the fp8 KV cache) needs Ada or Hopper; say so in one line, with the ways out, on an
    older GPU."""
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if tuple(cc) < (8, 9):
        raise ValueError(f"{what} needs compute capability >= 8.9 (Ada/Hopper); this GPU is {cc[0]}.{cc[1]}: use "
                         f"{fix}")


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference (CPU) FP8 linear: the weight dequantized to x's dtype, then one dense matmul (W8A16, exact
    against a full-precision model holding the dequantized weights)."""
    return torch.nn.functional.linear(x, dequantize(q, scale, x.dtype), bias)
