"""`cluster lite fp8`: a full-precision HF checkpoint -> an FP8 one in the format the Hub's FP8-dynamic models use
(compressed-tensors 'float-quantized': e4m3 weights with a scale per output channel, activations dynamic per token),
so vLLM, SGLang and transformers load it too, and so does this engine (cluster/convert/fp8.py).

Every decoder linear (`model.layers.N.*_proj`) becomes `weight` e4m3 [out, in] + `weight_scale` fp32 [out, 1];
embeddings, norms and the LM head keep the checkpoint's dtype (listed in `ignore`). Tensors are read one at a time
and written in files of at most SHARD_BYTES, so a large model is never whole in memory."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from cluster.quant import fp8

SHARD_BYTES = 4 << 30
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
           "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
               "group_size": None, "block_structure": None, "actorder": None, "observer": None, "observer_kwargs": {}}


def quantization_config() -> dict:
    """compressed-tensors' config of an FP8-dynamic model (as llm-compressor's FP8_DYNAMIC scheme writes it)."""
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(WEIGHTS),
                                          "input_activations": dict(ACTIVATIONS), "output_activations": None,
                                          "format": "float-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def write_fp8_checkpoint(model: str | None, out_dir: str | Path, progress: bool = True) -> tuple[Path, int]:
    """Quantize `model` (an HF dir or .gguf; None: the embedded default) into `out_dir`; returns (dir, linears)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from cluster.convert.hf import _save_tokenizer, _tensor_reader, read_hf_config
    from cluster.convert.quant import checkpoint_quant
    from cluster.convert.source import resolve_source

    src = resolve_source(model)
    hf = read_hf_config(src)
    if checkpoint_quant(hf):
        raise ValueError(f"{src.path} is already quantized ({hf['quantization_config'].get('quant_method')}); "
                         "`cluster lite fp8` takes a full-precision checkpoint")
    get = _tensor_reader(src)
    names = sorted(getattr(get, "names", ()))
    if hf.get("tie_word_embeddings"):
        names = [n for n in names if n != "lm_head.weight"]  # the embedding's tensor, not saved twice
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, int] = {}
    size = total = linears = files = 0

    def flush() -> None:
        nonlocal shard, size, files
        if shard:
            files += 1
            save_file(shard, str(out / f"part{files}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for name in tqdm(names, desc=f"fp8 {Path(src.gguf_file or src.path).name}", unit="tensor", disable=not progress):
        t = get(name)
        if LINEAR.fullmatch(name):
            q, s = fp8.quantize_weight(t)
            parts = {name: q, name[: -len(".weight")] + ".weight_scale": s[:, None].contiguous()}
            linears += 1
        else:
            parts = {name: t.contiguous()}
        for k, v in parts.items():
            if size and size + v.numel() * v.element_size() > SHARD_BYTES:
                flush()
            shard[k] = v
            size += v.numel() * v.element_size()
            total += v.numel() * v.element_size()
            weight_map[k] = files + 1
    flush()
    n = files
    for i in range(1, n + 1):  # the names transformers looks for
        (out / f"part{i}.safetensors").rename(out / (f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1
                                                     else "model.safetensors"))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f"model-{i:05d}-of-{n:05d}.safetensors" for k, i in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = dict(hf, quantization_config=quantization_config())
    (out / "config.json").write_text(json.dumps(hf, indent=2, default=str))
    gen = src.path / "generation_config.json"
    if not src.gguf_file and gen.exists():
        shutil.copy(gen, out / "generation_config.json")
    _save_tokenizer(src, out)
    return out, linears
