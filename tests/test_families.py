"""Model families beyond Llama (cluster/convert/families.py): token-exact greedy parity with transformers `generate`
(fp32, CPU) at tp=1 and tp=2 over gloo, on tiny random-weight checkpoints of each family (tests/family_models.py).
Families that ship remote code are checked on a native model's weights rewritten into their layout
(tests/family_layouts.py): the same function, so transformers' tokens on the native model. Also what conversion
decides per family (padded heads, capped contexts, stop tokens, the chat template) and the one-line refusals."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.config import EngineConfig
from cluster.convert.hf import engine_config
from cluster.engine.engine import LLMEngine
from conftest import hf_greedy
from test_tp import GREEDY, PROMPTS, _ec, tp_pipeline

NATIVE = ["qwen3", "qwen3_moe", "phi3", "phi3_longrope", "gemma", "gemma2", "gemma3_text", "glm", "glm4", "falcon7b",
          "falcon40b", "falcon_seq", "dbrx"]
REMOTE = ["internlm", "qwen_v1", "baichuan", "baichuan2", "baichuan13b", "chatglm", "deepseek_moe"]
TP1 = NATIVE + REMOTE
# one of each way a family is sliced (Baichuan's W_pack splits as QWen's c_attn, GLM-4's rotary as ChatGLM's)
TP2 = ["qwen3", "qwen3_moe", "phi3", "gemma", "gemma2", "gemma3_text", "falcon7b", "falcon40b", "dbrx", "qwen_v1",
       "chatglm", "deepseek_moe", "baichuan13b"]
# Gemma 2 / 3 soft-cap the LM head's logits, which leaves the greedy token as it is unless a repetition penalty acts
# on the capped logits (as in transformers): with one, the cap changes the tokens, and the prompt + 24 tokens run
# well past the tiny window (family_models.GEMMA_WINDOW)
GEMMA = ("gemma2", "gemma3_text")
GEMMA_GREEDY = GREEDY.model_copy(update={"repetition_penalty": 1.3})


def _gen(kind: str):
    return GEMMA_GREEDY if kind in GEMMA else GREEDY


def _want(hf_model, ids: list[list[int]], gen=GREEDY) -> list[list[int]]:
    return [hf_greedy(hf_model, x, gen.max_new_tokens, gen.repetition_penalty) for x in ids]


def _engine_tokens(path, engine_cache: str, gen) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, the engine's greedy tokens) for PROMPTS, tp=1 on the CPU."""
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    return ids, [r.token_ids for r in engine.generate(ids, gen)]


@pytest.mark.parametrize("kind", TP1)
def test_greedy_matches_transformers(kind, tiny_models, engine_cache):
    path, hf_model = tiny_models(kind)
    ids, got = _engine_tokens(path, engine_cache, _gen(kind))
    assert got == _want(hf_model, ids, _gen(kind)), f"{kind}: diverged from transformers"


FEATURES_OFF = [("gemma2", {"attn_logit_softcapping": 0.0}), ("gemma2", {"final_logit_softcapping": 0.0}),
                ("gemma2", {"sliding_window": 0}), ("gemma2", {"query_pre_attn_scalar": 0.0}),
                ("gemma3_text", {"final_logit_softcapping": 0.0}), ("gemma3_text", {"sliding_window": 0}),
                ("gemma3_text", {"local_rope": "the global table"}), ("baichuan13b", {"alibi": "zero slopes"})]


def _switched_off(weights: dict, off: dict) -> None:
    """The weights' side of a feature switched off: Gemma 3's sliding layers given the global rope table, or
    ALiBi's slopes zeroed."""
    if "local_rope" in off:
        weights["rotary_local.inv_freq"] = weights["rotary.inv_freq"].clone()
    for name in [k for k in weights if k.endswith("alibi_slopes")] if "alibi" in off else []:
        weights[name] = torch.zeros_like(weights[name])


