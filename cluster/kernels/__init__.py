"""Kernel entry points: Triton on CUDA tensors; on the CPU the C kernels of cpu_native.py where they apply, the
plain-torch reference elsewhere.

`CLUSTER_KERNELS=reference` forces the reference everywhere (read at each call, so tests can flip it). Triton is
imported only when a CUDA tensor first arrives, so `import cluster.kernels` works on machines without it.
"""
import importlib
import os
from types import ModuleType

import torch

from cluster.kernels import mla_reference, reference

__all__ = ["act_and_mul", "linear", "linear_fp8", "linear_w4", "mla_attention", "mla_decode_attention", "moe_experts",
           "paged_attention", "paged_decode_attention", "prefetch_l2", "rms_norm", "rotary_and_store", "silu_and_mul",
           "store_kvcache", "store_latent"]

_modules: dict[str, ModuleType | None] = {}


def _triton(name: str, t: torch.Tensor) -> ModuleType | None:
    """The Triton module `cluster.kernels.<name>` if `t` lives on CUDA and Triton works here, else None."""
    if not t.is_cuda or os.environ.get("CLUSTER_KERNELS") == "reference":
        return None
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"cluster.kernels.{name}")
        except ImportError:  # no triton on this machine: the reference still runs on CUDA
            _modules[name] = None
    return _modules[name]


def _cpu(t: torch.Tensor) -> ModuleType | None:
    """cpu_native (one C call per op) for a CPU tensor, where its library builds; it falls back to the reference
    itself for what it does not cover. Kept short: on the CPU this dispatch runs ~150 times a decode step."""
    if t.device.type != "cpu" or os.environ.get("CLUSTER_KERNELS") == "reference":
        return None
    mod = _modules.get("cpu_native", False)
    if mod is False:
        from cluster.kernels import cpu_native

        mod = _modules["cpu_native"] = cpu_native if cpu_native.available() else None
    return mod if mod is None or os.environ.get("CLUSTER_CPU_NATIVE", "1") != "0" else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
           act: str = "silu") -> torch.Tensor:
    """x @ weight.T + bias. One row of half-precision activations on CUDA (decode at batch 1, where the step is
    bound by reading the weights) goes through the Triton GEMV, which reads them faster than cuBLAS.

    gated: weight is the MLP's [gate; up] and the result is act_and_mul(product, act), applied inside the GEMV
    where it runs (silu and gelu_tanh)."""
    if x.shape[0] == 1 and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous():
        mod = _triton("gemv", x)
        if mod is not None and (not gated or act in mod.FUSED_ACTS):
            return mod.gemv(x, weight, bias, gated, act)
    y = torch.nn.functional.linear(x, weight, bias)
    return act_and_mul(y, act) if gated else y


