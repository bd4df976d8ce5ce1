"""The Triton kernels, run on the CPU by Triton's interpreter, against the plain-torch references.

Every case draws fresh random inputs, poisons the outputs with NaN (so an element the kernel never writes fails) and
compares by ||out - ref|| / ||ref||. Sizes are tiny because the interpreter runs each program in Python; the launch
configs are shrunk too, so the multi-tile, multi-page and split paths all run.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: @triton.jit reads it when the kernels are defined

import importlib  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")


def _load(name: str):
    """The Triton module, (re)imported so that its kernels are interpreted ones even if imported before."""
    mod = sys.modules.get(f"cluster.kernels.{name}")
    return importlib.reload(mod) if mod is not None else importlib.import_module(f"cluster.kernels.{name}")


from cluster import kernels  # noqa: E402
from cluster.kernels import reference as ref  # noqa: E402

attn, norm, act, rot, kv, gemv, moe, _, w4 = (_load(n) for n in ("attention", "norm", "activation", "rotary",
                                                                   "kvcache", "gemv", "moe", "w4a16_gemv", "w4a16"))



def _patch_interpreter_bf16_dot() -> None:
    """Triton's interpreter (3.9 at least) keeps bf16 as raw uint16 bits and feeds them to np.matmul as integers.

    Widen bf16 operands to fp32 first (exact: bf16 is the top half of an fp32), as the GPU's tensor cores do.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_fixed", False):
        return
    orig = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, *args):
        return orig(self, widen(a), widen(b), d, *args)

    create_dot._bf16_fixed = True
    builder.create_dot = create_dot


_patch_interpreter_bf16_dot()

TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def poison(monkeypatch, request):
    """Every float tensor the kernels allocate (their outputs) starts as NaN; each test draws its own inputs."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    assert out.shape == expect.shape
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    return ((out.double() - expect.double()).norm() / expect.double().norm()).item()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# -- elementwise kernels -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x, w = torch.randn(5, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    r = torch.randn(5, 96, dtype=dtype) if with_residual else None
    got, want = norm.rms_norm(x, w, 1e-6, r), ref.rms_norm(x, w, 1e-6, r)
    if with_residual:
        assert rel_err(got[1], want[1]) < TOL[dtype]
        got, want = got[0], want[0]
    assert got.dtype == want.dtype and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_a_sandwich_pre_norm_is_the_two_norms(dtype):
    """The post-norm of a block's output, the residual add and the next norm in one kernel: the same values as the
    post-norm kernel followed by the add-and-norm kernel."""
    x, r = torch.randn(5, 96, dtype=dtype) * 3, torch.randn(5, 96, dtype=dtype)
    w, pw = torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype)
    out, res = norm.rms_norm(x, w, 1e-6, r, pre_weight=pw)
    want_out, want_res = norm.rms_norm(norm.rms_norm(x, pw, 1e-6), w, 1e-6, r)
    assert rel_err(res, want_res) < TOL[dtype] and rel_err(out, want_out) < TOL[dtype]
    ref_out, ref_res = ref.rms_norm(x, w, 1e-6, r, pre_weight=pw)
    assert rel_err(ref_res, want_res) < TOL[dtype] and rel_err(ref_out, want_out) < TOL[dtype]
    assert rel_err(res, r) > 0.1  # the pre-norm was applied (x is 3x the residual's scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(2, 3, 2 * 80, dtype=dtype)
    assert rel_err(act.silu_and_mul(x), ref.silu_and_mul(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(37, 200), (8, 64), (130, 96)])  # rows and K not multiples of the blocks too
def test_gemv(dtype, bias, n, k):
    x, w = torch.randn(1, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    got = gemv.gemv(x, w, b)
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(37, 200), (130, 96)])
@pytest.mark.parametrize("act_name", ["silu", "gelu_tanh"])
def test_gemv_gated_is_gemv_then_act_and_mul(dtype, bias, n, k, act_name):
    x, w = (torch.randn(1, k) / k ** 0.5).to(dtype), torch.randn(2 * n, k, dtype=dtype)  # gates ~1: acts differ
    b = torch.randn(2 * n, dtype=dtype) if bias else None
    want = ref.act_and_mul(gemv.gemv(x, w, b), act_name)  # the product rounded to the dtype first, as unfused
    got = gemv.gemv(x, w, b, gated=True, act=act_name)
    assert got.shape == (1, n) and got.dtype == dtype and rel_err(got, want) < TOL[dtype]
    other = ref.act_and_mul(gemv.gemv(x, w, b), "gelu_tanh" if act_name == "silu" else "silu")
    assert rel_err(got, other) > TOL[dtype]  # the activation asked for, not the other one


def _w4_weight(N: int, K: int, group: int, dtype: torch.dtype):
    from cluster.quant import int4

    q, zeros, scales = int4.quantize(torch.randn(N, K), group)
    return int4.pack(q), zeros.to(dtype), scales.to(dtype)


def _w4_ref(x, qweight, zeros, scales, b):
    return ref.linear_w4(x.float(), qweight, zeros.float(), scales.float(), None if b is None else b.float())


W4_SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, group", [(1, 40, 64, 32), (1, 24, 160, 32), (3, 24, 96, 32), (17, 33, 160, 32),
                                            (1, 8, 32, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_w4_matches_the_reference(dtype, M, N, K, group, bias):
    """4-bit weights dequantized in registers: N below a tile and not a multiple of it, K an odd number of steps,
    M = 1 (the GEMV, in one step and in several with the next step's loads issued early), 3 and 17 (the tensor-core
    kernel, two row tiles at 17), groups of 16 and 32."""
    qweight, zeros, scales = _w4_weight(N, K, group, dtype)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    got = w4.linear_w4(x, qweight, zeros, scales, b)
    assert got.shape == (M, N) and got.dtype == dtype and rel_err(got, _w4_ref(x, qweight, zeros, scales, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, split", [(1, 20, 160, 2), (3, 33, 96, 3), (17, 8, 128, 4)])
@pytest.mark.parametrize("gated, bias", [(False, True), (True, True)])
def test_linear_w4_split_k(dtype, M, N, K, split, gated, bias):
    """K split over programs (few output tiles), partials reduced with the bias and the gate in a second kernel:
    the same as the one-pass kernel, and K steps that do not divide evenly between the splits."""
    rows = 2 * N if gated else N
    qweight, zeros, scales = _w4_weight(rows, K, 32, dtype)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(rows, dtype=dtype) if bias else None
    qw = qweight.view(torch.int32)
    got = w4.launch(x, qw, zeros, scales, b, gated, dict(W4_SMALL, split=split))
    want = w4.launch(x, qw, zeros, scales, b, gated, dict(W4_SMALL, split=1))
    assert got.shape == (M, N) and rel_err(got, want) < TOL[dtype]
    if not gated:
        assert rel_err(got, _w4_ref(x, qweight, zeros, scales, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 37, 96), (17, 16, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_w4_gated_is_linear_then_silu_and_mul(dtype, M, N, K, bias):
    """The fused gate/up epilogue: the product rounded to the dtype first, as the unfused kernels do."""
    qweight, zeros, scales = _w4_weight(2 * N, K, 32, dtype)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(2 * N, dtype=dtype) if bias else None
    want = ref.silu_and_mul(w4.linear_w4(x, qweight, zeros, scales, b))
    got = w4.linear_w4(x, qweight, zeros, scales, b, gated=True)
    assert got.shape == (M, N) and got.dtype == dtype and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("gated", [False, True])
def test_linear_w4_dequantize_then_matmul(gated):
    """The large-M path: the weight dequantized to the dtype by a kernel, then one dense matmul."""
    qweight, zeros, scales = _w4_weight(2 * 24 if gated else 24, 64, 32, torch.float32)
    x = torch.randn(5, 64)
    want = ref.linear_w4(x, qweight, zeros, scales)
    want = ref.silu_and_mul(want) if gated else want
    got = w4.launch(x, qweight.view(torch.int32), zeros, scales, None, gated, dict(dequant=True))
    assert rel_err(got, want) < TOL[torch.float32]


def test_linear_w4_other_groups_use_the_reference():
    """Group sizes the kernels' power-of-two tiles cannot step through (48 here) still compute, through the
    reference."""
    qweight, zeros, scales = _w4_weight(16, 96, 48, torch.float32)
    x = torch.randn(2, 96)
    got = w4.linear_w4(x, qweight, zeros, scales)
    assert torch.equal(got, ref.linear_w4(x, qweight, zeros, scales))


def test_linear_w4_split_fills_the_gpu():
    """Split-K only where a layer has few output tiles: o_proj at decode splits, gate_up does not."""
    cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)
    assert w4.auto_split(1, 4096, 4096, cfg, 132) == 8
    assert w4.auto_split(1, 14336, 4096, cfg, 132) == 4
    assert w4.auto_split(1, 2 * 14336, 4096, dict(cfg, BLOCK_N=64), 132) == 1
    assert w4.auto_split(64, 4096, 4096, dict(cfg, BLOCK_M=64), 132) == 8
    assert w4.auto_split(1, 4096, 256, cfg, 132) == 2  # never more splits than K steps


@pytest.mark.parametrize("T, k, E", [(40, 2, 3), (1, 2, 8)])
def test_moe_align_puts_each_pair_in_its_experts_tile(T, k, E):
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    slots, tile_expert = moe.align(experts, E, block_m=16)
    P = T * k
    assert sorted(slots[slots < P].tolist()) == list(range(P))  # every pair once, padding marked P
    per_tile = slots.view(-1, 16)
    for t, e in enumerate(tile_expert.tolist()):
        pairs = per_tile[t][per_tile[t] < P]
        if e == E:
            assert pairs.numel() == 0
        else:
            assert (experts.reshape(-1)[pairs] == e).all()
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    assert (tile_expert < E).sum() == ((counts + 15) // 16).sum()  # no tile more than the routing needs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, k, E, H, F, skew", [(1, 2, 4, 32, 24, False), (37, 2, 3, 48, 40, False),
                                                 (9, 3, 6, 16, 16, False), (40, 2, 4, 16, 24, True)])
def test_moe_experts_matches_the_reference(dtype, T, k, E, H, F, skew):
    """Grouped GEMM over expert tiles (tiles of 16 and 32 rows, padding, N and K not multiples of the block;
    skew: every token picks experts 0 and 1, so each fills several tiles and the others none) against the
    reference's loop over experts."""
    x = torch.randn(T, H, dtype=dtype)
    w13, w2 = torch.randn(E, 2 * F, H, dtype=dtype) * 0.2, torch.randn(E, H, F, dtype=dtype) * 0.2
    weights, experts = torch.rand(T, k).softmax(-1), torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    if skew:
        experts = torch.tensor([[0, 1]] * T)
        assert T > moe.tile_rows(T * k, E)  # expert 0's T pairs need more than one tile
    got = moe.moe_experts(x, w13, w2, weights, experts)
    want = ref.moe_experts(x, w13, w2, weights, experts)
    assert got.shape == (T, H) and got.dtype == dtype and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_store_equals_rotary_then_store(dtype):
    T, hq, hkv, d = 6, 4, 2, 64
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))  # strided, as in the model
    positions = torch.randint(0, 32, (T,))
    slots = torch.tensor([3, -1, 40, 17, 95, 0])
    cos_sin = torch.randn(32, d)
    caches = [torch.full((6, 16, hkv, d), float("nan"), dtype=dtype) for _ in range(4)]
    want_q = ref.rotary_and_store(q.clone(), k.clone(), v.clone(), positions, cos_sin, caches[0], caches[1], slots)
    k_before = k.clone()
    got_q = rot.rotary_and_store(q, k, v, positions, cos_sin, caches[2], caches[3], slots)
    assert rel_err(got_q, want_q) < TOL[dtype]
    assert torch.equal(k, k_before)  # keys are rotated into the cache only
    for want, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(want.isnan(), got.isnan())  # the -1 slot and unused slots untouched
        assert rel_err(got.nan_to_num(0.0), want.nan_to_num(0.0)) < TOL[dtype]


