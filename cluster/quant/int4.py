"""4-bit weights with a scale and zero point per group of input channels (W4A16), in three layouts:

* unpacked, for slicing over tensor-parallel ranks: q uint8 [out, in] (0..15), zeros and scales [out, in / group];
* the engine's: qweight uint8 [out, in / 2] (input channel 2j in the low nibble, 2j + 1 in the high one), the same
  zeros and scales, in the model dtype. Read as little-endian int32 words [out, in / 8] it packs 8 input channels
  a word along K (channel 8j + i in nibble i of word j), which is how the GPU kernels load it (kernels/w4a16.py);
* AutoAWQ's GEMM checkpoints (what `-AWQ` models on the Hub ship): qweight int32 [in, out / 8] with eight output
  channels a word in the order 0 2 4 6 1 3 5 7, qzeros int32 [in / group, out / 8] likewise, scales [in / group, out].

The weight is (q - zero) * scale."""
from __future__ import annotations

import torch

BITS = 4
QMAX = (1 << BITS) - 1
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output channel AWQ_ORDER[i] of its 8


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, asymmetric min-max per group (as AutoAWQ): w [out, in] -> q, zeros, scales."""
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"input features {in_f} are not a multiple of the group size {group}")
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo).clamp(min=1e-5) / QMAX)
    zeros = (-torch.round(lo / scales)).clamp(0, QMAX)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, QMAX)
    return q.reshape(out_f, in_f).to(torch.uint8), zeros, scales


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Unpacked q [out, in] -> the weight [out, in]."""
    out_f, in_f = q.shape
    group = in_f // scales.shape[1]
    w = (q.float().reshape(out_f, -1, group) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Unpacked q [out, in] -> the engine's qweight [out, in / 2]."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """The engine's qweight [out, in / 2] -> q [out, in]."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def to_awq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked -> AutoAWQ GEMM tensors (qweight, qzeros, scales fp16)."""
    def words(x: torch.Tensor) -> torch.Tensor:  # [rows, out] (0..15) -> int32 [rows, out / 8]
        x = x.to(torch.int32).reshape(x.shape[0], -1, 8)
        packed = torch.zeros(x.shape[:2], dtype=torch.int32)
        for i, c in enumerate(AWQ_ORDER):
            packed |= x[..., c] << (BITS * i)
        return packed

    return words(q.t()), words(zeros.round().t()), scales.t().to(torch.float16).contiguous()


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors -> unpacked (q [out, in] uint8, zeros, scales [out, in / group] fp32)."""
    def values(words: torch.Tensor) -> torch.Tensor:  # int32 [rows, out / 8] -> [rows, out]
        cols = [None] * 8
        for i, c in enumerate(AWQ_ORDER):
            cols[c] = (words >> (BITS * i)) & QMAX
        return torch.stack(cols, dim=-1).reshape(words.shape[0], -1)

    if qweight.dtype != torch.int32 or qweight.shape[1] * 8 != scales.shape[1]:
        raise ValueError("not an AutoAWQ GEMM checkpoint (qweight must be int32 [in, out / 8]); "
                         "only version 'gemm', 4 bits, is read")
    return values(qweight).t().to(torch.uint8).contiguous(), values(qzeros).t().float().contiguous(), \
        scales.t().float().contiguous()
