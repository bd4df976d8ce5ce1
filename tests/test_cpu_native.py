"""The CPU's C kernels (cluster/kernels/cpu_native.c) against the torch reference they replace."""
import shutil

import pytest
import torch

from cluster import kernels
from cluster.kernels import cpu_native as native
from cluster.kernels import reference as ref

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the torch reference runs instead")
DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp32: within the last bits (sums reordered). bf16: the same roundings at the same points, so the same bits but
    where a reordered fp32 sum moves a value across a rounding boundary. A row's 1/rms one bit off moves many of its
    values a step (two through the sandwich's second norm): a few steps at most, in a few percent of the values."""
    if a.dtype != b.dtype:
        return False
    if dtype == torch.bfloat16:
        a, b = a.float(), b.float()
        # 4 bf16 steps (8 significant bits) of the value, or of the typical value where a sum cancelled
        step = torch.maximum(a.abs(), b.abs()) * 2 ** -5 + b.abs().mean() * 2 ** -6
        return bool(((a - b).abs() <= step).all()) and (a != b).float().mean() < 0.05
    return torch.allclose(a, b, rtol=2e-6, atol=2e-6)


def test_the_library_builds_and_the_dispatch_takes_it(monkeypatch):
    assert native.available()
    x = torch.randn(2, 8)
    assert kernels._cpu(x) is native
    monkeypatch.setenv("CLUSTER_CPU_NATIVE", "0")
    assert kernels._cpu(x) is None and native.library() is None
    monkeypatch.setenv("CLUSTER_CPU_NATIVE", "1")
    monkeypatch.setenv("CLUSTER_KERNELS", "reference")
    assert kernels._cpu(x) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["plain", "residual", "sandwich"])
@pytest.mark.parametrize("rows", [5, 77])  # 77: a prefill's rows, shared over the threads
def test_rms_norm(dtype, form, rows):
    x, r = torch.randn(rows, 576, dtype=dtype) * 3, torch.randn(rows, 576, dtype=dtype)
    w, pw = torch.randn(576, dtype=dtype), torch.randn(576, dtype=dtype)
    args = {"plain": (), "residual": (r,), "sandwich": (r, pw)}[form]
    got, want = native.rms_norm(x, w, 1e-5, *args), ref.rms_norm(x, w, 1e-5, *args)
    if form == "plain":
        got, want = (got,), (want,)
    assert all(close(a, b, dtype) for a, b in zip(got, want))
    strided = torch.randn(rows, 700, dtype=dtype)[:, :576]  # a row stride of its own
    assert close(native.rms_norm(strided, w, 1e-5), ref.rms_norm(strided, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_store(dtype):
    T, hq, hkv, d = 4, 6, 2, 32
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype)  # q, k, v as views of one projection, as the model has
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(64).float(), inv)
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    pos, slots = torch.tensor([0, 5, 17, 63]), torch.tensor([3, -1, 40, 0])
    caches = [torch.zeros(4, 16, hkv, d, dtype=dtype) for _ in range(4)]
    want = ref.rotary_and_store(q.clone(), k, v, pos, cos_sin, caches[0], caches[1], slots)
    got = native.rotary_and_store(q.clone(), k, v, pos, cos_sin, caches[2], caches[3], slots)
    assert torch.equal(got, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,page", [(9, 3, 16), (4, 4, 32), (8, 1, 16)])
@pytest.mark.parametrize("ctx_lens", [[1, 45, 16, 70], [700] * 8])  # the second large enough to use both threads
def test_decode_attention(dtype, hq, hkv, page, ctx_lens):
    B, d = len(ctx_lens), 64
    width = -(-max(ctx_lens) // page) + 1
    nb = B * width + 3
    kc, vc = torch.randn(nb, page, hkv, d, dtype=dtype), torch.randn(nb, page, hkv, d, dtype=dtype)
    tables = torch.randperm(nb)[:B * width].view(B, width).to(torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    q = torch.randn(B, hq, d, dtype=dtype)
    got = native.paged_decode_attention(q, kc, vc, tables, ctx, 0.125)
    want = ref.paged_decode_attention(q.float(), kc.float(), vc.float(), tables, ctx, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
    assert got.dtype == dtype and (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_prefill_attention_mixed_batch(dtype, hq, hkv):
    """Whole prompts, decode rows and a short chunk through the C kernel, and in the same batch a long chunk over a
    cached prefix that goes to the reference: every row as the reference computes it."""
    q_lens, ctx_lens = [37, 1, 1, 20, 300, 16], [37, 60, 1, 150, 700, 16]  # the 300 over 700: past the C kernel's reach
    d, page = 64, 16
    width = -(-max(ctx_lens) // page)
    nb = len(q_lens) * width + 2
    kc, vc = torch.randn(nb, page, hkv, d, dtype=dtype), torch.randn(nb, page, hkv, d, dtype=dtype)
    tables = torch.randperm(nb)[:len(q_lens) * width].view(len(q_lens), width).to(torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq + 2 * hkv, d, dtype=dtype)[:, :hq]  # a view of a wider projection
    assert [(e - s == c and c <= native.PREFILL_MAX_TOKENS) or (e - s) * c <= native.PREFILL_MAX_PAIRS
            for s, e, c in zip(cu.tolist(), cu.tolist()[1:], ctx_lens)] == [True] * 4 + [False, True]
    got = native.paged_attention(q, kc, vc, tables, ctx, cu, 0.125)
    want = ref.paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, cu, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert got.dtype == dtype and (got.float() - want).abs().max() <= tol * want.abs().max()


def test_decode_attention_leaves_what_it_does_not_cover_to_the_reference():
    q = torch.randn(2, 4, 32)
    kc, vc = torch.randn(6, 16, 2, 32), torch.randn(6, 16, 2, 32)
    tables, ctx = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 9], dtype=torch.int32)
    for kw in ({"softcap": 5.0}, {"window": 4}):
        assert torch.equal(native.paged_decode_attention(q, kc, vc, tables, ctx, 0.2, **kw),
                           ref.paged_decode_attention(q, kc, vc, tables, ctx, 0.2, **kw))
