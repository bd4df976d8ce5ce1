"""Activation-aware weight quantization (AWQ, Lin et al. 2023) of a Llama-family transformers model to 4 bits.

For each decoder layer, calibration text gives the inputs of its linear layers. Input channels that carry large
activations matter most, so before rounding each group of linears that share an input (q/k/v; gate/up; o after v;
down after up) has its weight columns multiplied by s = mean|x|^a / mean|w|^(1-a) and the operation before it (the
RMSNorm, or v / up) divided by s, which leaves the model's function unchanged. `a` is searched on a grid to minimize
the error of the rounded layer's output on the calibration inputs. The weights are then rounded to 4 bits per group
of input channels (round to nearest, min-max with a zero point) and written as an AutoAWQ GEMM checkpoint, which
`cluster convert` (and every command that takes a model) reads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cluster.quant import int4

GRID = 20  # values of the exponent a tried, 0 .. 1


@dataclass
class ScaleGroup:
    """Linears that read the same input, and the operation that produces it (whose output is divided by s)."""

    prev: nn.Module  # RMSNorm (weight [in]) or a Linear (rows [in])
    linears: list[nn.Linear]
    inputs: torch.Tensor  # [tokens, in]


def calibration_ids(tokenizer, texts: list[str], samples: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] token ids: the texts joined and cut into blocks (fewer than `samples` if the text is short)."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t, add_special_tokens=False)
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one block of {seqlen}; "
                         "give more text (--calib-file) or a shorter --calib-seqlen")
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


def default_calibration_text() -> list[str]:
    return [p for p in (Path(__file__).parent / "calibration.txt").read_text().split("\n\n") if p.strip()]


def _pseudo_quantize(w: torch.Tensor, group: int) -> torch.Tensor:
    return int4.dequantize(*int4.quantize(w, group), dtype=w.dtype)


def _search_scale(group: ScaleGroup, group_size: int) -> torch.Tensor:
    """The per-input-channel scale (for the exponent on the grid) whose rounded weights best reproduce the
    linears' outputs on the calibration inputs."""
    x = group.inputs
    weights = [lin.weight.data.float() for lin in group.linears]
    w = torch.cat(weights)
    want = F.linear(x, w)
    x_mean = x.abs().mean(0)
    wg = w.abs().view(w.shape[0], -1, group_size)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-6)).view_as(w).mean(0)
    best, best_err = torch.ones_like(x_mean), float("inf")
    for i in range(GRID):
        a = i / GRID
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (F.linear(x / s, _pseudo_quantize(w * s, group_size)) - want).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def _apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the producer's output by s and multiply the consumers' input columns by s: the same function."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))
    for lin in group.linears:
        lin.weight.data.mul_(s.view(1, -1).to(lin.weight.dtype))


class _Stop(Exception):
    """Raised once the layer being calibrated has seen its inputs: the layers after it need not run."""


def _capture_inputs(model: nn.Module, layer: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of one layer's q_proj, o_proj, gate_proj and down_proj over the calibration batch."""
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in ("q_proj", "o_proj", "gate_proj", "down_proj")}
    mods = {"q_proj": layer.self_attn.q_proj, "o_proj": layer.self_attn.o_proj, "gate_proj": layer.mlp.gate_proj,
            "down_proj": layer.mlp.down_proj}

    def hook(key: str):
        def record(_m, inp, _out):
            seen[key].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float())
            if key == "down_proj":
                raise _Stop
        return record

    hooks = [m.register_forward_hook(hook(k)) for k, m in mods.items()]
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(row[None].to(next(model.parameters()).device))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def _check_model(model: nn.Module, group_size: int) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") and hasattr(l.mlp, "gate_proj") for l in layers):
        raise ValueError("auto_awq supports Llama-family models (Llama, Mistral, Qwen2, SmolLM): "
                         "decoder layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj")
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear) and m.in_features % group_size:
            raise ValueError(f"{name} has {m.in_features} input features, not a multiple of --w-group-size "
                             f"{group_size}")


def quantize_model(model: nn.Module, ids: torch.Tensor, group_size: int = 128, search: bool = True,
                   progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Scale (search=True: AWQ; False: plain round-to-nearest) and round every decoder linear; returns
    {module name: (q, zeros, scales)} (int4's unpacked layout). The model is left scaled, not rounded."""
    from tqdm import tqdm

    _check_model(model, group_size)
    model.eval()
    layers = model.model.layers
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for i in tqdm(range(len(layers)), desc="AWQ", unit="layer", disable=not progress):
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        if search:
            x = _capture_inputs(model, layer, ids)
            groups = [ScaleGroup(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], x["q_proj"]),
                      ScaleGroup(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], x["gate_proj"]),
                      ScaleGroup(mlp.up_proj, [mlp.down_proj], x["down_proj"])]
            if attn.v_proj.out_features == attn.o_proj.in_features:  # GQA: v's rows don't line up with o's columns
                groups.append(ScaleGroup(attn.v_proj, [attn.o_proj], x["o_proj"]))
            for g in groups:
                _apply_scale(g, _search_scale(g, group_size))
        for name, lin in (("self_attn.q_proj", attn.q_proj), ("self_attn.k_proj", attn.k_proj),
                          ("self_attn.v_proj", attn.v_proj), ("self_attn.o_proj", attn.o_proj),
                          ("mlp.gate_proj", mlp.gate_proj), ("mlp.up_proj", mlp.up_proj),
                          ("mlp.down_proj", mlp.down_proj)):
            out[f"model.layers.{i}.{name}"] = int4.quantize(lin.weight.data.float().cpu(), group_size)
    return out


def save_awq_checkpoint(model: nn.Module, quantized: dict, tokenizer, out_dir: str | Path, group_size: int) -> Path:
    """An AutoAWQ GEMM checkpoint: the model's tensors with each quantized linear as qweight/qzeros/scales, and
    `quantization_config` in config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, (q, zeros, scales) in quantized.items():
        del state[name + ".weight"]
        state[name + ".qweight"], state[name + ".qzeros"], state[name + ".scales"] = int4.to_awq(q, zeros, scales)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                     "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(out))
    return out
