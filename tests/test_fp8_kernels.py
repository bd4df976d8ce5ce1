"""The FP8 kernels (cluster/kernels/fp8.py) against the dequantizing reference, under Triton's interpreter on the
CPU: the M = 1 GEMV, the 2..16-row tensor-core GEMV, the gated epilogue, the per-token activation quantizer. Shapes
are odd on purpose: K not a multiple of the block, N below one tile. The interpreter loads float8 tensors as such
(checked here by the exact activation quantizer); torch._scaled_mm needs Hopper and is checked by
benchmarks/bench_w4a16_e2e.py on the GPU."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: @triton.jit reads it when the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_kernels import TOL, _load, _patch_interpreter_bf16_dot, rel_err  # noqa: E402

from cluster.kernels import reference as ref  # noqa: E402
from cluster.quant import fp8 as q8  # noqa: E402

_patch_interpreter_bf16_dot()
k8 = _load("fp8")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed draws: a bf16 gated case with an unlucky draw lands near its tolerance (rounding near silu's zero)."""
    torch.manual_seed(0)


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return q8.quantize_weight(torch.randn(n, k) * 0.1)


def _ref(x, q, s, b, gated=False):
    """The reference in fp32, rounded to the dtype where the kernels round (the product, then the gate)."""
    y = q8.linear(x.float(), q, s, None if b is None else b.float()).to(x.dtype)
    return ref.silu_and_mul(y) if gated else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(1, 3, 100), (1, 37, 200), (3, 5, 100), (16, 33, 72), (7, 20, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_gemv_matches_the_reference(dtype, M, N, K, bias):
    q, s = _weight(N, K)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    got = k8.gemv(x, q, s, b)
    assert got.shape == (M, N) and got.dtype == dtype and rel_err(got, _ref(x, q, s, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 5, 100), (4, 19, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_gemv_gated(dtype, M, N, K, bias):
    """weight [gate; up]: silu(gate) * up with the product rounded to the dtype first, as the unfused kernels."""
    q, s = _weight(2 * N, K)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(2 * N, dtype=dtype) if bias else None
    got = k8.gemv(x, q, s, b, gated=True)
    assert got.shape == (M, N) and rel_err(got, _ref(x, q, s, b, gated=True)) < TOL[dtype]


def test_fp8_gemv_several_k_steps_and_row_tiles():
    """Block sizes that make K take three steps and N several programs, on both GEMVs."""
    q, s = _weight(40, 150)
    for m, cfg in ((1, {"BLOCK_N": 8, "BLOCK_K": 64}), (5, {"BLOCK_N": 16, "BLOCK_K": 64})):
        x = torch.randn(m, 150)
        assert rel_err(k8.gemv(x, q, s, config=cfg), _ref(x, q, s, None)) < TOL[torch.float32]


@pytest.mark.parametrize("m, widen", [(1, 0), (2, 0), (2, 1)])
def test_fp8_gemv_widens_every_e4m3_value_exactly(m, widen):
    """Each of the 254 finite e4m3 values (zeros, negatives, subnormals, 448) at each byte of a word comes out of
    the GEMVs' widening as torch's own value: the conversion instructions (M = 1, and the dot kernel's WIDEN 0) and
    the dot kernel's bit moves (WIDEN 1)."""
    codes = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    n, k = len(codes), 8
    q = torch.zeros(n * k, k, dtype=torch.uint8)
    for pos in range(k):
        q[pos * n:(pos + 1) * n, pos] = codes
    q = q.view(q8.FP8)
    x = torch.ones(m, k, dtype=torch.bfloat16)
    got = k8.gemv(x, q, torch.ones(n * k), config={"BLOCK_N": 64 if m == 1 else 32, "BLOCK_K": k if m == 1 else 32},
                  widen=widen)
    want = q.float().sum(dim=1).to(torch.bfloat16)
    assert all(torch.equal(got[i], want) for i in range(m))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_tokens_matches_the_reference(dtype):
    """Per-token scales and e4m3 values as quant.fp8.quantize_tokens gives them (K above one block: 2 passes).

    The interpreter's fp32 -> e4m3 cast (numpy, not the GPU's cvt.rn.satfinite) drops the carry when a value rounds
    up into the next power of two (127.2 -> 64, not 128); it also rounds ties up rather than to
    even and truncates below e4m3's smallest normal. Those elements may differ here: by half, or by one step."""
    x = torch.randn(5, 5000, dtype=dtype) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 500.0])[:, None].to(dtype)
    q, s = k8.quantize_tokens(x)
    want_q, want_s = q8.quantize_tokens(x)
    assert q.dtype == q8.FP8 and s.shape == (5, 1)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    got, want = q.float(), want_q.float()
    carry = (got * 2 == want) & (torch.frexp(want)[0].abs() == 0.5) & (want != 0)
    step = torch.exp2(torch.frexp(want)[1].float() - 4).clamp(min=2.0 ** -9)  # one e4m3 step at want
    other = (got != want) & ~carry  # ties (the interpreter rounds them up, not to even) and subnormals
    assert ((got - want).abs()[other] <= step[other]).all() and other.float().mean() < 0.02
    assert carry.float().mean() < 0.05


def test_linear_fp8_dispatch_falls_back_where_scaled_mm_cannot_run():
    """Above 16 rows with N or K not a multiple of 16 (torch._scaled_mm's rule): the dequantizing reference."""
    q, s = _weight(20, 40)
    x = torch.randn(17, 40)
    assert rel_err(k8.linear_fp8(x, q, s), _ref(x, q, s, None)) < 1e-6
