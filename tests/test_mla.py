"""DeepSeek-V2 / V3: multi-head latent attention over a paged cache of latent rows, and DeepSeek's routing.

Token-exact greedy parity with transformers `generate` (fp32, CPU) at tp=1 and tp=2 on tiny random-weight
checkpoints (tests/mla_models.py); the cache really holds one kv_lora_rank + rope row a token and layer; prompts
longer than a prefill chunk and prefix-cache hits read earlier rows back from the cache; the routers against
transformers' own; what conversion decides, and the one-line refusals."""
from __future__ import annotations

import json

import pytest
import torch

import mla_models
from cluster.config import EngineConfig
from cluster.convert.hf import engine_config
from cluster.engine.engine import LLMEngine
from conftest import hf_greedy
from test_tp import GREEDY, PROMPTS, _ec, tp_pipeline

KINDS = ("deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory, tokenizer_dir):
    """kind -> (checkpoint dir, transformers model), built once per module."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = mla_models.build(kind, tokenizer_dir, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _want(hf_model, ids: list[list[int]], n: int = GREEDY.max_new_tokens) -> list[list[int]]:
    return [hf_greedy(hf_model, x, n) for x in ids]


def _engine(path, engine_cache, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32", **kw))


@pytest.mark.parametrize("kind", mla_models.KINDS)
def test_greedy_matches_transformers(kind, mla_model, engine_cache):
    path, hf_model = mla_model(kind)
    engine = _engine(path, engine_cache)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(ids, GREEDY)] == _want(hf_model, ids), kind


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_matches_transformers(kind, mla_model, engine_cache):
    """Heads (q_proj / q_b_proj, kv_b_proj, o_proj) split over the ranks, the latent cache whole on each."""
    path, hf_model = mla_model(kind)
    with tp_pipeline(str(path), _ec(engine_cache, 2)) as pipe:
        ids = [pipe.tokenizer.encode(p) for p in PROMPTS]
        got = [r.token_ids for r in pipe(ids, GREEDY)]
    assert got == _want(hf_model, ids), f"{kind}: tp=2 diverged from transformers"


def test_cache_holds_latent_rows(mla_model, engine_cache):
    """One row of kv_lora_rank + qk_rope_head_dim values a token and layer (not per-head K and V), and the block
    count profiled from those bytes."""
    path, _ = mla_model("deepseek_v3")
    engine = _engine(path, engine_cache)
    runner, cfg = engine.runner, engine.runner.cfg
    row = mla_models.MLA["kv_lora_rank"] + mla_models.MLA["qk_rope_head_dim"]
    assert runner.kv_cache.shape == (cfg.num_layers, runner.num_blocks, runner.block_size, 1, row)
    assert runner.block_bytes / runner.block_size / cfg.num_layers == row * 4  # fp32
    per_head_kv = 2 * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.head_dim) * 4  # what expanded K and V would take
    assert per_head_kv / (row * 4) > 2
    layer = engine.runner.model.layers[0].self_attn.attn
    assert layer.k_cache.data_ptr() == runner.kv_cache[0].data_ptr() and layer.v_cache is layer.k_cache


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_prefix_hits_read_the_cache(kind, mla_model, engine_cache):
    """A prompt longer than the 16-token prefill chunk (later chunks attend to earlier chunks' latent rows), then a
    second prompt sharing its first blocks (served from the prefix cache): transformers' tokens both times."""
    path, hf_model = mla_model(kind)
    engine = _engine(path, engine_cache, max_prefill_token_num=16, session_len=128)
    shared = "You are a helpful assistant. Answer briefly and precisely, in English. " * 2
    ids = [engine.tokenizer.encode(shared + tail) for tail in ("What is 2+2?", "Name a color.")]
    assert len(ids[0]) > 32
    first = engine.generate([ids[0]], GREEDY)[0]
    second = engine.generate([ids[1]], GREEDY)[0]
    assert second.cached_token_len >= 16
    assert [first.token_ids, second.token_ids] == _want(hf_model, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_routing_matches_transformers_router(kind):
    """Routing on random tokens: the same experts and weights as transformers' router (V2: greedy and
    group_limited_greedy, softmax; V3: noaux_tc with a correction bias, sigmoid)."""
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as v3

    from cluster.layers.routing import Routing

    torch.manual_seed(0)
    cfg = mla_models.config(kind)
    x = torch.randn(64, cfg.hidden_size)
    methods = ["greedy", "group_limited_greedy"] if kind == "deepseek_v2" else ["noaux_tc"]
    for method in methods:
        if kind == "deepseek_v2":
            cfg.topk_method = method
            theirs = v2.DeepseekV2TopkRouter(cfg)
            bias = None
        else:
            theirs = v3.DeepseekV3TopkRouter(cfg)
            bias = theirs.e_score_correction_bias
            bias.copy_(torch.randn_like(bias) * 0.1)
        torch.nn.init.normal_(theirs.weight, std=0.5)
        _, want_w, want_e = theirs(x)
        normalize = bool(getattr(cfg, "norm_topk_prob", False)) and kind == "deepseek_v3"
        ours = Routing(cfg.num_experts_per_tok, method, "softmax" if kind == "deepseek_v2" else "sigmoid",
                       cfg.n_group, cfg.topk_group, normalize, cfg.routed_scaling_factor, bias is not None)
        got_w, got_e = ours(x, theirs.weight, bias)
        order_g, order_w = got_e.sort(dim=-1), want_e.sort(dim=-1)
        assert torch.equal(order_g.values, order_w.values), method
        torch.testing.assert_close(got_w.gather(1, order_g.indices), want_w.gather(1, order_w.indices))


def test_bfloat16_runs_and_keeps_the_bias_in_fp32(mla_model, engine_cache):
    """A bf16 engine (the CPU's bf16 matmuls, a bf16 latent cache): its first tokens are the fp32 engine's, and the
    correction bias stays fp32 (it is added to sigmoid scores near 0.5, where bf16 keeps 2-3 digits)."""
    path, _ = mla_model("deepseek_v3")
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="bfloat16"))
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    assert engine.runner.model.layers[1].mlp.e_score_correction_bias.dtype == torch.float32
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    got = [r.token_ids for r in engine.generate(ids, GREEDY)]
    want = [r.token_ids for r in _engine(path, engine_cache).generate(ids, GREEDY)]
    assert all(len(g) == GREEDY.max_new_tokens for g in got) and [g[0] for g in got] == [w[0] for w in want]


def _cfg(mla_model, kind: str, tp: int = 1, **over):
    path, _ = mla_model(kind)
    hf = {**json.loads((path / "config.json").read_text()), **over}
    return engine_config(hf, "float32", tp, str(path))


def test_conversion_decisions(mla_model):
    import math

    v2 = _cfg(mla_model, "deepseek_v2")
    mscale = 0.1 * 0.707 * math.log(4.0) + 1.0  # YaRN's mscale_all_dim, squared into the softmax scale
    assert v2.attn_scale == pytest.approx((16 + 16) ** -0.5 * mscale ** 2)
    assert (v2.kv_lora_rank, v2.q_lora_rank, v2.head_dim, v2.num_kv_heads, v2.rope_interleaved) == (32, 0, 16, 1, True)
    assert (v2.topk_method, v2.scoring_func, v2.router_bias, v2.sparse_layers) == ("group_limited_greedy", "softmax",
                                                                                   False, [1])
    assert v2.shared_expert_intermediate_size == 64 and not v2.shared_expert_gate
    v3 = _cfg(mla_model, "deepseek_v3")
    assert (v3.q_lora_rank, v3.topk_method, v3.scoring_func, v3.router_bias, v3.n_group) == (48, "noaux_tc",
                                                                                             "sigmoid", True, 4)
    assert v3.attn_scale == pytest.approx(32 ** -0.5) and v3.norm_topk_prob
    assert not _cfg(mla_model, "deepseek_v3", rope_interleave=False).rope_interleaved
    assert _cfg(mla_model, "deepseek_v3", tp=4).tp == 4  # 4 heads: one a rank, the latent whole on each


@pytest.mark.parametrize("over, message", [
    ({"attention_bias": True}, r"^DeepSeek MLA with attention_bias: true is not supported"),
    ({"topk_method": "top2"}, r"^DeepSeek routing 'top2' with 'sigmoid' scores is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
     r"^fp8-quantized multi-head latent attention models \(DeepSeek-V2/V3\) are not supported yet"),
])
def test_refusals_are_one_line(mla_model, over, message):
    with pytest.raises(ValueError, match=message) as err:
        _cfg(mla_model, "deepseek_v3", **over)
    assert "\n" not in str(err.value)


def test_quant_flag_and_quantized_kv_cache_are_refused(mla_model, engine_cache):
    path, _ = mla_model("deepseek_v2")
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"^fp8-quantized multi-head latent attention models"):
        engine_config(hf, "float32", 1, str(path), quant="fp8")
    with pytest.raises(ValueError, match=r"^quant_policy 8 is not supported for multi-head latent attention"):
        _engine(path, engine_cache, quant_policy=8)


