"""Each attention head's dimensions rearranged at conversion so that one kernel layout serves every family: the
engine rotates neox-style (dim j with dim j + D/2, over the whole head) and its Triton attention needs a
power-of-two head_dim.

- Partial rotary (GLM, Phi-4-mini: only the first R dims rotate) and interleaved pairs (GLM, ChatGLM: dim 2j with
  2j + 1): q and k rows are permuted so rotary pair j lands on (j, j + P/2), and the dims that do not rotate sit
  where the stored frequency is 0 (cos 1, sin 0: left exactly as they are).
- A head_dim that is not a power of two (Phi-3-mini's 96) is padded to one with zero rows of q, k and v; q . k is
  unchanged, and the model drops the padded output dims before o_proj.

The same permutation applied to q and k leaves every q . k (the only thing attention reads of them) unchanged, and
it only moves and adds rows, so it applies alike to the quantized views the converter reads (4-bit q values, zeros
and scales; e4m3 values and scales).
"""
from __future__ import annotations

import torch

from cluster.models.config import ModelConfig


def padded_dim(head_dim: int) -> int:
    """The engine's head_dim for a checkpoint's: the next power of two, at least 16 (what the kernels take)."""
    p = 16
    while p < head_dim:
        p *= 2
    return p


def qk_order(src: int, rotary: int, interleaved: bool, dim: int) -> list[int]:
    """For each of the engine head's `dim` positions, the checkpoint's dimension that goes there (-1: a zero pad)."""
    half, r2 = dim // 2, rotary // 2
    order = [-1] * dim
    for j in range(r2):
        order[j], order[half + j] = (2 * j, 2 * j + 1) if interleaved else (j, r2 + j)
    free = [j for j in range(r2, half)] + [half + j for j in range(r2, half)]  # frequency 0 there
    for slot, d in zip(free, range(rotary, src)):
        order[slot] = d
    return order


def is_identity(cfg: ModelConfig) -> bool:
    src = cfg.src_head_dim
    return cfg.head_dim == src and (cfg.rotary_dim in (0, src)) and not cfg.rope_interleaved


def rows(x: torch.Tensor, heads: int, src: int, order: list[int]) -> torch.Tensor:
    """x [heads * src, ...] -> [heads * len(order), ...], each head's rows taken in `order` (-1: zeros)."""
    h = x.reshape(heads, src, *x.shape[1:])
    idx = torch.tensor([max(o, 0) for o in order], device=x.device)
    out = h.index_select(1, idx)
    pad = torch.tensor([o < 0 for o in order], device=x.device)
    if bool(pad.any()):
        out[:, pad] = 0
    return out.reshape(heads * len(order), *x.shape[1:])


def apply(t: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Rearrange one layer's q, k (+ biases, per-head norms) and pad v in place, for the engine's head layout."""
    if is_identity(cfg) or "q" not in t:
        return
    src, dim = cfg.src_head_dim, cfg.head_dim
    order = qk_order(src, cfg.rotary_dim or src, cfg.rope_interleaved, dim)
    v_order = list(range(src)) + [-1] * (dim - src)
    for key, heads, o in (("q", cfg.num_heads, order), ("k", cfg.num_kv_heads, order),
                          ("v", cfg.num_kv_heads, v_order)):
        for name in (key, key + "_b"):
            if name in t:
                t[name] = rows(t[name], heads, src, o)
    for name in ("q_norm", "k_norm"):  # [src]: refused with padding (engine_config), only permuted here
        if name in t:
            t[name] = t[name][torch.tensor(order, device=t[name].device)]


def inv_freq(rotary_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The engine's head_dim / 2 frequencies: the rotary dims' own, then 0 for the dims that do not rotate."""
    out = torch.zeros(cfg.head_dim // 2, dtype=rotary_freq.dtype)
    out[: rotary_freq.numel()] = rotary_freq
    return out
