"""The CPU fast path for linear layers: oneDNN-packed weights must give F.linear's result, and a CPU engine must
actually use them (the parity tests then check whole models through this path)."""
import pytest
import torch
import torch.nn.functional as F

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.layers.linear import PackableLinear, cpu_pack, matmul


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matmul_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    w, x = torch.randn(200, 96), torch.randn(rows, 96)
    b = torch.randn(200) if bias else None
    packed = cpu_pack(w)
    assert packed is not None, "this torch has oneDNN; the CPU fast path must be on"
    torch.testing.assert_close(matmul(x, w, b, packed), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_bf16_packs_where_the_cpu_has_bf16_dot_products():
    """bf16 weights take oneDNN's bf16 kernels (1.8x the fp32 packed matmuls of a SmolLM2 step here,
    benchmarks/bench_cpu_matmul.py --dtype bfloat16) only where the CPU has them; fp16 keeps F.linear."""
    torch.manual_seed(0)
    w, x = torch.randn(200, 96, dtype=torch.bfloat16), torch.randn(5, 96, dtype=torch.bfloat16)
    packed = cpu_pack(w)
    assert (packed is not None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if packed is not None:
        torch.testing.assert_close(matmul(x, w, None, packed).float(), F.linear(x, w).float(), rtol=2e-2, atol=0.1)
    assert cpu_pack(torch.randn(8, 8, dtype=torch.float16)) is None


def test_cpu_engine_packs_every_linear(tiny_models, engine_cache):
    path, _ = tiny_models("qwen2")  # tied LM head and qkv bias: both go through the packed path
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    linears = [m for m in engine.runner.model.modules() if isinstance(m, PackableLinear)]
    assert len(linears) == 2 * 4 + 1  # 2 layers x (qkv, o, gate_up, down), and the LM head
    assert all(m.packed is not None for m in linears)
    # the plain copies are freed (the weights are not held twice); the tied head's is the embedding's, kept
    assert all(m.weight.numel() == 0 for m in linears if m.weight is not None)
    assert engine.runner.model.embed_tokens.weight.numel() > 0


@pytest.mark.parametrize("batch", [1, 20])
def test_half_precision_cpu_decode_attention_matches_fp32(batch):
    """bf16 decode attention on the CPU (two batched matmuls from CPU_BMM_DECODE_BATCH sequences on, SDPA below)
    gives the fp32 result within bf16 rounding, padded slots masked."""
    from cluster.kernels import reference as ref

    torch.manual_seed(batch)
    nb, bs, hkv, group, d = 3 * batch, 4, 2, 3, 16
    k_cache, v_cache = torch.randn(nb, bs, hkv, d), torch.randn(nb, bs, hkv, d)
    tables = torch.randperm(nb).view(batch, 3).int()
    lens = torch.randint(1, 3 * bs + 1, (batch,)).int()
    q = torch.randn(batch, hkv * group, d)
    want = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    got = ref.paged_decode_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, lens, 0.25)
    assert (batch >= ref.CPU_BMM_DECODE_BATCH) == (batch == 20)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
