"""A converted (engine-format) checkpoint of random weights in a real model's shape, with a word tokenizer, for
benchmarks that start the engine the way a user does: from a folder (`pipeline(path)`, `LLMEngine(path)`).

    python benchmarks/random_checkpoint.py --shape llama3-8b --out /tmp/llama3-8b
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch


def save_word_tokenizer(out: Path, vocab: int) -> None:
    """A tokenizer of `vocab` made-up words, so random token ids decode (and cost what detokenizing costs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(out)


def write_converted(shape: str, out: Path, device: str = "cuda", max_pos: int = 8192, seed: int = 0) -> Path:
    """out/{config.json, rank0.safetensors, tokenizer}; kept when already there (a second start reuses it)."""
    from safetensors.torch import save_file

    from bench_engine import random_hf_model
    from cluster.convert.hf import build_shards, engine_config

    out = Path(out)
    if (out / "config.json").exists() and (out / "rank0.safetensors").exists():
        return out
    dtype = "bfloat16" if device == "cuda" else "float32"
    torch.manual_seed(seed)
    hf = random_hf_model(shape, getattr(torch, dtype), max_pos, device)
    hf_cfg = hf.config.to_dict()
    cfg = engine_config(hf_cfg, dtype, 1, f"random-{shape}")
    shard = build_shards(hf.state_dict().__getitem__, hf_cfg, cfg, 1)[0]
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    save_file({k: v.contiguous() for k, v in shard.items()}, str(out / "rank0.safetensors"))
    cfg.save(out / "config.json")
    save_word_tokenizer(out, hf.config.vocab_size)
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s", flush=True)
    del hf, shard
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    write_converted(a.shape, Path(a.out), a.device)
