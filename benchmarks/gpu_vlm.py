#!/usr/bin/env python3
"""The vision-language families through the GPU path (Triton kernels, CUDA graphs, the vision tower on the device;
for Qwen2-VL / Qwen2.5-VL the rotary kernel reading per-token M-RoPE rows), token for token against transformers on
the same device: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, DeepSeek-VL (and its hybrid), InternVL (Qwen2 and
Llama language models), and any kind in KINDS the tests can build.

The GPU machine has no PIL-free image pipeline to count on and no SmolLM2 tokenizer (its GGUF needs gguf), so the
checkpoints and prompts are made here first:

    python benchmarks/gpu_vlm.py --prepare .vlm         # on this machine: tiny checkpoints + prepared prompts
    python benchmarks/gpu_vlm.py --dir .vlm [--out DIR] # on the GPU (carry .vlm)

Prompts: one image, two images of other sizes and aspect ratios, and a text-only prompt, run as one batch (text
rows beside image rows) with a small prefill budget so images straddle chunks. Prints a table; writes
gpu_vlm.json to --out."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

KINDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "deepseek_vl", "deepseek_vl_hybrid", "internvl",
         "internvl_llama")
# the transformers keyword that carries PreparedPrompt.image_grid, per kind (None: pixels alone)
GRID_ARG = {"llava": None, "llava_next": "image_sizes", "qwen2_vl": "image_grid_thw", "qwen2_5_vl": "image_grid_thw",
            "deepseek_vl": None, "deepseek_vl_hybrid": "high_res_pixel_values", "internvl": None,
            "internvl_llama": None}
NEW = 24
ROOT = Path(__file__).resolve().parent.parent


def prepare(out: Path) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny

    from cluster.config import EngineConfig
    from cluster.convert.cache import ensure_converted
    from cluster.engine.engine import LLMEngine

    def image(seed: int, size: tuple[int, int]):
        rng = np.random.default_rng(seed)
        return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))

    def ask(text: str, *images) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                 + [{"type": "text", "text": text}]}]

    tokenizer_dir = ensure_converted(None, 1, "float32", progress=False)
    prompts, classes = {}, {}
    for kind in KINDS:
        path, model = build_tiny(kind, tokenizer_dir, out / kind)
        classes[kind] = type(model).__name__
        eng = LLMEngine(str(path), EngineConfig(cache_dir=str(out / "cpu-cache"), device="cpu", dtype="float32"))
        chats = [ask("Describe the picture.", image(1, (40, 52))),
                 ask("Compare the two pictures.", image(2, (64, 30)), image(3, (24, 60))),
                 [{"role": "user", "content": "No picture this time."}]]
        prompts[kind] = [vars(eng.prepare_prompt(c)) for c in chats]
        slim(out / kind)
    torch.save({"prompts": prompts, "classes": classes}, out / "prompts.pt")
    print("wrote", out)


BIG = 1_000_000  # elements: the embedding table and LM head of SmolLM2's 49k vocabulary, 12 MB each in fp32
REGENERATE = "regenerate.json"


def slim(folder: Path) -> None:
    """Drop the checkpoint's big tensors (embedding and head), to be drawn again from a seed on the GPU machine
    (restore): the prompts do not depend on the weights, and both engines read the same regenerated ones, so the
    comparison holds while the carried folders stay under the device's 64 MiB."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    big = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items() if v.numel() > BIG}
    save_file({k: v.contiguous() for k, v in tensors.items() if k not in big}, str(f))
    (folder / REGENERATE).write_text(json.dumps(big))


def restore(folder: Path) -> None:
    """The tensors slim() dropped, drawn N(0, 0.08) from a seed per name, written back (once)."""
    import zlib

    from safetensors.torch import load_file, save_file

    spec_file = folder / REGENERATE
    if not spec_file.exists():
        return
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    for name, (shape, dtype) in json.loads(spec_file.read_text()).items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        tensors[name] = (torch.randn(shape, generator=g) * 0.08).to(getattr(torch, dtype))
    save_file(tensors, str(f))
    spec_file.unlink()


