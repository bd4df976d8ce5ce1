"""Model families beyond Llama (cluster/convert/families.py): token-exact greedy parity with transformers `generate`
(fp32, CPU) at tp=1 and tp=2 over gloo, on tiny random-weight checkpoints of each family (tests/family_models.py);
what conversion decides per family (padded heads, capped contexts); and the one-line refusals."""
from __future__ import annotations

import json

import pytest

from cluster.config import EngineConfig
from cluster.convert.hf import engine_config
from cluster.engine.engine import LLMEngine
from conftest import hf_greedy
from test_tp import GREEDY, PROMPTS, _ec, tp_pipeline

TP1 = ["qwen3", "qwen3_moe", "phi3", "phi3_longrope", "gemma"]
TP2 = ["qwen3", "qwen3_moe", "phi3", "gemma"]


def _want(hf_model, ids: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, x, GREEDY.max_new_tokens) for x in ids]


@pytest.mark.parametrize("kind", TP1)
def test_greedy_matches_transformers(kind, tiny_models, engine_cache):
    path, hf_model = tiny_models(kind)
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    got = [r.token_ids for r in engine.generate(ids, GREEDY)]
    assert got == _want(hf_model, ids), f"{kind}: diverged from transformers"


@pytest.mark.parametrize("kind", TP2)
def test_tp2_matches_transformers(kind, tiny_models, engine_cache):
    """Fused qkv / gate-up (Phi-3) split per rank, per-head q/k norms (Qwen3) and a single KV head (Gemma) replicated,
    experts sliced along their FFN width (Qwen3-MoE)."""
    path, hf_model = tiny_models(kind)
    with tp_pipeline(str(path), _ec(engine_cache, 2)) as pipe:
        ids = [pipe.tokenizer.encode(p) for p in PROMPTS]
        got = [r.token_ids for r in pipe(ids, GREEDY)]
    assert got == _want(hf_model, ids), f"{kind}: tp=2 diverged from transformers"


def _cfg(tiny_models, kind: str, tp: int = 1):
    path, _ = tiny_models(kind)
    return engine_config(json.loads((path / "config.json").read_text()), "float32", tp, str(path))


def test_conversion_decisions(tiny_models):
    phi3 = _cfg(tiny_models, "phi3")
    assert (phi3.head_dim, phi3.real_head_dim) == (32, 24)  # 96 / 4 heads, padded for the kernels
    assert _cfg(tiny_models, "phi3_longrope").max_position_embeddings == 64  # LongRoPE's short factors only
    gemma = _cfg(tiny_models, "gemma")
    assert gemma.tie_word_embeddings and gemma.hidden_act == "gelu_tanh" and gemma.embed_scale == 8.0
    moe = _cfg(tiny_models, "qwen3_moe")
    assert moe.qk_norm and moe.norm_topk_prob and moe.sparse_layers == [0] and moe.num_experts == 4


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "bert"}, r"^model type 'bert' is not supported; supported: .*gemma.*qwen3_moe"),
    ({"model_type": "gemma2"}, r"^model type 'gemma2' is not supported: it needs attention-logit soft-capping"),
    ({"model_type": "gemma3_text"}, r"^model type 'gemma3_text' is not supported: it needs sliding-window"),
])
def test_unsupported_model_types_are_refused_in_one_line(hf, message):
    with pytest.raises(ValueError, match=message) as err:
        engine_config(hf, "float32", 1, "x")
    assert "\n" not in str(err.value)


def test_phi3_rope_scaling_it_does_not_implement_is_refused(tiny_models):
    path, _ = tiny_models("phi3")
    hf = json.loads((path / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"^Phi-3 rope scaling 'dynamic' is not supported; supported: default, longrope"):
        engine_config(hf, "float32", 1, str(path))