def test_store_kvcache_skips_minus_one():
    T, h, d = 7, 2, 64
    kv_out = torch.randn(T, 2 * h * d)
    k, v = kv_out.split([h * d, h * d], dim=-1)
    k, v = k.view(T, h, d), v.view(T, h, d)
    slots = torch.tensor([3, -1, 40, 17, -1, 95, 0])
    caches = [torch.full((6, 16, h, d), float("nan")) for _ in range(4)]
    ref.store_kvcache(k, v, caches[0], caches[1], slots)
    kv.store_kvcache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


def kv_cache(bits, blocks: int, page: int, h: int, d: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized cache and its scales, as the model runner allocates them (bits 8: int8; 4: two values a byte;
    'fp8': e4m3 with a scale per head, here random)."""
    if bits == 8:
        return torch.full((blocks, page, h, d), fill, dtype=torch.int8), torch.full((blocks, h, page), float("nan"))
    if bits == "fp8":
        return (torch.full((blocks, page, h, d), fill, dtype=torch.float32).to(torch.float8_e4m3fn),
                torch.rand(h) + 0.5)
    return torch.full((blocks, page, h, d // 2), fill, dtype=torch.uint8), torch.full((blocks, h, page, 2), float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_store_kvcache_quantized_matches_reference(dtype, bits):
    """Rows quantized with their own scale (and min, for 4 bits), identically to the reference; slot -1 and other
    slots untouched; the round trip errs by at most half a step."""
    T, h, d = 7, 2, 64
    k, v = torch.randn(T, h, d, dtype=dtype) * 3, torch.randn(T, h, d, dtype=dtype)
    k[2, 1] = 0.0  # an all-zero row still gets a finite scale
    slots = torch.tensor([3, -1, 40, 17, -1, 95, 0])
    caches, scales = zip(*(kv_cache(bits, 6, 16, h, d, 99) for _ in range(4)))
    ref.store_kvcache(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    kv.store_kvcache(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for i in (0, 1):
        assert torch.equal(caches[i], caches[i + 2])
        assert torch.equal(scales[i].nan_to_num(-1.0), scales[i + 2].nan_to_num(-1.0))
    written = slots[slots >= 0]
    rows = ref.scale_rows(scales[2], torch.arange(6))[written].view(written.numel(), h, -1)
    deq = ref.dequantize(caches[2].view(6 * 16, h, -1)[written], rows.squeeze(-1) if bits == 8 else rows, torch.float32)
    step = rows[..., :1]
    assert ((deq - k[slots >= 0].float()).abs() <= step / 2 + 1e-5).all()
    assert scales[2].isnan().sum() == (6 * 16 - written.numel()) * h * (1 if bits == 8 else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_rotary_and_store_quantized_matches_reference(dtype, bits):
    T, hq, hkv, d = 6, 4, 2, 64
    q, k, v = torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)
    positions, slots, cos_sin = torch.randint(0, 32, (T,)), torch.tensor([3, -1, 40, 17, 95, 0]), torch.randn(32, d)
    caches, scales = zip(*(kv_cache(bits, 6, 16, hkv, d, 0) for _ in range(4)))
    for s in scales:
        s.zero_()
    want_q = ref.rotary_and_store(q.clone(), k, v, positions, cos_sin, caches[0], caches[1], slots, scales[0], scales[1])
    got_q = rot.rotary_and_store(q.clone(), k, v, positions, cos_sin, caches[2], caches[3], slots, scales[2], scales[3])
    assert rel_err(got_q, want_q) < TOL[dtype]
    for i in (0, 1):  # the rotated key may round one model-dtype step apart, which may move a value one
        # quantization step: compare what the cache holds, within a step
        got = ref.dequantize_cache(caches[i + 2], scales[i + 2], torch.float32)
        want = ref.dequantize_cache(caches[i], scales[i], torch.float32)
        step = torch.maximum(scales[i], scales[i + 2]).transpose(1, 2)
        step = step[..., :1] if bits == 4 else step.unsqueeze(-1)
        assert ((got - want).abs() <= 1.01 * step + TOL[dtype] * want.abs()).all()
    assert torch.equal(caches[1], caches[3]) and torch.equal(scales[1], scales[3])  # v is stored unrotated: exact


def quantized(cache: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized copy of a make_batch cache: rows outside every context get garbage values and NaN scales."""
    finite = torch.isfinite(cache).all(dim=-1)
    q, s = (ref.quantize_int8 if bits == 8 else ref.quantize_int4)(cache.nan_to_num(0.0))
    q[~finite] = torch.randint(0, 128, (int((~finite).sum()), q.shape[-1]), dtype=torch.uint8).to(q.dtype)
    s[~finite] = float("nan")
    return q, ref.scales_to_layout(s)


# -- attention -------------------------------------------------------------------------------------------------------
def make_batch(q_lens: list[int], ctx_lens: list[int], hq: int, hkv: int, d: int, page: int, dtype: torch.dtype):
    """A paged cache whose only finite entries are the sequences' contexts (pages scattered, spare table entries out
    of range), plus this step's queries. Returns q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q."""
    need = [-(-c // page) for c in ctx_lens]
    width = max(need) + 1
    perm = torch.randperm(sum(need) + 3).tolist()
    k_cache = torch.full((sum(need) + 3, page, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = torch.full((len(ctx_lens), width), 10**6, dtype=torch.int32)  # garbage past each sequence's pages
    for b, (c, n) in enumerate(zip(ctx_lens, need)):
        pages = [perm.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(pages, dtype=torch.int32)
        slots = torch.tensor([pages[i // page] * page + i % page for i in range(c)])
        ref.store_kvcache(torch.randn(c, hkv, d, dtype=dtype), torch.randn(c, hkv, d, dtype=dtype),
                          k_cache, v_cache, slots)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), cu


def ref_attention(q, k_cache, v_cache, tables, ctx, cu, scale):
    """The reference in fp32 on the same (rounded) inputs: the ground truth for every dtype."""
    return ref.paged_attention(q.float(), k_cache.float(), v_cache.float(), tables, ctx, cu, scale)


def use_decode_config(monkeypatch, cfg: dict) -> None:
    monkeypatch.setattr(attn, "DECODE_CONFIG", cfg)
    monkeypatch.setattr(attn, "DECODE_CONFIG_BY_QUANT", {})


SMALL_PREFILL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, DECODE_ROWS=True)


def use_prefill_config(monkeypatch, cfg: dict) -> None:
    """The same launch config for prefill-heavy and decode-heavy batches."""
    monkeypatch.setattr(attn, "PREFILL_CONFIG", cfg)
    monkeypatch.setattr(attn, "PREFILL_CONFIG_BY_QUANT", {})  # the quantized caches' GPU tiles too
    monkeypatch.setattr(attn, "MIXED_CONFIG", cfg)


SMALL_DECODE = dict(BLOCK_N=16, num_warps=4, num_stages=1, MIN_SPLIT_TOKENS=16, MAX_SPLITS=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("tiles", ["small", "small-no-decode-rows", "default"])
def test_paged_attention_mixed_batch(dtype, hq, hkv, page, tiles, monkeypatch):
    if tiles != "default":  # decode rows: the one-query path; without, decodes go through the query-tile path
        use_prefill_config(monkeypatch, {**SMALL_PREFILL, "DECODE_ROWS": tiles == "small"})
    # fresh prefill, decode, chunked prefill over a cached prefix, decode at a page boundary, a one-token prefill
    # ... and a chunk whose first query sits right before a key-tile edge (position 30)
    q_lens, ctx_lens = [21, 1, 13, 1, 1, 20], [21, 37, 50, 32, 1, 50]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, hq, hkv, 64, page, dtype)
    out = attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.125)
    assert out.dtype == dtype
    assert rel_err(out, ref_attention(q, kc, vc, tables, ctx, cu, 0.125)) < TOL[dtype]


@pytest.mark.parametrize("q_lens,ctx_lens", [([130, 1], [150, 40]), ([1, 40, 1], [70, 60, 3])],
                         ids=["prefill-heavy", "decode-heavy"])
def test_paged_attention_default_configs(q_lens, ctx_lens):
    """The shipped launch configs: the prefill one (>= MIXED_BELOW tokens per sequence) and the mixed one."""
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, 4, 2, 64, 16, torch.bfloat16)
    out = attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.125)
    assert rel_err(out, ref_attention(q, kc, vc, tables, ctx, cu, 0.125)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 2), (8, 1)])
def test_paged_attention_random_batches(hq, hkv, monkeypatch):
    """Random lengths and cached prefixes: off-by-ones at tile and page edges show up here. GQA group 3 too."""
    use_prefill_config(monkeypatch, SMALL_PREFILL)
    for _ in range(3):
        q_lens = torch.randint(0, 30, (5,)).tolist()
        q_lens[0] = max(q_lens[0], 1)
        ctx_lens = [max(1, q + int(torch.randint(0, 40, ()))) if q else int(torch.randint(1, 40, ())) for q in q_lens]
        q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, hq, hkv, 32, 16, torch.float32)
        out = attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.3)
        want = ref_attention(q, kc, vc, tables, ctx, cu, 0.3)
        assert rel_err(out, want) < 1e-3, (q_lens, ctx_lens)


