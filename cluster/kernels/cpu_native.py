"""The CPU's fast path for the ops a decode step runs once per layer: RMSNorm (+ residual, + sandwich pre-norm),
rotary + KV store, and attention over the paged cache (decode, and short prefills), each one call into cpu_native.c instead of the
reference's 8 to 30 torch ops.

On 2 cores a SmolLM2 step is ~2,000 torch ops of 1-5 us each beside its matmuls, and the reference's decode
attention gathers a padded copy of every sequence's K/V before SDPA reads it again. The C file is built once per
machine with the system's C compiler (about a second; `cc` with -march=native, so the library is cached per CPU
model under the cluster cache dir) and loaded with ctypes. Anything it does not cover (other dtypes, quantized
caches, soft-capping, windows, ALiBi) goes to the reference, as does everything when there is no compiler:
`available()` says which, and CLUSTER_CPU_NATIVE=0 turns it off.

Numerics: fp32 arithmetic with the reference's roundings to bf16 at the same points; sums (the norm's mean, the
attention's dots and softmax) are accumulated in another order than torch's, so fp32 results can differ from the
reference in the last bit, and bf16 ones, rarely, by a bf16 step or two.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cluster.kernels import reference

SOURCE = Path(__file__).with_name("cpu_native.c")
# -fopenmp: libgomp.so.1, which resolves to the copy torch has already loaded (torch is imported first): one pool
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [ctypes.c_int, _I, _I, _P, _I, _P, _I, _P, _P, _F, _P, _P],
    "rotary_store": [ctypes.c_int, _I, _I, _I, _I, _P, _I, _I, _P, _I, _I, _P, _I, _I, _P, _P, _I, _P, _P, _P],
    "decode_attention": [ctypes.c_int, _I, _I, _I, _I, _P, _I, _I, _P, _P, _I, _P, _I, _P, _F, _P, _I, _I],
    "prefill_attention": [ctypes.c_int, _I, _I, _I, _I, _P, _I, _I, _P, _P, _I, _P, _I, _P, _P, _P, _F, _P, _I, _I],
}
# prefill_attention reads every key once per query, so it takes a sequence that is a whole prompt of at most
# PREFILL_MAX_TOKENS (no cached prefix) or whose new tokens x context is at most PREFILL_MAX_PAIRS (a decode row in
# a mixed batch, a short chunk); the reference (one SDPA a sequence) keeps the rest. From
# benchmarks/bench_cpu_prefill_attention.py (bf16, this 2-core AVX512 CPU): whole prompts 1.4-2.7x the reference
# up to 1,024 tokens, 16 x 48 3.8x, but a 128-token chunk over 512 cached 0.7x.
PREFILL_MAX_TOKENS = 1024
PREFILL_MAX_PAIRS = 4096


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _library_path() -> Path:
    root = Path(os.environ.get("CLUSTER_CACHE_DIR") or Path.home() / ".cache" / "cluster")  # convert.cache's root
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    return root / "native" / f"cpu_native-{key}.so"


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # built aside, then renamed: builds may race
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The built library, building it on first use; None where it cannot be built or is turned off."""
    global _lib
    if os.environ.get("CLUSTER_CPU_NATIVE", "1") == "0":
        return None
    if _lib is False:
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            for name, args in _SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = None
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:
            import logging

            logging.getLogger(__name__).warning("CPU kernels not built (%s); the torch reference runs instead", e)
            _lib = None
    return _lib or None


def available() -> bool:
    return library() is not None


def _dt(*ts: torch.Tensor) -> int | None:
    """The kernels' dtype code if every tensor is a CPU tensor of one supported dtype with a unit last stride."""
    d = DTYPES.get(ts[0].dtype)
    ok = d is not None and all(t.device.type == "cpu" and t.dtype == ts[0].dtype and t.stride(-1) == 1 for t in ts)
    return d if ok else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pre_weight: torch.Tensor | None = None):
    # a few microseconds of Python per call is what this op costs: the checks stay short
    lib, n = library(), x.shape[-1]
    dt = DTYPES.get(x.dtype)
    if (lib is None or dt is None or x.dim() != 2 or x.stride(1) != 1 or weight.dtype != x.dtype
            or not weight.is_contiguous() or (residual is not None and (residual.dtype != x.dtype
                                                                        or not residual.is_contiguous()))
            or (pre_weight is not None and (pre_weight.dtype != x.dtype or not pre_weight.is_contiguous()))):
        return reference.rms_norm(x, weight, eps, residual, pre_weight)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if residual is None:
        lib.rms_norm(dt, x.shape[0], n, x.data_ptr(), x.stride(0), 0, 0, 0, weight.data_ptr(), eps, out.data_ptr(), 0)
        return out
    rout = torch.empty_like(out)
    lib.rms_norm(dt, x.shape[0], n, x.data_ptr(), x.stride(0), residual.data_ptr(), n,
                 0 if pre_weight is None else pre_weight.data_ptr(), weight.data_ptr(), eps, out.data_ptr(),
                 rout.data_ptr())
    return out, rout