@pytest.mark.parametrize("kind, off", FEATURES_OFF, ids=[f"{k}-{next(iter(o))}" for k, o in FEATURES_OFF])
def test_features_change_the_tokens(kind, off, tiny_models, engine_cache, tmp_path):
    """Each Gemma feature and ALiBi switched off in the converted model changes the tokens, so the parity tests
    above would fail without it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cluster.convert.cache import ensure_converted

    path, hf_model = tiny_models(kind)
    model = tmp_path / "model"
    shutil.copytree(ensure_converted(str(path), 1, "float32", engine_cache, progress=False), model)
    cfg = json.loads((model / "config.json").read_text())
    if {"local_rope", "alibi"} & set(off):
        weights = load_file(str(model / "rank0.safetensors"))
        _switched_off(weights, off)
        save_file(weights, str(model / "rank0.safetensors"))
    else:
        assert all(cfg[k] for k in off), f"{kind}: {off} is not on"
        cfg.update(off)
    (model / "config.json").write_text(json.dumps(cfg))
    ids, got = _engine_tokens(model, engine_cache, _gen(kind))
    assert got != _want(hf_model, ids, _gen(kind)), f"{kind}: {off} does not change the tokens"


@pytest.mark.parametrize("kind", TP2)
def test_tp2_matches_transformers(kind, tiny_models, engine_cache):
    """Fused qkv / gate-up (Phi-3, QWen, Baichuan, ChatGLM) split per rank, per-head q/k norms (Qwen3) and a single
    KV head (Gemma) replicated, experts and shared experts sliced along their FFN width (Qwen3-MoE, DeepSeek-MoE),
    permuted half-head rotary (GLM-4, ChatGLM) per rank's heads."""
    path, hf_model = tiny_models(kind)
    with tp_pipeline(str(path), _ec(engine_cache, 2)) as pipe:
        ids = [pipe.tokenizer.encode(p) for p in PROMPTS]
        got = [r.token_ids for r in pipe(ids, _gen(kind))]
    assert got == _want(hf_model, ids, _gen(kind)), f"{kind}: tp=2 diverged from transformers"


def _cfg(tiny_models, kind: str, tp: int = 1):
    path, _ = tiny_models(kind)
    return engine_config(json.loads((path / "config.json").read_text()), "float32", tp, str(path))