def test_paged_attention_head_dim_128_strided_q(monkeypatch):
    use_prefill_config(monkeypatch, SMALL_PREFILL)
    q, kc, vc, tables, ctx, cu = make_batch([9, 1], [40, 17], 4, 1, 128, 16, torch.float32)
    q_strided = torch.randn(q.shape[0], 6, 128)[:, 1:5]  # a head-sliced view, like q out of the qkv projection
    q_strided.copy_(q)
    out = attn.paged_attention(q_strided, kc, vc, tables, ctx, cu, 0.1)
    assert rel_err(out, ref_attention(q, kc, vc, tables, ctx, cu, 0.1)) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_paged_decode_attention(dtype, hq, hkv, page, splits, monkeypatch):
    use_decode_config(monkeypatch, SMALL_DECODE)
    ctx_lens = [1, 45, 16, 70]
    q, kc, vc, tables, ctx, cu = make_batch([1] * 4, ctx_lens, hq, hkv, 64, page, dtype)
    want = ref_attention(q, kc, vc, tables, ctx, cu, 0.125)
    # max_context_len as an upper bound (what a CUDA graph is captured with) must give the same answer
    out = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.125, tables.shape[1] * page, num_splits=splits)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("prewait", ["1", "0"])
def test_decode_merge_in_the_last_split_equals_the_reduce_kernel(prewait, monkeypatch):
    """The last split of each (sequence, kv head) to finish merges the partials (one launch): the same values as the
    separate reduce kernel, and every counter back at zero for the next launch (graph replays reuse them). Also
    with the first K/V tile loaded before the wait (PREWAIT) and without."""
    use_decode_config(monkeypatch, SMALL_DECODE)
    monkeypatch.setenv("CLUSTER_ATTN_PREWAIT", prewait)
    q, kc, vc, tables, ctx, cu = make_batch([1] * 4, [1, 45, 16, 70], 8, 2, 64, 16, torch.float32)
    want = ref_attention(q, kc, vc, tables, ctx, cu, 0.125)
    monkeypatch.setenv("CLUSTER_ATTN_FUSED_MERGE", "0")
    apart = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.125, num_splits=5)
    monkeypatch.setenv("CLUSTER_ATTN_FUSED_MERGE", "1")
    for _ in range(2):  # the second launch finds the counters zeroed by the first
        fused = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.125, num_splits=5)
        assert torch.equal(fused, apart) and rel_err(fused, want) < 1e-4
        assert not attn.merge_counters(q.device, 8).any()


