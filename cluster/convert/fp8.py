"""FP8 checkpoints (the `quantization_config`s people download) -> the engine's e4m3 weights with one fp32 scale
per output channel (cluster/quant/fp8.py).

Read: quant_method 'fp8' (HF's FP8 / vLLM's Fp8Config: per-tensor `weight_scale`, or `weight_block_size` with
`weight_scale_inv` per block, as DeepSeek-V3 and Qwen3-FP8 ship) and compressed-tensors 'float-quantized' 8-bit
float groups (RedHatAI / neuralmagic FP8 and FP8-dynamic models: strategy tensor, channel or block). Per-tensor and
per-channel weights are kept byte for byte; block scales are dequantized and rounded again per channel (a second
rounding, within one e4m3 step). Activations are quantized per token at run time whatever the checkpoint says: static
input scales are not used. Anything else (int8 W8A8, 4-bit compressed-tensors, e5m2, group-scaled weights, a KV-only
config) is refused naming what is read.

Scales travel through the converter's shard_layer as [out, tp] columns of one value each, so tensor parallelism
slices them as it slices their weights: column-parallel (qkv, gate/up) rows with their rows, row-parallel (o, down)
by columns, which leaves each rank one whole column: every rank keeps the full per-channel scale.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from cluster.quant import fp8

log = logging.getLogger(__name__)
Getter = Callable[[str], torch.Tensor]
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # _hf_layer_tensors' keys of the decoder linears
ENGINE_QUANT = {"method": "fp8", "weights": "channel", "activations": "token"}
SUPPORTED = ("supported: quant_method 'fp8' (e4m3; per-tensor weight_scale, or weight_block_size with "
             "weight_scale_inv) and compressed-tensors 'float-quantized' 8-bit float weights (strategy tensor, "
             "channel or block)")


def fp8_config(hf: dict) -> dict:
    """The engine's {"method": "fp8", ...} for an FP8 checkpoint (refusing what it cannot read), {} for others."""
    qc = hf.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"FP8 checkpoint format {fmt!r} is not supported; {SUPPORTED}")
        block = qc.get("weight_block_size")
        if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"weight_block_size {block!r} is not two positive integers; {SUPPORTED}")
        _note_static(str(qc.get("activation_scheme", "dynamic")).lower() == "static")
        return dict(ENGINE_QUANT)
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not groups:
            raise ValueError(f"compressed-tensors config without weight groups (kv_cache_scheme only?) is not "
                             f"supported; {SUPPORTED}")
        static = False
        for name, g in groups.items():
            fmt = str(g.get("format") or qc.get("format") or "").lower()
            w, a = g.get("weights") or {}, g.get("input_activations")
            ok = (fmt == "float-quantized" and w.get("num_bits") == 8 and w.get("type") == "float"
                  and w.get("strategy") in ("tensor", "channel", "block") and not w.get("dynamic")
                  and w.get("symmetric", True))
            if not ok:
                raise ValueError(f"compressed-tensors group {name!r} (format {fmt!r}, weights {w.get('num_bits')}-bit "
                                 f"{w.get('type')}, strategy {w.get('strategy')!r}) is not supported; {SUPPORTED}")
            if a and (a.get("num_bits") != 8 or a.get("type") != "float"):
                raise ValueError(f"compressed-tensors group {name!r}: {a.get('num_bits')}-bit {a.get('type')} "
                                 f"activations are not supported; {SUPPORTED}")
            static = static or bool(a and not a.get("dynamic"))
        if qc.get("kv_cache_scheme"):
            log.info("the checkpoint's kv_cache_scheme is not read (use --quant-policy for a quantized KV cache)")
        _note_static(static)
        return dict(ENGINE_QUANT)
    return {}


def _note_static(static: bool) -> None:
    if static:
        log.info("the checkpoint's static input scales are not used: activations are quantized per token at run time")


