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


def test_no_packing_off_fp32():
    assert cpu_pack(torch.randn(8, 8, dtype=torch.bfloat16)) is None  # bf16 keeps F.linear


def test_cpu_engine_packs_every_linear(tiny_models, engine_cache):
    path, _ = tiny_models("qwen2")  # tied LM head and qkv bias: both go through the packed path
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    linears = [m for m in engine.runner.model.modules() if isinstance(m, PackableLinear)]
    assert len(linears) == 2 * 4 + 1  # 2 layers x (qkv, o, gate_up, down), and the LM head
    assert all(m.packed is not None for m in linears)
    # the plain copies are freed (the weights are not held twice); the tied head's is the embedding's, kept
    assert all(m.weight.numel() == 0 for m in linears if m.weight is not None)
    assert engine.runner.model.embed_tokens.weight.numel() > 0