def test_decode_agrees_with_prefill_kernel(monkeypatch):
    use_decode_config(monkeypatch, SMALL_DECODE)
    q, kc, vc, tables, ctx, cu = make_batch([1, 1, 1], [33, 5, 64], 8, 2, 64, 16, torch.float32)
    a = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.2)
    b = attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.2)
    assert rel_err(a, b) < 1e-5


# Gemma 2 / 3: soft-capped scores and sliding windows (cap 0.5 on scores of a few units changes the softmax a lot;
# windows shorter than a key tile, spanning tiles, and longer than some contexts)
SOFTCAP_WINDOW = [(0.5, 0), (0.0, 8), (0.5, 8), (2.0, 21), (0.0, 40)]


@pytest.mark.parametrize("softcap, window", SOFTCAP_WINDOW)
@pytest.mark.parametrize("tiles", ["small", "small-no-decode-rows", "default"])
def test_paged_attention_softcap_and_window(softcap, window, tiles, monkeypatch):
    if tiles != "default":
        use_prefill_config(monkeypatch, {**SMALL_PREFILL, "DECODE_ROWS": tiles == "small"})
    # fresh prefill past the window, decode, a chunk over a cached prefix, a short context, a one-token prefill
    q_lens, ctx_lens = [40, 1, 13, 1, 1, 5], [40, 37, 50, 5, 1, 70]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, 4, 2, 32, 16, torch.float32)
    q = q * 3  # scores of several units, so the cap bites
    out = attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.3, softcap=softcap, window=window)
    want = ref.paged_attention(q, kc, vc, tables, ctx, cu, 0.3, softcap=softcap, window=window)
    assert rel_err(out, want) < 1e-3
    assert rel_err(want, ref_attention(q, kc, vc, tables, ctx, cu, 0.3)) > 1e-2  # the features change the result


@pytest.mark.parametrize("softcap, window", SOFTCAP_WINDOW)
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("switches", ["0", "1"])  # first tile before the wait and the merge in the last split
def test_paged_decode_attention_softcap_and_window(softcap, window, splits, dtype, switches, monkeypatch):
    use_decode_config(monkeypatch, SMALL_DECODE)
    monkeypatch.setenv("CLUSTER_ATTN_PREWAIT", switches)
    monkeypatch.setenv("CLUSTER_ATTN_FUSED_MERGE", switches)
    ctx_lens = [1, 45, 16, 70, 8, 9]  # window edges inside a tile, on a tile edge, before any key
    q, kc, vc, tables, ctx, cu = make_batch([1] * 6, ctx_lens, 4, 2, 64, 16, dtype)
    q = q * 3
    want = ref.paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, cu, 0.2, softcap=softcap, window=window)
    out = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.2, tables.shape[1] * 16, num_splits=splits,
                                      softcap=softcap, window=window)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]
    # the reference's padded decode agrees (it needs the engine's zero-filled cache)
    padded = ref.paged_decode_attention(q.float(), kc.float().nan_to_num(0.0), vc.float().nan_to_num(0.0), tables,
                                        ctx, 0.2, softcap=softcap, window=window)
    assert rel_err(padded, want) < 1e-5


def test_paged_attention_int8_cache_with_softcap_and_window(monkeypatch):
    use_prefill_config(monkeypatch, SMALL_PREFILL)
    use_decode_config(monkeypatch, SMALL_DECODE)
    q, kc, vc, tables, ctx, cu = make_batch([21, 1, 13, 1], [21, 37, 50, 32], 4, 2, 32, 16, torch.float32)
    (kq, ks), (vq, vs) = quantized(kc), quantized(vc)
    want = ref.paged_attention(q, kq, vq, tables, ctx, cu, 0.3, ks, vs, softcap=1.0, window=10)
    out = attn.paged_attention(q, kq, vq, tables, ctx, cu, 0.3, ks, vs, softcap=1.0, window=10)
    assert rel_err(out, want) < 1e-3
    dq = q[cu[1:] - 1]  # each sequence's last query, as a decode step
    dwant = ref.paged_decode_attention(dq, kq, vq, tables, ctx, 0.3, k_scale=ks.nan_to_num(0.0),
                                       v_scale=vs.nan_to_num(0.0), softcap=1.0, window=10)
    dout = attn.paged_decode_attention(dq, kq, vq, tables, ctx, 0.3, num_splits=3, k_scale=ks, v_scale=vs,
                                       softcap=1.0, window=10)
    assert rel_err(dout, dwant) < 1e-3


