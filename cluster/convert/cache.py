"""Convert once per (checkpoint, tp, dtype, quant), then reuse: a cache keyed by the source files' identity."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from cluster.convert.hf import convert_checkpoint
from cluster.convert.source import Source, is_converted, resolve_source
from cluster.models.config import ModelConfig

FORMAT_VERSION = 1


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("CLUSTER_CACHE_DIR") or Path.home() / ".cache" / "cluster")


def cache_key(src: Source, tp: int, dtype: str, quant: str = "") -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{tp}|{dtype}|{quant}".encode())
    for f in src.files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}".encode())
    name = Path(src.gguf_file).stem if src.gguf_file else src.path.name
    return f"{name}-tp{tp}-{dtype}{'-' + quant if quant else ''}-{h.hexdigest()[:12]}"


def ensure_converted(model: str | None, tp: int, dtype: str, cache_dir: str | None = None,
                     progress: bool = True, quant: str | None = None) -> Path:
    """Return a directory in engine format for `model`: itself if already converted, else the (new) cache entry.
    quant: EngineConfig.quant, applied at conversion to a full-precision checkpoint (part of the cache key).

    A file lock makes concurrent workers of one replica convert once and the others wait."""
    from cluster.convert.quant import checkpoint_quant, effective_quant

    if model and is_converted(Path(model)):
        cfg = ModelConfig.load(Path(model) / "config.json")
        if cfg.tp != tp:
            raise ValueError(f"{model} was converted for tp={cfg.tp}, not tp={tp}; run `cluster convert` with --tp {tp}")
        effective_quant(model, quant)  # a contradicting --quant is an error
        return Path(model)
    src = resolve_source(model)
    if quant:
        from cluster.convert.hf import read_hf_config

        effective_quant(model, quant)
        if checkpoint_quant(read_hf_config(src)):
            quant = None  # the checkpoint's own quantization: the same entry as without --quant
    out = cache_root(cache_dir) / cache_key(src, tp, dtype, quant or "")
    if is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_converted(out):
            tmp = Path(str(out) + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            convert_checkpoint(src, tmp, tp, dtype, progress=progress, quant=quant)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def resolve_dtype(model: str | None, dtype: str, device: str) -> str:
    """'auto': fp32 on the CPU (exact, and CPU bf16 is slow); the checkpoint's half type (else bf16) on a GPU."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    if model and is_converted(Path(model)):
        return ModelConfig.load(Path(model) / "config.json").dtype
    try:
        from cluster.convert.hf import read_hf_config

        hf = read_hf_config(resolve_source(model))
        src_dtype = hf.get("torch_dtype") or hf.get("dtype")
    except Exception:
        src_dtype = None
    return "float16" if src_dtype == "float16" else "bfloat16"