def linear_w4(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None, gated: bool = False, act: str = "silu") -> torch.Tensor:
    """x @ W.T + bias for a 4-bit weight (reference.linear_w4); the Triton path dequantizes in registers, so the
    weight crosses memory at a quarter of its bf16 bytes. gated: act_and_mul of the result (SwiGLU fused on CUDA)."""
    if gated and act != "silu":
        return act_and_mul(linear_w4(x, qweight, zeros, scales, bias), act)
    mod = _triton("w4a16", x)
    if mod is not None:
        return mod.linear_w4(x, qweight, zeros, scales, bias, gated)
    y = reference.linear_w4(x, qweight, zeros, scales, bias)
    return silu_and_mul(y) if gated else y


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               gated: bool = False, act: str = "silu") -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias for an e4m3 weight with per-output-channel fp32 scales
    (cluster/quant/fp8.py). On CUDA up to 16 rows read the fp8 bytes in a GEMV, more go to torch._scaled_mm with
    per-token activation scales; elsewhere the weight is dequantized (quant.fp8.linear). gated: act_and_mul."""
    if gated and act != "silu":
        return act_and_mul(linear_fp8(x, weight, scale, bias), act)
    mod = _triton("fp8", x)
    if mod is not None:
        return mod.linear_fp8(x, weight, scale, bias, gated)
    from cluster.quant import fp8

    y = fp8.linear(x, weight, scale, bias)
    return silu_and_mul(y) if gated else y


def prefetch_l2(weight: torch.Tensor, nbytes: int, parts: int = 1) -> None:
    """A hint: the first nbytes of weight (of each of its `parts` row blocks) towards L2 ahead of its GEMV, while the
    kernels before it leave the memory bus idle (prefetch.py). Nothing off CUDA or outside a PDL chain."""
    mod = _triton("prefetch", weight)
    if mod is not None:
        mod.prefetch_l2(weight, nbytes, parts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pre_weight: torch.Tensor | None = None):
    """RMSNorm in fp32; with `residual`, returns (norm(x + residual), x + residual); with pre_weight too, x is
    normed by it first (a sandwich norm and the next norm in one kernel)."""
    return (_triton("norm", x) or _cpu(x) or reference).rms_norm(x, weight, eps, residual, pre_weight)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2N] = [gate | up] -> silu(gate) * up."""
    return (_triton("activation", x) or reference).silu_and_mul(x)


def act_and_mul(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[..., 2N] = [gate | up] -> act(gate) * up: SwiGLU through silu_and_mul, the others (Gemma's GeGLU) in torch."""
    return silu_and_mul(x) if act == "silu" else reference.act_and_mul(x, act)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write K/V [T, Hkv, D] into their cache slots (slot -1 skips); with scales, an int8 cache (see reference)."""
    return (_triton("kvcache", k) or reference).store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Neox rotary of q [T, Hq, D] and k [T, Hkv, D] at `positions`, then store_kvcache of k and v (one kernel on the
    GPU); returns the rotated q (rotated in place by the Triton path)."""
    return (_triton("rotary", q) or _cpu(q) or reference).rotary_and_store(q, k, v, positions, cos_sin, k_cache,
                                                                          v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context (prefill, chunk, decode alike);
    softcap > 0: scores soft-capped (Gemma 2); window > 0: each query sees its last `window` keys only; alibi:
    fp32 [Hq] ALiBi slopes added as slope * (key - query position) (Baichuan-13B)."""
    return (_triton("attention", q) or _cpu(q) or reference).paged_attention(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, k_scale, v_scale, softcap, window, alibi)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context_len: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence over its cache (softcap, window, alibi: as paged_attention); the Triton path is
    CUDA-graph capturable, with softcap and window as per-layer launch arguments and the slopes a layer tensor."""
    return (_triton("attention", q) or _cpu(q) or reference).paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, k_scale=k_scale, v_scale=v_scale,
        softcap=softcap, window=window, alibi=alibi)


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor) -> torch.Tensor:
    """Each token's k experts (experts, weights [T, k]) applied and summed; see reference.moe_experts. The Triton
    path reads only the chosen experts and is CUDA-graph capturable."""
    return (_triton("moe", x) or reference).moe_experts(x, w13, w2, weights, experts)


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """MLA: this step's latent rows [T, L + R] into their slots of the latent cache (mla_reference.py)."""
    return (_triton("mla", latent) or mla_reference).store_latent(latent, cache, slot_mapping)


def mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """MLA prefill / chunk / mixed batch over the latent cache (causal); the Triton path syncs nothing."""
    return (_triton("mla", q) or mla_reference).mla_attention(q, cache, block_tables, context_lens, cu_seqlens_q,
                                                              scale, v_dim)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, v_dim: int, max_context_len: int | None = None) -> torch.Tensor:
    """MLA decode, one query per sequence; the Triton path is CUDA-graph capturable."""
    return (_triton("mla", q) or mla_reference).mla_decode_attention(q, cache, block_tables, context_lens, scale,
                                                                     v_dim, max_context_len)