def dense_alibi_attention(q, k, v, scale: float, slopes: list[float]) -> torch.Tensor:
    """One sequence, every query a prefix's last token: softmax(q k^T * scale - m_h * (i - j)) v over j <= i."""
    t, hq, _ = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pos = torch.arange(k.shape[0])
    qpos = pos[-t:]
    s = torch.einsum("thd,nhd->htn", q.double(), k.double()) * scale
    s = s - torch.tensor(slopes, dtype=torch.double)[:, None, None] * (qpos[:, None] - pos[None, :])
    s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
    return torch.einsum("htn,nhd->thd", s.softmax(-1), v.double())


@pytest.mark.parametrize("hq, hkv", [(6, 6), (6, 2), (8, 8)])
def test_alibi_reference_is_the_papers(hq, hkv):
    """The reference's ALiBi (slopes from cluster.convert.rope) against the paper's, on a prefill and a chunk."""
    from cluster.convert.rope import alibi_slopes
    from family_layouts import paper_alibi_slopes

    assert alibi_slopes(hq).tolist() == pytest.approx(paper_alibi_slopes(hq), rel=1e-6)
    q_lens, ctx_lens = [30, 7], [30, 40]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, hq, hkv, 16, 16, torch.float32)
    out = ref.paged_attention(q, kc, vc, tables, ctx, cu, 0.25, alibi=alibi_slopes(hq))
    for b in range(2):
        k = ref._gather(kc, tables[b], ctx_lens[b], None, torch.float32)
        v = ref._gather(vc, tables[b], ctx_lens[b], None, torch.float32)
        want = dense_alibi_attention(q[cu[b]:cu[b + 1]], k, v, 0.25, paper_alibi_slopes(hq))
        assert rel_err(out[cu[b]:cu[b + 1]], want) < 1e-5