def _block(hf: dict, name: str) -> tuple[int, int]:
    """The block shape of `name`'s weight_scale(_inv): the config's, or compressed-tensors' block_structure."""
    qc = hf.get("quantization_config") or {}
    if qc.get("weight_block_size"):
        return tuple(qc["weight_block_size"])
    for g in (qc.get("config_groups") or {}).values():
        if (g.get("weights") or {}).get("block_structure"):
            return tuple(g["weights"]["block_structure"])
    raise ValueError(f"{name} has block scales but the config names no block size (weight_block_size or "
                     "block_structure); the checkpoint is incomplete")


class FP8Reader:
    """Two views of a checkpoint reader answering a decoder linear's `<linear>.weight` with its e4m3 values (as
    uint8, so slicing and concatenation never touch float8 arithmetic) or its per-channel scale [out, tp]; every
    other name as it is. Each linear is read once for both views, until `clear()`."""

    def __init__(self, get: Getter, hf: dict, tp: int):
        self.get, self.hf, self.tp = get, hf, tp
        self.names = getattr(get, "names", set())
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.requantized = 0  # linears the checkpoint left in full precision, quantized here
        self.q, self.scale = self._view(0), self._view(1)

    def _linear(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.get(base + ".weight")
        if base + ".weight_scale_inv" in self.names:
            return fp8.from_blocks(w, self.get(base + ".weight_scale_inv"), _block(self.hf, base))
        if base + ".weight_scale" not in self.names:
            if w.dtype == fp8.FP8:
                raise ValueError(f"{base}.weight is float8 but the checkpoint has no {base}.weight_scale (or "
                                 "weight_scale_inv); re-export it with its scales, or convert the bf16 checkpoint "
                                 "with --quant fp8")
            self.requantized += 1  # in the config's `ignore` list: the engine's layers are all fp8
            return fp8.quantize_weight(w)
        s = self.get(base + ".weight_scale").float()
        if w.dtype != fp8.FP8:
            raise ValueError(f"{base}.weight is {w.dtype}, not float8_e4m3fn, beside a weight_scale; {SUPPORTED}")
        if s.numel() == 1:
            return w, s.reshape(1).expand(w.shape[0]).contiguous()
        if tuple(s.shape) in ((w.shape[0],), (w.shape[0], 1)):
            return w, s.reshape(-1)
        if s.dim() == 2:
            return fp8.from_blocks(w, s, _block(self.hf, base))  # compressed-tensors' block strategy
        raise ValueError(f"{base}.weight_scale of shape {tuple(s.shape)} fits neither a tensor, a channel nor a "
                         f"block scale of a {tuple(w.shape)} weight; {SUPPORTED}")

    def _view(self, part: int) -> Getter:
        def view(name: str) -> torch.Tensor:
            base = name[: -len(".weight")]
            if name.endswith("_proj.weight") and ".layers." in name:
                if base not in self.memo:
                    self.memo[base] = self._linear(base)
                q, s = self.memo[base]
                return q.view(torch.uint8) if part == 0 else s[:, None].expand(-1, self.tp)
            return self.get(name)

        view.names = self.names  # type: ignore[attr-defined]
        return view

    def clear(self) -> None:
        self.memo.clear()


def quantize_layer(t: dict[str, torch.Tensor], tp: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A full-precision layer's tensors (quant='fp8' at conversion) -> its e4m3 values and scales in the views'
    forms (uint8; [out, tp]); other tensors unchanged in both."""
    tq, ts = dict(t), dict(t)
    for key in (k for k in LINEARS if k in t):  # a plain MLP has no gate
        q, s = fp8.quantize_weight(t[key])
        tq[key], ts[key] = q.view(torch.uint8), s[:, None].expand(-1, tp)
    return tq, ts


def merge_shards(q: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One rank's layer, sharded twice (values, scales) -> engine names: `<linear>.weight` e4m3 and
    `<linear>.weight_scale` fp32 [out]; norms and biases as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if name.endswith("_proj.weight"):
            out[name] = t.contiguous().view(fp8.FP8)
            out[name[: -len(".weight")] + ".weight_scale"] = scales[name][:, 0].float().contiguous()
        else:
            out[name] = t
    return out
