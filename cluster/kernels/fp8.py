"""FP8 (e4m3) weight matmuls: y[M, N] = x[M, K] @ (q[N, K] * scale[N, None]).T (+ bias); see cluster/quant/fp8.py.

Decode reads every weight once per step, so its speed is the weights' bytes: one byte a weight against bf16's two.
Up to GEMV_ROWS activation rows go to the GEMVs here, which stream the fp8 rows along K in contiguous BLOCK_K
bytes (16-byte vector loads), widen them in registers and accumulate in fp32; the per-channel scale multiplies each
output once, at the end. Activations stay in their dtype (W8A16): at these rows the step waits on memory, not on
the math. M = 1 runs on the CUDA cores, structured as gemv.py (FMA into a [BLOCK_N, BLOCK_K] tile); 2..16 rows
widen the weight tile to bf16 (by moving its bits, or through the conversion instructions: whichever measured faster
for the layer's shape) and multiply on the tensor cores (one 16-row tile of x). Both fuse the
MLP's SiLU-and-multiply (GATED: the weight is [gate; up], rounded to the dtype at the same points as gemv.py) and
load their first weight chunk before waiting on the kernel that writes x (programmatic dependent launch, pdl.py).

More rows are compute-bound: x is quantized per token (one program a row: max |x| / 448), then torch._scaled_mm
multiplies e4m3 by e4m3 on Hopper's FP8 tensor cores (twice the bf16 rate) with the per-token and per-channel
scales applied in its epilogue (rowwise scaling), out in bf16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cluster.kernels import activation, jit_cache, pdl
from cluster.kernels.pdl import wait_for_previous
from cluster.quant import fp8 as q8

GEMV_ROWS = 16  # up to this many rows the step is bound by the weights' bytes: the GEMVs
DOT_ROWS = 64  # the most rows the widening dot kernel takes (benchmarks compare it with scaled_mm up to here)
# few configs: each is timed at engine start per layer shape (and per row bucket for the 2..16-row kernel)
GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn in (4, 8, 16) for bk in (1024, 2048) for w in (4, 8) for s in (2, 3) if bn * bk <= 16384]
DOT_CONFIGS = ([triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn in (16, 32, 64) for bk in (128, 256) for s in (3, 4) for w in (4, 8) if w == 4 or bn == 64]
               + [triton.Config({"BLOCK_N": bn, "BLOCK_K": 512}, num_warps=4, num_stages=s)  # long K chunks: the
                  for bn in (16, 32) for s in (2, 3)])  # layers with few output rows (the H200 picked 32 x 512 there)
INTERPRETER_GEMV = {"BLOCK_N": 4, "BLOCK_K": 64}  # the interpreter cannot time configs
INTERPRETER_DOT = {"BLOCK_N": 16, "BLOCK_K": 32}
E4M3_BITS_SCALE = tl.constexpr(2.0 ** 120)  # _widen's WIDEN=1 values are the e4m3 values times 2**-120


@triton.jit
def _epilogue(y, up, rn, n_ok, s_ptr, b_ptr, N, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, dt: tl.constexpr):
    """Per-channel scale and bias on the fp32 sums; GATED: silu(gate) * up with the unfused kernels' roundings."""
    y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if GATED:
        up = up * tl.load(s_ptr + N + rn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)
        gate = y.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        y = act * up.to(dt).to(tl.float32)
    return y


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "GATED"], **jit_cache.autotune_kwargs())
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                 USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M = 1: BLOCK_N fp8 rows (and their up rows) against x, FMA in fp32 on the CUDA cores."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    row = rn.to(tl.int64)[:, None] * K
    row_up = row + N.to(tl.int64) * K
    rk = tl.arange(0, BLOCK_K)
    mask = n_ok[:, None] & (rk[None, :] < K)
    w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
    wait_for_previous(USE_PDL)  # the first chunk of weights is under way before x exists (pdl.py)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    acc = w.to(tl.float32) * x
    acc_up = w_up.to(tl.float32) * x  # unused unless GATED
    for k0 in range(BLOCK_K, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * x
        if GATED:
            w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
            acc_up += w_up.to(tl.float32) * x
    y = _epilogue(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), rn, n_ok, s_ptr, b_ptr, N, HAS_BIAS, GATED,
                  y_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _widen(w, dt: tl.constexpr, WIDEN: tl.constexpr):
    """e4m3 weight tile -> the dot's operand. WIDEN 0: x's dtype through the conversion instructions (e4m3 -> f16 ->
    f32 -> dtype); 1: bf16 by moving the bits (the value * 2**-120, integer ops only: fewer instructions a weight).
    Both are exact (e4m3 subnormals become bf16 subnormals)."""
    if WIDEN == 1:
        b = w.to(tl.uint8, bitcast=True).to(tl.int32)
        return (((b & 0x80) << 8) | ((b & 0x7F) << 4)).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(dt)


@triton.autotune(configs=DOT_CONFIGS, key=["BLOCK_M", "N", "K", "GATED", "WIDEN"], **jit_cache.autotune_kwargs())
@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                     USE_PDL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """2..DOT_ROWS rows: the fp8 tile widened in registers (_widen), one BLOCK_M-row tile of x on the tensor cores.
    BLOCK_M is M's power of two (at least 16), so the row counts tune a few times each."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    row = rn.to(tl.int64)[:, None] * K
    row_up = row + N.to(tl.int64) * K
    dt = x_ptr.dtype.element_ty
    rk = tl.arange(0, BLOCK_K)
    mask = n_ok[:, None] & (rk[None, :] < K)
    w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    acc = tl.dot(x, tl.trans(_widen(w, dt, WIDEN)), input_precision=PRECISION)
    acc_up = acc  # unused unless GATED
    if GATED:
        acc_up = tl.dot(x, tl.trans(_widen(w_up, dt, WIDEN)), input_precision=PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (rk[None, :] < K)
        w = tl.load(w_ptr + row + rk[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(_widen(w, dt, WIDEN)), acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptr + row_up + rk[None, :], mask=mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(_widen(w_up, dt, WIDEN)), acc_up, input_precision=PRECISION)
    if WIDEN == 1:
        acc = acc * E4M3_BITS_SCALE
        acc_up = acc_up * E4M3_BITS_SCALE
    y = _epilogue(acc, acc_up, rn[None, :], n_ok[None, :], s_ptr, b_ptr, N, HAS_BIAS, GATED, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok[None, :])


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr):
    """One row of x -> e4m3 values and its fp32 scale max |x| / 448 (dynamic per-token activation scales)."""
    row = tl.program_id(0).to(tl.int64) * K
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row + rk, mask=rk < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + tl.program_id(0), scale)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row + rk, mask=rk < K, other=0.0).to(tl.float32) / scale
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        tl.store(q_ptr + row + rk, x.to(q_ptr.dtype.element_ty), mask=rk < K)


def _out_rows(weight: torch.Tensor, gated: bool) -> int:
    n = weight.shape[0]
    assert not gated or n % 2 == 0, n
    return n // 2 if gated else n


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
         gated: bool = False, config: dict | None = None, widen: int | None = None) -> torch.Tensor:
    """x [M <= DOT_ROWS, K] contiguous, weight e4m3 [N, K], scale fp32 [N] -> [M, N] in x's dtype (gated: [M, N / 2]).
    config: fixed block sizes instead of the autotuner's (the interpreter; tests)."""
    m, k = x.shape
    assert m <= DOT_ROWS and weight.shape[1] == k and x.is_contiguous() and weight.is_contiguous(), (x.shape,
                                                                                                      weight.shape)
    n = _out_rows(weight, gated)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y  # any pointer; unread without HAS_BIAS
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if widen is None:  # measured on the H200 (fp8_dot_variants.py): the bit moves win on gate/up, down and o
        widen = 0 if not gated and n > k else 1  # (13-44 against 15-56 us at 2-16 rows); qkv (N > K) 18 against 23
    args, kw = (bias is not None, gated), pdl.launch_args(x)
    if m == 1:
        kernel, cfg = _gemv_kernel, config or (INTERPRETER_GEMV if interp else None)
        head = (x, weight, scale, b, y, n, k)
    else:
        kernel, cfg = _gemv_dot_kernel, config or (INTERPRETER_DOT if interp else None)
        head = (x, weight, scale, b, y, m, n, k)
        kw["PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"
        kw["WIDEN"] = widen if x.dtype == torch.bfloat16 else 0
        kw["BLOCK_M"] = max(16, triton.next_power_of_2(m))
    if cfg is not None:
        kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]),)](*head, *args, **cfg, **kw)
    else:
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*head, *args, **kw)
    return y


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] contiguous -> (e4m3 [M, K], fp32 scales [M, 1]); the values of quant.fp8.quantize_tokens."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=q8.FP8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](x, q, s, k, BLOCK_K=min(4096, triton.next_power_of_2(k)))
    return q, s


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              gated: bool = False) -> torch.Tensor:
    """Many rows: x quantized per token, then e4m3 x e4m3 on the FP8 tensor cores (torch._scaled_mm, rowwise
    scales), out in bf16, then x's dtype; the gate as a separate kernel."""
    xq, xs = quantize_tokens(x.contiguous())
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return activation.silu_and_mul(y) if gated else y


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               gated: bool = False) -> torch.Tensor:
    """Up to GEMV_ROWS rows: the GEMVs; more: scaled_mm where _scaled_mm's shapes allow (K and N multiples of 16),
    else the dequantizing reference."""
    if x.dim() == 2 and x.shape[0] <= GEMV_ROWS and x.is_contiguous():
        return gemv(x, weight, scale, bias, gated)
    if x.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and x.shape[0] > GEMV_ROWS:
        return scaled_mm(x, weight, scale, bias, gated)
    y = q8.linear(x, weight, scale, bias)
    return activation.silu_and_mul(y) if gated else y


def chosen_configs() -> dict:
    """The autotuners' picks, for benchmark reports."""
    return {name: {str(k): str(c) for k, c in kern.cache.items()}
            for name, kern in (("gemv", _gemv_kernel), ("gemv_dot", _gemv_dot_kernel))}