@pytest.mark.parametrize("tiles", ["small", "small-no-decode-rows", "default"])
@pytest.mark.parametrize("hq, hkv", [(6, 6), (6, 2)])
def test_paged_attention_alibi(tiles, hq, hkv, monkeypatch):
    from cluster.convert.rope import alibi_slopes

    if tiles != "default":
        use_prefill_config(monkeypatch, {**SMALL_PREFILL, "DECODE_ROWS": tiles == "small"})
    q_lens, ctx_lens = [40, 1, 13, 1, 1], [40, 37, 50, 5, 1]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, hq, hkv, 32, 16, torch.float32)
    slopes = alibi_slopes(hq)
    want = ref.paged_attention(q, kc, vc, tables, ctx, cu, 0.3, alibi=slopes)
    assert rel_err(attn.paged_attention(q, kc, vc, tables, ctx, cu, 0.3, alibi=slopes), want) < 1e-3
    assert rel_err(want, ref_attention(q, kc, vc, tables, ctx, cu, 0.3)) > 1e-2  # the bias changes the result
    rank1 = slopes[hq // 2:].contiguous()  # tp=2: the second rank's heads keep their own slopes
    part = [slice(hkv // 2, hkv)] if hkv > 1 else [slice(0, 1)]
    got = attn.paged_attention(q[:, hq // 2:].contiguous(), kc[:, :, part[0]].contiguous(),
                               vc[:, :, part[0]].contiguous(), tables, ctx, cu, 0.3, alibi=rank1)
    assert rel_err(got, want[:, hq // 2:]) < 1e-3


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("switches", ["0", "1"])
def test_paged_decode_attention_alibi(splits, dtype, switches, monkeypatch):
    from cluster.convert.rope import alibi_slopes

    use_decode_config(monkeypatch, SMALL_DECODE)
    monkeypatch.setenv("CLUSTER_ATTN_PREWAIT", switches)
    monkeypatch.setenv("CLUSTER_ATTN_FUSED_MERGE", switches)
    q, kc, vc, tables, ctx, cu = make_batch([1] * 4, [1, 45, 16, 70], 6, 2, 64, 16, dtype)
    slopes = alibi_slopes(6)
    want = ref.paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, cu, 0.2, alibi=slopes)
    out = attn.paged_decode_attention(q, kc, vc, tables, ctx, 0.2, num_splits=splits, alibi=slopes)
    assert rel_err(out, want) < TOL[dtype]
    padded = ref.paged_decode_attention(q.float(), kc.float().nan_to_num(0.0), vc.float().nan_to_num(0.0), tables,
                                        ctx, 0.2, alibi=slopes)
    assert rel_err(padded, want) < 1e-5


def test_decode_num_splits_is_value_independent():
    cpu = torch.device("cpu")
    assert attn.decode_num_splits(1, 8, 8192, cpu) == attn.decode_num_splits(1, 8, 8192, cpu) > 1
    assert attn.decode_num_splits(256, 8, 8192, cpu) == 1
    assert attn.decode_num_splits(1, 8, 16, cpu) == 1


# -- references and dispatch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv,page", [(4, 2, 16), (2, 2, 32), (6, 2, 16)])
def test_reference_decode_equals_reference_attention(hq, hkv, page):
    q, kc, vc, tables, ctx, cu = make_batch([1] * 5, [1, 16, 17, 40, 63], hq, hkv, 32, page, torch.float32)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the padded reference needs the engine's zero-filled cache
    a = ref.paged_decode_attention(q, kc, vc, tables, ctx, 0.3)
    b = ref.paged_attention(q, kc, vc, tables, ctx, cu, 0.3)
    assert rel_err(a, b) < 1e-5


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    x = torch.randn(3, 8)
    assert kernels._triton("norm", x) is None
    monkeypatch.setenv("CLUSTER_KERNELS", "reference")
    assert kernels._triton("norm", x) is None
    assert torch.equal(kernels.rms_norm(x, torch.ones(8), 1e-6), ref.rms_norm(x, torch.ones(8), 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["small", "default"])
@pytest.mark.parametrize("bits, close", [(8, 2e-2), (4, 0.2)])
def test_paged_attention_quantized_cache(dtype, tiles, bits, close, monkeypatch):
    """Prefill, chunk over a cached prefix and decodes, reading an int8 or 4-bit cache: against the reference
    reading the same cache (so the comparison is the kernel's, not the quantization's)."""
    if tiles == "small":
        use_prefill_config(monkeypatch, SMALL_PREFILL)
    q_lens, ctx_lens = [21, 1, 13, 1], [21, 37, 50, 32]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, 4, 2, 64, 16, dtype)
    (kq, ks), (vq, vs) = quantized(kc, bits), quantized(vc, bits)
    out = attn.paged_attention(q, kq, vq, tables, ctx, cu, 0.125, ks, vs)
    want = ref.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.125, ks, vs)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]
    # and the quantized cache is close to the unquantized one (random rows: 4 bits are coarse)
    assert rel_err(want, ref_attention(q, kc, vc, tables, ctx, cu, 0.125)) < close


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bits", [8, 4])
def test_paged_decode_attention_quantized_cache(splits, bits, monkeypatch):
    use_decode_config(monkeypatch, SMALL_DECODE)
    q, kc, vc, tables, ctx, cu = make_batch([1] * 4, [1, 45, 16, 70], 4, 2, 64, 16, torch.bfloat16)
    (kq, ks), (vq, vs) = quantized(kc, bits), quantized(vc, bits)
    want = ref.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.125, ks, vs)
    out = attn.paged_decode_attention(q, kq, vq, tables, ctx, 0.125, tables.shape[1] * 16, num_splits=splits,
                                      k_scale=ks, v_scale=vs)
    assert rel_err(out, want) < TOL[torch.bfloat16]


# -- fp8 (e4m3) KV cache: a scale per kv head ----------------------------------------------------------------------
def fp8_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3 copy of a make_batch cache over random per-head scales; rows outside every context hold NaN."""
    head_scale = torch.rand(cache.shape[2]) * 0.5 + 0.1  # values of up to ~4.5 sigma land near e4m3's top
    q = ref.quantize_fp8(cache.nan_to_num(0.0), head_scale).view(torch.uint8)
    q[~torch.isfinite(cache)] = 0x7F  # e4m3's NaN
    return q.view(torch.float8_e4m3fn), head_scale


def assert_same_e4m3(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal e4m3 caches, except where Triton's interpreter (3.9) rounds a value just below a power of two to
    half that power (its emulated cast loses the carry into the exponent): on the GPU the cast is the hardware's,
    and benchmarks/gpu_kernels.py checks the bytes there. Elsewhere the interpreter's cast is exact."""
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    if os.environ.get("TRITON_INTERPRET") == "1":
        g, w = got.float()[differ], want.float()[differ]
        assert (g.sign() == w.sign()).all() and (g.abs() < w.abs()).all() and (w.abs() <= 2 * g.abs()).all()
        assert differ.float().mean() < 0.05
    else:
        assert not differ.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_fp8_matches_reference(dtype):
    """e4m3 over each head's scale, identical to the reference; out-of-range values saturate (no NaN)."""
    T, h, d = 7, 2, 64
    k, v = torch.randn(T, h, d, dtype=dtype) * 3, torch.randn(T, h, d, dtype=dtype)
    k[3, 0, 5] = 1e4  # beyond 448 * scale: saturates
    slots = torch.tensor([3, -1, 40, 17, -1, 95, 0])
    caches, scales = zip(*(kv_cache("fp8", 6, 16, h, d, 0.0) for _ in range(4)))
    scales = [scales[0], scales[1], scales[0], scales[1]]
    ref.store_kvcache(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    kv.store_kvcache(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for i in (0, 1):
        assert_same_e4m3(caches[i + 2], caches[i])
    got = ref.dequantize_cache(caches[0], scales[0], torch.float32).view(6 * 16, h, d)[slots[slots >= 0]]
    want = k[slots >= 0].float()
    assert torch.isfinite(got).all() and got[2, 0, 5] == 448 * scales[0][0]  # row of slot 17 is k[3]
    ok = want.abs() < 400 * scales[0][:, None]
    assert ((got - want).abs()[ok] <= want.abs()[ok] / 16 + 2 ** -9 * scales[0].max()).all()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_store_fp8_matches_reference(dtype):
    T, hq, hkv, d = 6, 4, 2, 64
    q, k, v = torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)
    positions, slots, cos_sin = torch.randint(0, 32, (T,)), torch.tensor([3, -1, 40, 17, 95, 0]), torch.randn(32, d)
    caches = [kv_cache("fp8", 6, 16, hkv, d, 0.0)[0] for _ in range(4)]
    ks, vs = torch.rand(hkv) + 0.5, torch.rand(hkv) + 0.5
    want_q = ref.rotary_and_store(q.clone(), k, v, positions, cos_sin, caches[0], caches[1], slots, ks, vs)
    got_q = rot.rotary_and_store(q.clone(), k, v, positions, cos_sin, caches[2], caches[3], slots, ks, vs)
    assert rel_err(got_q, want_q) < TOL[dtype]
    assert_same_e4m3(caches[3], caches[1])  # v: exact
    got, want = (ref.dequantize_cache(c, ks, torch.float32) for c in (caches[2], caches[0]))
    close = (got - want).abs() <= want.abs() / 8 + 1e-6  # a rotated key one model-dtype step apart: one e4m3 step
    if os.environ.get("TRITON_INTERPRET") == "1":  # or the interpreter's cast (assert_same_e4m3)
        close |= (got.abs() <= want.abs()) & (want.abs() <= 2 * got.abs() + 2 ** -9 * ks.max())
    assert close.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_attention_fp8_cache(dtype, monkeypatch):
    use_prefill_config(monkeypatch, SMALL_PREFILL)
    q_lens, ctx_lens = [21, 1, 13, 1], [21, 37, 50, 32]
    q, kc, vc, tables, ctx, cu = make_batch(q_lens, ctx_lens, 6, 2, 64, 16, dtype)
    (kq, ks), (vq, vs) = fp8_cache(kc), fp8_cache(vc)
    out = attn.paged_attention(q, kq, vq, tables, ctx, cu, 0.125, ks, vs)
    want = ref.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.125, ks, vs)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]
    assert rel_err(want, ref_attention(q, kc, vc, tables, ctx, cu, 0.125)) < 0.05  # e4m3 is close to the cache


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_attention_fp8_cache(splits, monkeypatch):
    use_decode_config(monkeypatch, SMALL_DECODE)
    q, kc, vc, tables, ctx, cu = make_batch([1] * 5, [1, 45, 16, 70, 33], 6, 2, 64, 16, torch.bfloat16)
    (kq, ks), (vq, vs) = fp8_cache(kc), fp8_cache(vc)
    want = ref.paged_attention(q.float(), kq, vq, tables, ctx, cu, 0.125, ks, vs)
    out = attn.paged_decode_attention(q, kq, vq, tables, ctx, 0.125, tables.shape[1] * 16, num_splits=splits,
                                      k_scale=ks, v_scale=vs)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    # the reference's batched decode path (which needs finite slots past each context) agrees with its per-sequence one
    kf, vf = (c.view(torch.uint8).masked_fill(c.view(torch.uint8) == 0x7F, 0).view(c.dtype) for c in (kq, vq))
    assert rel_err(ref.paged_decode_attention(q.float(), kf, vf, tables.clamp_max(kq.shape[0] - 1), ctx, 0.125,
                                              k_scale=ks, v_scale=vs), want) < 1e-5


def test_launch_fitting_shrinks_the_tiles_until_the_gpu_takes_them_and_remembers():
    """Triton refuses a launch whose shared memory its own count puts over the GPU's (fp32 head_dim 256 prefill:
    262 KB on the H200's 227 KB, past fit_shared_memory's estimate): fewer stages, then narrower key tiles, kept
    for the next launch of the same key; at the smallest tiling the refusal is raised."""
    from triton.runtime.errors import OutOfResources

    from cluster.kernels import attention

    calls = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, num_stages, **kw):
                calls.append((BLOCK_N, num_stages, args, kw))
                if not self.fits(BLOCK_N, num_stages):
                    raise OutOfResources(262144, 232448, "shared memory")
            return launch

    key = ("test", 256, 4)
    try:
        attention.launch_fitting(Kernel(lambda n, s: n * s <= 32), (1,), {"BLOCK_N": 64, "num_stages": 2}, key, 7,
                                 D=256)
        assert [c[:2] for c in calls] == [(64, 2), (64, 1), (32, 1)] and calls[-1][2:] == ((7,), {"D": 256})
        calls.clear()
        attention.launch_fitting(Kernel(lambda n, s: n * s <= 32), (1,), {"BLOCK_N": 64, "num_stages": 2}, key, 7)
        assert [c[:2] for c in calls] == [(32, 1)]
        with pytest.raises(OutOfResources):
            attention.launch_fitting(Kernel(lambda n, s: False), (1,), {"BLOCK_N": 32, "num_stages": 1},
                                     ("test", "never"), 7)
    finally:
        attention._FITTED.pop(key, None)
        attention._FITTED.pop(("test", "never"), None)