V2_LITE_STYLE = {  # the keys of deepseek-ai's remote-code config.json (rope_scaling with "type"), V2-Lite's shape
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
    "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                     "beta_slow": 1, "original_max_position_embeddings": 4096}}


def test_remote_code_config_keys_give_transformers_rope_and_scale():
    """A config in deepseek-ai's published form (no weights read): YaRN's frequencies and cos/sin scaling as
    transformers' DeepSeek-V2 computes them, the softmax scale with mscale_all_dim squared in, a 576-value row."""
    import transformers as tf
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

    from cluster.convert import rope
    from cluster.layers.mla import latent_dim

    cfg = engine_config(V2_LITE_STYLE, "bfloat16", 1, "x")
    inv_freq, cos_sin_scale = rope.inv_freq(V2_LITE_STYLE, cfg)
    yarn = {k: v for k, v in V2_LITE_STYLE["rope_scaling"].items() if k != "type"}
    theirs = tf.DeepseekV2Config(**{k: v for k, v in V2_LITE_STYLE.items() if k not in ("rope_scaling", "rope_theta")},
                                 rope_parameters={**yarn, "rope_type": "yarn", "rope_theta": 10000.0})
    rotary = v2.DeepseekV2RotaryEmbedding(theirs)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=0, atol=0)
    assert cos_sin_scale == rotary.attention_scaling
    assert cfg.attn_scale == pytest.approx(v2.DeepseekV2Attention(theirs, 0).scaling, rel=1e-12)
    assert latent_dim(cfg) == 576 and cfg.sparse_layers == list(range(1, 27)) and cfg.topk_method == "greedy"


def test_fused_3d_expert_tensors_convert_the_same(mla_model, engine_cache, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]), which
    save_pretrained turns back into per-expert tensors: a checkpoint holding it gives transformers' tokens too."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, hf_model = mla_model("deepseek_v3")
    fused = tmp_path / "fused"
    shutil.copytree(path, fused)
    sd = load_file(str(fused / "model.safetensors"))
    p, n = "model.layers.1.mlp.experts.", mla_models.config("deepseek_v3").n_routed_experts
    for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        sd[p + name] = torch.stack([torch.cat([sd.pop(f"{p}{e}.{part}.weight") for part in parts])
                                    for e in range(n)]).contiguous()
    save_file(sd, str(fused / "model.safetensors"))
    engine = _engine(fused, engine_cache)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(ids, GREEDY)] == _want(hf_model, ids)
