"""The one quantization switch (EngineConfig.quant, `--quant awq|fp8`) against what a checkpoint says.

A checkpoint that names its quantization wins; a `--quant` that contradicts it is an error. A full-precision
checkpoint is quantized at conversion: 'fp8' per output channel (what `cluster lite fp8` writes too), 'awq' by
round-to-nearest in groups of 128 (no calibration: `cluster lite auto_awq` is the better 4-bit model).
"""
from __future__ import annotations

import logging

import torch

from cluster.convert import fp8 as fp8_ckpt
from cluster.convert.awq import awq_config
from cluster.quant import int4

log = logging.getLogger(__name__)
RTN_GROUP = 128
METHODS = ("awq", "fp8")


def checkpoint_quant(hf: dict) -> dict:
    """The engine's quant dict for the checkpoint's own quantization_config ({} when it has none)."""
    qc = hf.get("quantization_config") or {}
    if not qc:
        return {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return awq_config(hf)
    if method in ("fp8", "compressed-tensors"):
        return fp8_ckpt.fp8_config(hf)
    raise ValueError(f"quantization {method!r} is not supported; supported: awq (4-bit, version gemm) and fp8 "
                     "(quant_method 'fp8', or compressed-tensors 'float-quantized')")


def resolve_quant(hf: dict, requested: str | None) -> dict:
    """What the converted model holds: the checkpoint's quantization, else `requested` applied at conversion."""
    have = checkpoint_quant(hf)
    if have:
        if requested and requested != have["method"]:
            raise ValueError(f"the checkpoint is already {have['method']}-quantized, so --quant {requested} "
                             f"contradicts it: leave --quant out (or pass --quant {have['method']})")
        return have
    if requested == "fp8":
        return dict(fp8_ckpt.ENGINE_QUANT)
    if requested == "awq":
        heads = hf.get("num_attention_heads", 1)
        widths = {hf.get("hidden_size", 0), hf.get("intermediate_size", 0),
                  heads * (hf.get("head_dim") or hf.get("hidden_size", 0) // heads)}
        if any(w % RTN_GROUP for w in widths):
            raise ValueError(f"--quant awq rounds in groups of {RTN_GROUP} input channels, and this model has linears "
                             f"of {sorted(widths)}; use --quant fp8, or `cluster lite auto_awq --w-group-size`")
        return {"method": "awq", "bits": 4, "group_size": RTN_GROUP}
    if requested:
        raise ValueError(f"--quant {requested!r} is not supported; supported: {', '.join(METHODS)}")
    return {}


def log_at_conversion(method: str) -> None:
    """Say what quantizing at conversion does (and, for 4 bits, what does it better)."""
    if method == "awq":
        log.warning("--quant awq on a full-precision checkpoint: rounding every decoder linear to 4 bits "
                    "(round-to-nearest, group %d); `cluster lite auto_awq MODEL --work-dir DIR` gives better "
                    "quality (activation-aware scales)", RTN_GROUP)
    elif method == "fp8":
        log.info("--quant fp8 on a full-precision checkpoint: every decoder linear to e4m3, a scale per output "
                 "channel; activations quantized per token at run time")


def effective_quant(model: str | None, requested: str | None) -> str | None:
    """The method the engine will run for `model` (a converted dir's, the checkpoint's, or `requested`), checked
    before anything slow: a contradiction is a ValueError naming the way out."""
    from pathlib import Path

    from cluster.convert.hf import read_hf_config
    from cluster.convert.source import is_converted, resolve_source
    from cluster.models.config import ModelConfig

    if model and is_converted(Path(model)):
        have = ModelConfig.load(Path(model) / "config.json").quant.get("method")
        if requested and requested != have:
            raise ValueError(f"{model} was converted {'as ' + have if have else 'unquantized'}, so --quant "
                             f"{requested} contradicts it: leave --quant out, or convert the original checkpoint")
        return have
    return resolve_quant(read_hf_config(resolve_source(model)), requested).get("method")


def quantize_layer_rtn(t: dict[str, torch.Tensor], group: int) -> list[dict[str, torch.Tensor]]:
    """A full-precision layer's tensors (quant='awq' at conversion) -> three dicts (q values, zeros, scales) in the
    form AWQReader's views give, for build_shards' AWQ path; other tensors unchanged in each."""
    parts = [dict(t), dict(t), dict(t)]
    for key in (k for k in fp8_ckpt.LINEARS if k in t):  # a plain MLP has no gate
        for part, x in zip(parts, int4.quantize(t[key], group)):
            part[key] = x
    return parts