def test_l2_prefetch_rides_ahead_of_each_batch1_gemv(tiny_models, engine_cache, monkeypatch):
    """With CLUSTER_L2_PREFETCH on, at one row each layer asks for the front of its qkv, o and [gate; up] (both
    halves) weights ahead of their GEMVs, with PREFETCH_MB's sizes or the variable's own; at two rows nothing."""
    from cluster import kernels
    from cluster.config import EngineConfig, GenerationConfig
    from cluster.engine import model_runner
    from cluster.engine.engine import LLMEngine
    from cluster.layers import linear

    calls = []
    monkeypatch.setattr(kernels, "prefetch_l2", lambda w, nbytes, parts=1: calls.append((tuple(w.shape), nbytes, parts)))
    monkeypatch.setattr(model_runner, "pack_cpu_weights", lambda model: None)  # plain weights, as on the GPU
    path, hf_model = tiny_models("llama")
    eng = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    c = hf_model.config
    hd = c.hidden_size // c.num_attention_heads
    qkv = ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, c.hidden_size)
    o, gate_up = (c.hidden_size, c.num_attention_heads * hd), (2 * c.intermediate_size, c.hidden_size)
    gen = GenerationConfig(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    mb = {k: int(v * 2 ** 20) for k, v in linear.PREFETCH_MB.items()}

    eng.generate([[5, 6, 7]], gen)
    assert calls == []  # off unless asked for (not yet measured on a GPU)
    monkeypatch.setenv("CLUSTER_L2_PREFETCH", "1")
    eng.generate([[5, 6, 7]], gen)  # 3 decode steps at one row
    per_step = [(qkv, mb["qkv"], 1), (o, mb["o"], 1), (gate_up, mb["gate_up"], 2)] * c.num_hidden_layers
    assert calls == per_step * 3

    calls.clear()
    eng.generate([[5, 6, 7], [8, 9, 10]], gen)
    assert calls == []

    monkeypatch.setenv("CLUSTER_L2_PREFETCH", "o=1.5")
    eng.generate([[5, 6, 7]], gen)
    assert calls == [(o, int(1.5 * 2 ** 20), 1)] * c.num_hidden_layers * 3
    calls.clear()
    monkeypatch.setenv("CLUSTER_L2_PREFETCH", "0")
    eng.generate([[5, 6, 7]], gen)
    assert calls == []
