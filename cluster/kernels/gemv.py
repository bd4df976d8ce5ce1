"""Triton GEMV: y[1, N] = x[1, K] @ W[N, K].T (+ bias) for decode at batch 1.

A batch-1 decode step does nothing but stream the weights once, so its speed is the matmuls' read bandwidth. On an
H100 cuBLAS reads a Llama-3-8B step's weights at 2.71 TB/s; this kernel at 2.95 TB/s, against 3.03 TB/s for a
plain read (benchmarks/gemv_headroom.py). Each program owns BLOCK_N rows of W and streams them along K in
contiguous BLOCK_K chunks, accumulating in fp32.

GATED: W is the MLP's stacked [gate; up] (2N rows) and the output is act(x @ gate.T) * (x @ up.T), act SiLU
(SwiGLU) or tanh-GELU (GEGLU: Gemma): each program streams its BLOCK_N gate rows and the matching up rows against one
load of x, and applies the activation to its own outputs (rounded to x's dtype at the same points as the separate
kernels), which saves a launch per layer (two for GEGLU, whose torch form is gelu then multiply).
"""
import os

import torch
import triton
import triton.language as tl

from cluster.kernels import jit_cache, pdl
from cluster.kernels.pdl import wait_for_previous

# One- and two-row programs with 2048-wide chunks too: more, smaller programs shorten the last wave of the narrow
# matmuls (o_proj, down_proj: N = hidden), which run at 3.0-3.5 TB/s against 4.3-4.5 for the wide ones.
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8) for s in (2, 4)
           if bn * bk <= 8192 and (bk < 2048 or bn <= 2) and (bn > 1 or bk > 512)]
INTERPRETER_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 64}  # the interpreter cannot time configs


FUSED_ACTS = ("silu", "gelu_tanh")  # GATED's activations, by their ACT number
GELU_TANH_2C = tl.constexpr(2 * 0.7978845608028654)  # gelu_tanh(g) = g * sigmoid(2 * sqrt(2 / pi) * (g + 0.044715 g^3))


@triton.autotune(configs=CONFIGS, key=["N", "K", "GATED", "ACT"], **jit_cache.autotune_kwargs())
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                 USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = rn.to(tl.int64)[:, None] * K  # int64: the LM head's N * K passes 2**31 elements
    row_up = row + N * K  # GATED: the up rows, N below their gate rows
    # The first chunk of weights is loaded before waiting on the kernel that produces x (see pdl.py), so the weight
    # stream is already under way when x arrives; the loop then carries on from the second chunk.
    rk = tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    acc = w.to(tl.float32) * x
    acc_up = w_up.to(tl.float32) * x  # unused unless GATED
    for k0 in range(BLOCK_K, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * x
        if GATED:
            w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
            acc_up += w_up.to(tl.float32) * x
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(acc_up, axis=1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)
        dt = y_ptr.dtype.element_ty
        gate = y.to(dt).to(tl.float32)
        if ACT == 1:  # tanh-GELU as the sigmoid form of the same tanh
            z = GELU_TANH_2C * (gate + 0.044715 * gate * gate * gate)
            act = (gate / (1.0 + tl.exp(-z))).to(dt).to(tl.float32)
        else:
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        y = act * up.to(dt).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         act: str = "silu") -> torch.Tensor:
    """x [1, K] contiguous, weight [N, K] contiguous -> [1, N] in x's dtype; gated: weight is [gate; up] and the
    result [1, N/2] is act(gate part) * up part, act one of FUSED_ACTS."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.is_contiguous() and weight.is_contiguous(), (x.shape, weight.shape)
    if gated:
        assert n % 2 == 0, n
        n //= 2
    code = FUSED_ACTS.index(act) if gated else 0
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y  # any pointer; unread without HAS_BIAS
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg = INTERPRETER_CONFIG
        _gemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]),)](x, weight, b, y, n, k, bias is not None, gated, code,
                                                              **cfg, **pdl.launch_args(x))
    else:
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, b, y, n, k, bias is not None, gated,
                                                                             code, **pdl.launch_args(x))
    return y


def chosen_configs() -> dict:
    """The autotuner's pick per (N, K), for benchmark reports."""
    return {str(key): str(cfg) for key, cfg in _gemv_kernel.cache.items()}
