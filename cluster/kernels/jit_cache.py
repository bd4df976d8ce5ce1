"""Compiled kernels and the tuners' picks kept on disk beside the converted weights, so that a second start of the
same model on the same kind of GPU compiles and times nothing; and a watch on what still compiles once the engine
has reported ready (the warm-up missed a shape: the request that met it paid for the compilation).

Triton keeps its compiled kernels under `TRITON_CACHE_DIR` and, with autotuning's disk cache on, each autotuner's
pick per key beside them. Our own tuner (cluster/kernels/w4a16.py) keeps its picks in a JSON file there too. The
folder is named by the GPU, its compute capability and the Triton and torch versions, since a kernel compiled for
one does not run on another."""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_state = {"dir": None, "ready": False}
_compiled_after_ready: list[str] = []
_lock = threading.Lock()


def device_key(device: torch.device) -> str:
    import triton

    props = torch.cuda.get_device_properties(device)
    name = re.sub(r"[^A-Za-z0-9]+", "-", props.name).strip("-")
    return f"{name}-sm{props.major}{props.minor}-triton{triton.__version__}-torch{torch.__version__.split('+')[0]}"


def use_beside(model_dir: str | Path, device: torch.device) -> Path | None:
    """Point Triton's cache (and autotuning's) at model_dir/jit/<gpu>. None, and the default cache kept, on the
    CPU, without Triton, or when the model's folder is read-only (a mounted volume: Triton's own cache still
    works, within one machine)."""
    if device.type != "cuda":
        return None
    try:
        folder = Path(model_dir) / "jit" / device_key(device)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except ImportError:
        return None
    except OSError as e:
        log.warning("kernel cache: %s is not writable (%s); compiled kernels go to Triton's default cache",
                    model_dir, e)
        return None
    os.environ["TRITON_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"  # read by autotuners created after this
    try:
        from triton import knobs

        knobs.cache.dir = str(folder)
        knobs.autotuning.cache = True
    except (ImportError, AttributeError):  # an older Triton reads the environment alone
        pass
    _state["dir"] = folder
    _watch_compiles()
    return folder


def autotune_kwargs() -> dict:
    """For @triton.autotune: keep each pick on disk (Triton versions that can), whatever the environment said when
    the kernel's module was imported."""
    import triton

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# -- our own tuner's picks ----------------------------------------------------------------------------------------
def _picks_path(name: str) -> Path | None:
    folder = _state["dir"]
    return None if folder is None else folder / f"{name}_picks.json"


def load_picks(name: str) -> dict[str, dict]:
    """The picks a tuner saved in this model's cache on an earlier start ({} without one)."""
    path = _picks_path(name)
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_pick(name: str, key: str, pick: dict) -> None:
    path = _picks_path(name)
    if path is None:
        return
    with _lock:
        picks = load_picks(name)
        picks[key] = pick
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(picks, indent=1, sort_keys=True))
        tmp.replace(path)


# -- what compiles after ready ------------------------------------------------------------------------------------
def _watch_compiles() -> None:
    """Count every kernel variant this process first uses after mark_ready(): each one cost a request its
    compilation (or its load from the disk cache)."""
    try:
        from triton import knobs
    except ImportError:
        return
    previous = knobs.runtime.jit_post_compile_hook
    if getattr(previous, "_cluster_watch", False):
        return

    def hook(*args, **kwargs):
        if _state["ready"]:
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or str(getattr(fn, "jit_function", fn))
            what = f"{name} {kwargs.get('repr') or kwargs.get('key', '')}"[:600]
            with _lock:
                _compiled_after_ready.append(what)
            log.warning("kernel %s compiled after the engine was ready: the warm-up missed this shape", what)
        if previous is not None:
            return previous(*args, **kwargs)
        return None

    hook._cluster_watch = True
    knobs.runtime.jit_post_compile_hook = hook


def starting() -> None:
    """An engine's start begins: its compilations are the warm-up's, not a request's."""
    _state["ready"] = False


def mark_ready() -> None:
    _state["ready"] = True


def compiled_after_ready() -> list[str]:
    with _lock:
        return list(_compiled_after_ready)