def rotary_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """As reference.rotary_and_store, with q rotated in place (as the Triton kernel does) and returned."""
    lib = library()
    dt = _dt(q, k, v, k_cache, v_cache) if lib is not None else None
    T, hq, d = q.shape
    if (dt is None or k_scale is not None or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or cos_sin.dtype != torch.float32 or cos_sin.shape[-1] != d or cos_sin.stride(-1) != 1 or d % 2
            or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64
            or not (positions.is_contiguous() and slot_mapping.is_contiguous())):
        return reference.rotary_and_store(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale,
                                          v_scale)
    lib.rotary_store(dt, T, hq, k.shape[1], d, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0),
                     k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), positions.data_ptr(), cos_sin.data_ptr(),
                     cos_sin.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr())
    return q


def _plain_cache(q, k_cache, v_cache, block_tables, context_lens, k_scale, softcap, window, alibi) -> int | None:
    """The dtype code where the C attention kernels apply (unquantized, no soft-cap, window or ALiBi), else None."""
    dt = _dt(q, k_cache, v_cache) if library() is not None else None
    if (dt is None or k_scale is not None or softcap or window or alibi is not None
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or block_tables.dtype != torch.int32
            or context_lens.dtype != torch.int32 or block_tables.stride(-1) != 1 or not context_lens.is_contiguous()):
        return None
    return dt


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """As reference.paged_attention: the sequences PREFILL_MAX_TOKENS / PREFILL_MAX_PAIRS admit in one C call, the
    others through the reference one by one."""
    dt = _plain_cache(q, k_cache, v_cache, block_tables, context_lens, k_scale, softcap, window, alibi)
    if dt is None or cu_seqlens_q.dtype != torch.int32 or not cu_seqlens_q.is_contiguous():
        return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                                         k_scale, v_scale, softcap, window, alibi)
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    take = [int((e - s == c and c <= PREFILL_MAX_TOKENS) or (e - s) * c <= PREFILL_MAX_PAIRS)
            for s, e, c in zip(cu, cu[1:], lens)]
    T, hq, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)
    if T and any(take):
        flags = torch.tensor(take, dtype=torch.int32)
        library().prefill_attention(dt, len(take), hq, k_cache.shape[2], d, q.data_ptr(), q.stride(0), q.stride(1),
                                    k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], block_tables.data_ptr(),
                                    block_tables.stride(0), context_lens.data_ptr(), cu_seqlens_q.data_ptr(),
                                    flags.data_ptr(), scale, out.data_ptr(), out.stride(0), out.stride(1))
    for b, taken in enumerate(take):
        s, e = cu[b], cu[b + 1]
        if not taken and e > s:
            out[s:e] = reference.paged_attention(q[s:e], k_cache, v_cache, block_tables[b:b + 1],
                                                 context_lens[b:b + 1], cu_seqlens_q.new_tensor([0, e - s]), scale)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context_len: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    dt = _plain_cache(q, k_cache, v_cache, block_tables, context_lens, k_scale, softcap, window, alibi)
    if dt is None:
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                max_context_len, k_scale=k_scale, v_scale=v_scale, softcap=softcap,
                                                window=window, alibi=alibi)
    B, hq, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)
    if B:
        library().decode_attention(dt, B, hq, k_cache.shape[2], d, q.data_ptr(), q.stride(0), q.stride(1),
                                   k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], block_tables.data_ptr(),
                                   block_tables.stride(0), context_lens.data_ptr(), scale, out.data_ptr(),
                                   out.stride(0), out.stride(1))
    return out
