"""Rotary frequencies, computed once at conversion by transformers (every scaling type it knows) and stored with the
weights; and the context a checkpoint's rope or attention pattern lets the engine serve exactly."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from cluster.models.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where frequencies are computed: the config checks run without it
    import torch

log = logging.getLogger(__name__)


def _params(view: dict) -> dict:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older configs), as LlamaConfig takes them."""
    if view.get("rope_parameters"):
        rp = {k: v for k, v in dict(view["rope_parameters"]).items() if k != "partial_rotary_factor"}
        return {"rope_parameters": rp}
    kw: dict = {"rope_theta": view.get("rope_theta", 10000.0)}
    scaling = view.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] in ("su", "yarn") and "short_factor" in scaling:  # Phi-3's older names for longrope
            scaling["rope_type"] = "longrope"
        if view.get("original_max_position_embeddings"):
            scaling.setdefault("original_max_position_embeddings", view["original_max_position_embeddings"])
        scaling.pop("type", None)
        kw["rope_scaling"] = scaling
    return kw


def rope_type(view: dict) -> str:
    p = _params(view)
    rp = p.get("rope_parameters") or p.get("rope_scaling") or {}
    return rp.get("rope_type", rp.get("type", "default")) or "default"


def rotary_dim(view: dict, head_dim: int) -> int:
    """How many dims of a head rotate: partial_rotary_factor (top level or in rope_parameters) of head_dim."""
    factor = view.get("partial_rotary_factor") or (view.get("rope_parameters") or {}).get("partial_rotary_factor")
    return int(head_dim * (factor or 1.0))


def inv_freq(view: dict, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """The engine's head_dim / 2 frequencies and transformers' attention scaling (YaRN, LongRoPE) for cos/sin."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from cluster.convert import head_layout

    kw = {k: view[k] for k in ("hidden_size", "num_attention_heads", "max_position_embeddings") if view.get(k)}
    kw["head_dim"] = cfg.rotary_dim or cfg.src_head_dim
    rot = LlamaRotaryEmbedding(LlamaConfig(**kw, **_params(view)))
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    if scaling != 1.0 and cfg.rotary_dim not in (0, cfg.src_head_dim):
        raise ValueError(f"rope scaling {rope_type(view)!r} scales cos/sin, which would also scale the head dims "
                         "that do not rotate; it is not supported with a partial rotary")
    return head_layout.inv_freq(rot.inv_freq.float().clone(), cfg), scaling


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's fp32 head slopes (Press et al.; Baichuan-13B's _get_interleave): 2^(-8 i / n) for i = 1..n when n is
    a power of two; otherwise the closest power of two's slopes, then every other one of twice that many heads."""
    import torch

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(m) if m == num_heads else power_of_2(m) + alibi_slopes(2 * m).tolist()[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def local_inv_freq(view: dict, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq of the windowed layers' own table (Gemma 3: local_rope_parameters, the family's view hook)."""
    return inv_freq({**view, "rope_parameters": view["local_rope_parameters"]}, cfg)


def context_limit(view: dict, name: str, windowed: bool = False) -> int | None:
    """The longest context served exactly, when shorter than max_position_embeddings: sliding-window attention is
    full attention up to the window (for families whose windows the engine does not apply, `windowed` False), and
    LongRoPE keeps its short factors up to original_max_position_embeddings (past it transformers switches
    frequencies mid-sequence)."""
    limits = {}
    window = view.get("sliding_window") if view.get("use_sliding_window", True) and not windowed else None
    if window:
        limits["sliding-window attention"] = int(window)
    if rope_type(view) == "longrope":
        limits["LongRoPE's short factors"] = int(view.get("original_max_position_embeddings")
                                                 or (view.get("rope_scaling") or {}).get("original_max_position_embeddings")
                                                 or (view.get("rope_parameters") or {}).get("original_max_position_embeddings"))
    top = view.get("max_position_embeddings", 4096)
    limits = {k: v for k, v in limits.items() if v < top}
    if not limits:
        return None
    why, n = min(limits.items(), key=lambda kv: kv[1])
    log.info("%s: context capped at %d tokens (%s is exact up to there)", name, n, why)
    return n
