"""Mixture-of-experts models (Mixtral; Qwen2-MoE with a gated shared expert and a dense layer): token-exact
greedy parity with transformers, both expert paths agreeing, and transformers' fused 3D expert layout read the same
as per-expert checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.kernels import reference
from cluster.layers.moe import route
from cluster.models.config import ModelConfig
from conftest import hf_greedy

GREEDY32 = GenerationConfig(max_new_tokens=32, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello there, how are you doing today?", "The capital of France is"]


def _engine(path, cache: str, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=cache, device="cpu", dtype="float32", **kw))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_greedy_matches_transformers(kind, tiny_models, engine_cache):
    path, hf_model = tiny_models(kind)
    layer = hf_model.model.layers[0]
    router = getattr(layer, "block_sparse_moe", None) or layer.mlp  # transformers 4 / 5 names
    router = router.gate
    assert router.weight.abs().sum() > 0, "the tiny model's router is all zeros: routing would be a tie"
    engine = _engine(path, engine_cache)
    cfg = engine.runner.cfg
    assert cfg.num_experts == 4 and cfg.sparse_layers == ([0, 1] if kind == "mixtral" else [0])
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate([ids], GREEDY32)[0].token_ids
        assert ours == hf_greedy(hf_model, ids, 32), f"{kind}: diverged from transformers"
    # a batch of both prompts (tokens routed to different experts in one step) gives the same tokens
    batch = engine.generate([engine.tokenizer.encode(p) for p in PROMPTS], GREEDY32)
    assert [r.token_ids for r in batch] == [engine.generate([engine.tokenizer.encode(p)], GREEDY32)[0].token_ids
                                           for p in PROMPTS]
    assert engine.bm.num_free == engine.bm.num_blocks


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_experts_match_the_definition(normalize):
    """The reference's grouped path and its graph-safe dense path (every expert on every token, zero-weighted)
    both equal a per-token loop written from the definition."""
    torch.manual_seed(0)
    E, H, F, T, k = 6, 32, 24, 11, 2
    x = torch.randn(T, H)
    gate_w, w13, w2 = torch.randn(E, H), torch.randn(E, 2 * F, H) * 0.1, torch.randn(E, H, F) * 0.1
    weights, experts = route(x, gate_w, k, normalize)
    assert torch.allclose(weights.sum(-1), torch.ones(T)) == normalize
    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = experts[t, j]
            g, u = (w13[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(g) * u))
    grouped = reference.moe_experts(x, w13, w2, weights, experts)
    dense = reference.moe_experts_dense(x, w13, w2, weights, experts)
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)


def test_fused_expert_layout_converts_the_same(tiny_models, engine_cache, tmp_path):
    """A checkpoint with transformers' 3D expert tensors (experts.gate_up_proj [E, 2F, H], experts.down_proj
    [E, H, F]) gives the same tokens as the per-expert one it was made from."""
    from safetensors.torch import load_file, save_file

    path, _ = tiny_models("qwen2_moe")
    fused = tmp_path / "fused"
    shutil.copytree(path, fused)
    sd = load_file(str(fused / "model.safetensors"))
    p = "model.layers.0.mlp.experts."
    for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        per = [torch.cat([sd.pop(f"{p}{e}.{part}.weight") for part in parts]) for e in range(4)]
        sd[p + name] = torch.stack(per).contiguous()
    assert not any(k.startswith(p + "0.") for k in sd)
    save_file(sd, str(fused / "model.safetensors"))
    a, b = _engine(path, engine_cache), _engine(fused, engine_cache)
    ids = a.tokenizer.encode(PROMPTS[1])
    assert a.generate([ids], GREEDY32)[0].token_ids == b.generate([ids], GREEDY32)[0].token_ids


def test_tp_check_names_the_expert_width(tiny_models):
    path, _ = tiny_models("qwen2_moe")
    from cluster.convert.hf import engine_config

    hf = json.loads((path / "config.json").read_text())
    cfg = engine_config(hf, "float32", 1, str(path))
    assert cfg.ffn_widths() == [128, 64, 90]
    with pytest.raises(ValueError, match=r"FFN 128/64/90\); valid tp sizes: \[1, 2\]"):
        engine_config(hf, "float32", 4, str(path))
    roundtrip = tmp = path.parent / "cfg.json"
    cfg.save(tmp)
    assert ModelConfig.load(roundtrip) == cfg