def test_conversion_decisions(tiny_models):
    phi3 = _cfg(tiny_models, "phi3")
    assert (phi3.head_dim, phi3.real_head_dim) == (32, 24)  # 96 / 4 heads, padded for the kernels
    assert _cfg(tiny_models, "phi3_longrope").max_position_embeddings == 64  # LongRoPE's short factors only
    gemma = _cfg(tiny_models, "gemma")
    assert gemma.tie_word_embeddings and gemma.hidden_act == "gelu_tanh" and gemma.embed_scale == 8.0
    g2 = _cfg(tiny_models, "gemma2")
    assert (g2.sliding_window, g2.sliding_layers, g2.query_pre_attn_scalar, g2.sandwich_norms) == (8, [0], 24.0, True)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.max_position_embeddings) == (1.0, 2.0, 512)
    g3 = _cfg(tiny_models, "gemma3_text")
    assert (g3.sliding_layers, g3.local_rope, g3.qk_norm, g3.attn_logit_softcapping) == ([0], True, True, 0.0)
    # Hub configs before transformers 5: no layer_types (Gemma 2: alternating; Gemma 3: sliding_window_pattern)
    hub2 = {"model_type": "gemma2", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 32, "sliding_window": 4096}
    assert engine_config(hub2, "float32", 1, "x").sliding_layers == [0, 2]
    hub3 = {**hub2, "model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window_pattern": 6,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert engine_config(hub3, "float32", 1, "x").sliding_layers == [0, 1, 2, 3, 4, 6]
    _check_gemma3_rope_tables({**hub3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    moe = _cfg(tiny_models, "qwen3_moe")
    assert moe.qk_norm and moe.norm_topk_prob and moe.sparse_layers == [0] and moe.num_experts == 4
    glm = _cfg(tiny_models, "chatglm")
    assert (glm.rotary_dim, glm.rope_interleaved, glm.num_kv_heads, glm.attention_bias) == (8, True, 2, True)
    assert _cfg(tiny_models, "glm4").sandwich_norms
    ds = _cfg(tiny_models, "deepseek_moe")
    assert (ds.sparse_layers, ds.shared_expert_intermediate_size, ds.shared_expert_gate) == ([1], 64, False)
    b13 = _cfg(tiny_models, "baichuan13b")
    assert (b13.alibi, b13.max_position_embeddings) == (True, 512)  # model_max_length
    qwen = _cfg(tiny_models, "qwen_v1")
    assert (qwen.intermediate_size, qwen.max_position_embeddings) == (128, 256)  # w1/w2 halves; seq_length
    path, _ = tiny_models("phi3")  # sliding-window attention is full attention up to the window: served that far
    hf = json.loads((path / "config.json").read_text())
    assert engine_config({**hf, "sliding_window": 100}, "float32", 1, "x").max_position_embeddings == 100
    assert engine_config({**hf, "model_type": "qwen2", "sliding_window": 100, "use_sliding_window": False},
                         "float32", 1, "x").max_position_embeddings == 512


def _check_gemma3_rope_tables(hub: dict) -> None:
    """Gemma 3's two tables, from an old config (rope_theta + rope_scaling, rope_local_base_freq) and from
    transformers 5's rope_parameters per layer type alike: 1e6 scaled linearly by 8 for the full layers, 1e4 for
    the sliding ones."""
    import transformers as tf

    from cluster.convert import rope
    from cluster.convert.families import family_for
    from cluster.convert.family import config_view

    base = lambda theta: 1.0 / theta ** (torch.arange(0, 32, 2).float() / 32)  # noqa: E731
    new = tf.Gemma3TextConfig(**{k: v for k, v in hub.items() if k != "model_type"}).to_dict()
    for hf in (hub, new):
        cfg, view = engine_config(hf, "float32", 1, "x"), config_view(family_for("gemma3_text"), hf)
        assert torch.allclose(rope.inv_freq(view, cfg)[0], base(1e6) / 8)
        assert torch.allclose(rope.local_inv_freq(view, cfg)[0], base(1e4))


def test_stop_tokens_and_chat_template_come_from_the_checkpoint(tiny_models, engine_cache):
    """QWen v1's generation_config (eos_token_id and single-token stop_words_ids) are stop tokens, and prompts from
    messages go through the checkpoint tokenizer's chat template."""
    from transformers import AutoTokenizer

    from family_models import QWEN_V1_GENERATION

    path, _ = tiny_models("qwen_v1")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    stops = engine.runner.cfg.eos_token_ids
    assert {QWEN_V1_GENERATION["eos_token_id"], QWEN_V1_GENERATION["stop_words_ids"][0][0]} <= set(stops)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    want = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(msgs, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert engine.tokenizer.prompt_ids(msgs) == list(want)


def test_remote_code_tokenizer_is_refused_with_the_way_out(tiny_models, engine_cache, tmp_path):
    import shutil

    from cluster.convert.cache import ensure_converted

    path, _ = tiny_models("qwen_v1")
    src = tmp_path / "qwen_remote_tokenizer"
    shutil.copytree(path, src, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab.json",
                                                             "merges.txt", "chat_template*"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    with pytest.raises(ValueError, match=r"does not load without remote code.*Qwen1\.5's tokenizer files") as err:
        ensure_converted(str(src), 1, "float32", engine_cache, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "chatglm", "position_encoding_2d": True}, r"^ChatGLM-6B \(v1: 2D positions"),
    ({"model_type": "bert"}, r"^model type 'bert' is not supported; supported: .*gemma.*qwen3_moe"),
    ({"model_type": "gemma3"}, r"^model type 'gemma3' is not supported: it needs its SigLIP vision tower.*gemma3_text"),
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


def _rounded_linears(hf_model, round_weight) -> dict:
    """Every decoder linear's weight (HF names) as round_weight leaves it; embeddings and the LM head untouched."""
    import torch

    return {f"{name}.weight": round_weight(m.weight.detach()) for name, m in hf_model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"}


@pytest.mark.parametrize("kind", ["qwen3", "phi3", "gemma", "falcon7b", "gemma2", "gemma3_text", "glm4", "internlm",
                                  "qwen_v1", "baichuan13b", "chatglm"])
def test_quant_fp8_matches_transformers_on_the_rounded_weights(kind, tiny_models, engine_cache):
    """--quant fp8 (e4m3, a scale per output channel) through each family's splits (Phi-3's fused qkv / gate-up,
    Falcon's grouped qkv and plain MLP), padded heads (Phi-3), GeGLU (Gemma), q/k norms (Qwen3)."""
    from cluster.quant import fp8
    from test_fp8 import _with_weights

    path, hf_model = tiny_models(kind)
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", quant="fp8"))
    assert engine.model_config.quant["method"] == "fp8"
    ref = _with_weights(hf_model, _rounded_linears(hf_model, lambda w: fp8.dequantize(*fp8.quantize_weight(w))))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(ids, _gen(kind))] == _want(ref, ids, _gen(kind)), kind


@pytest.mark.parametrize("kind", ["phi3", "gemma", "gemma2", "glm4", "qwen_v1", "chatglm"])
def test_quant_awq_matches_transformers_on_the_rounded_weights(kind, tiny_models, engine_cache, monkeypatch):
    """--quant awq (4-bit round-to-nearest, groups of 32 here: the tiny widths) on fused and GeGLU MLPs."""
    import cluster.convert.quant as cq
    from cluster.quant import int4
    from test_fp8 import _with_weights

    monkeypatch.setattr(cq, "RTN_GROUP", 32)
    path, hf_model = tiny_models(kind)
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", quant="awq"))
    assert engine.model_config.quant == {"method": "awq", "bits": 4, "group_size": 32}
    ref = _with_weights(hf_model, _rounded_linears(hf_model, lambda w: int4.dequantize(*int4.quantize(w, 32))))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(ids, _gen(kind))] == _want(ref, ids, _gen(kind)), kind


def test_commands_refuse_an_unsupported_model_before_starting(tmp_path):
    """`cluster chat` / `serve` check the model type from config.json alone (no torch imported for it)."""
    import subprocess
    import sys

    from cluster.cli_args import check_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ValueError, match=r"^model type 'gemma3' is not supported: it needs its SigLIP vision tower"):
        check_model(str(tmp_path))
    code = "import sys, cluster.convert.families; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