def hf_greedy(model, kind: str, p: dict, device: str) -> list[int]:
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.do_sample, gc.max_new_tokens, gc.pad_token_id = [], False, NEW, 0
    ids = torch.tensor([p["token_ids"]], device=device)
    extra = {}
    if p["pixel_values"] is not None:
        extra = dict(pixel_values=p["pixel_values"].to(device))
        if GRID_ARG.get(kind):
            extra[GRID_ARG[kind]] = p["image_grid"].to(device)
    if p["pixel_values"] is not None and kind.startswith("qwen"):
        kinds = (ids == model.config.image_token_id).int()
        try:
            out = model.generate(ids, generation_config=gc, mm_token_type_ids=kinds, **extra)
            return out[0, ids.shape[1]:].tolist()
        except (TypeError, ValueError):  # a transformers without mm_token_type_ids
            pass
    out = model.generate(ids, generation_config=gc, **extra)
    return out[0, ids.shape[1]:].tolist()


def run(kind: str, cls_name: str, folder: Path, prompts: list[dict], device: str) -> dict:
    import transformers as tf

    from cluster.config import EngineConfig, GenerationConfig
    from cluster.engine.engine import LLMEngine
    from cluster.engine.tokenizer import PreparedPrompt

    model = getattr(tf, cls_name).from_pretrained(str(folder / kind), dtype=torch.float32).to(device).eval()
    print(kind, "default dtype after transformers' load:", torch.get_default_dtype(),
          "model dtype:", next(model.parameters()).dtype, flush=True)
    with torch.inference_mode():
        want = [hf_greedy(model, kind, p, device) for p in prompts]
    default_dtype = torch.get_default_dtype()  # transformers may leave another one set after loading
    eng = LLMEngine(str(folder / kind), EngineConfig(cache_dir=str(folder / f"{device}-cache"), device=device,
                                                     dtype="float32", max_prefill_token_num=32, max_batch_size=8))
    gen = GenerationConfig(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    got = [r.token_ids for r in eng.generate([PreparedPrompt(**p) for p in prompts], gen)]
    again = [r.token_ids for r in eng.generate([PreparedPrompt(**p) for p in prompts[:2]], gen)]  # prefix hits
    first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), NEW) for g, w in zip(got, want)]
    return {"identical": sum(g == w for g, w in zip(got, want)), "of": len(prompts), "first_difference": first,
            "prefix_cache_rerun_identical": again == got[:2], "graphs": sorted(getattr(eng.runner, "graphs", {})),
            "image_tokens": [p["token_ids"].count(eng.model_config.vision["image_token_id"]) for p in prompts],
            "default_dtype_after_hf": str(default_dtype)}


def _converted_dtypes(cache: Path) -> dict:
    """Of each converted shard under `cache`: how many tensors of each dtype (what a dtype error points at)."""
    from collections import Counter

    from safetensors import safe_open

    out = {}
    for f in sorted(cache.glob("**/*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out[str(f.relative_to(cache))] = dict(Counter(str(st.get_slice(k).get_dtype()) for k in st.keys()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", default=None, help="write tiny checkpoints and prompts to this folder (CPU)")
    ap.add_argument("--dir", default=".vlm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kinds", nargs="*", default=None, help="of the prepared kinds (default: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    if args.prepare:
        prepare(Path(args.prepare))
        return
    folder = Path(args.dir)
    saved = torch.load(folder / "prompts.pt", weights_only=False)
    results = {}
    for kind in args.kinds or saved["prompts"]:
        try:
            restore(folder / kind)
            results[kind] = run(kind, saved["classes"][kind], folder, saved["prompts"][kind], args.device)
        except Exception as e:  # noqa: BLE001 - report the case and go on to the next
            import traceback

            results[kind] = {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc()[-3000:],
                             "converted_dtypes": _converted_dtypes(folder / f"{args.device}-cache")}
            print(results[kind]["where"], flush=True)
        print(kind, results[kind], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_vlm.json").write_text(json.dumps(results, indent=1))
    print("\n| case | identical | first differing token | image tokens | prefix-cache rerun | graphs |")
    print("|---|---:|---|---|---|---|")
    for kind, r in results.items():
        if "error" in r:
            print(f"| {kind} | error: {r['error'][:80]} | | | | |")
        else:
            print(f"| {kind} | {r['identical']}/{r['of']} | {r['first_difference']} | {r['image_tokens']} | "
                  f"{r['prefix_cache_rerun_identical']} | {r['graphs'][:5]}... |")


if __name__ == "__main__":
    main()
