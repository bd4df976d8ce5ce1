"""4-bit AWQ weights: the layouts round-trip; a checkpoint written by `cluster lite auto_awq` (AutoAWQ's GEMM
format) runs in the engine token-exact with transformers on the same dequantized weights, at tp=1 and tp=2; the
activation-aware scales beat plain rounding where activations have outlier channels."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.quant import awq, int4
from conftest import hf_greedy

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
GROUP = 32  # the tiny model's o_proj and down_proj split over 2 ranks in whole groups


def test_int4_layouts_round_trip():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    q, zeros, scales = int4.quantize(w, GROUP)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and zeros.shape == scales.shape == (48, 3)
    err = (int4.dequantize(q, zeros, scales) - w).abs().view(48, 3, GROUP)
    assert (err <= scales[..., None] / 2 + 1e-6).all()  # round to nearest: half a step at most
    assert torch.equal(int4.unpack(int4.pack(q)), q)
    qw, qz, s16 = int4.to_awq(q, zeros, scales)
    assert qw.dtype == torch.int32 and qw.shape == (96, 6) and qz.shape == (3, 6) and s16.shape == (3, 48)
    q2, z2, s2 = int4.from_awq(qw, qz, s16)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())


@pytest.fixture(scope="module")
def awq_model(tiny_models, tmp_path_factory, tokenizer_dir):
    """The tiny Llama quantized with AWQ, its checkpoint, and transformers' model holding the very weights the
    checkpoint decodes to (scaled norms and dequantized linears)."""
    path, hf_model = tiny_models("llama")
    model = copy.deepcopy(hf_model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = awq.calibration_ids(tok, awq.default_calibration_text(), 8, 64)
    quantized = awq.quantize_model(model, ids, GROUP)
    out = awq.save_awq_checkpoint(model, quantized, tok, tmp_path_factory.mktemp("awq"), GROUP)
    with torch.no_grad():
        for name, (q, zeros, scales) in quantized.items():
            _, _, s16 = int4.to_awq(q, zeros, scales)
            model.get_submodule(name).weight.copy_(int4.dequantize(q, zeros, s16.t().float()))
    return out, model


def test_awq_checkpoint_matches_transformers_on_its_weights(awq_model, engine_cache):
    path, reference = awq_model
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                          "version": "gemm"}
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    assert engine.model_config.quant == {"method": "awq", "bits": 4, "group_size": GROUP}
    layer = engine.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.qweight.dtype == torch.uint8 and not hasattr(layer.mlp.down_proj, "weight")
    for prompt in ("The capital of France is", "Hello there, how are you doing today?"):
        ids = engine.tokenizer.encode(prompt)
        assert engine.generate([ids], G)[0].token_ids == hf_greedy(reference, ids, G.max_new_tokens)


def test_awq_at_tp2_matches_tp1(awq_model, engine_cache):
    from cluster import pipeline

    path, _ = awq_model
    ec = dict(cache_dir=engine_cache, device="cpu", dtype="float32", session_len=256, max_batch_size=8)
    one = LLMEngine(str(path), EngineConfig(**ec))
    ids = one.tokenizer.encode("The capital of France is")
    pipe = pipeline(str(path), engine_config=EngineConfig(**ec, tp=2))
    try:
        assert pipe(ids, G).token_ids == one.generate([ids], G)[0].token_ids
    finally:
        pipe.close()
        pipe.engine.engine.runner.close()


def test_activation_aware_scales_beat_plain_rounding(tiny_models):
    """Outlier input channels (a few RMSNorm weights x30, the q/k/v and gate/up columns /30: the same function)
    are where round-to-nearest loses most; AWQ's scales protect them."""
    path, hf_model = tiny_models("llama")
    from transformers import AutoTokenizer

    base = copy.deepcopy(hf_model)
    with torch.no_grad():
        for layer in base.model.layers:
            for norm, lins in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                         layer.self_attn.v_proj)),
                               (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[:4] *= 30
                for lin in lins:
                    lin.weight[:, :4] /= 30
    ids = awq.calibration_ids(AutoTokenizer.from_pretrained(str(path)), awq.default_calibration_text(), 8, 64)
    with torch.no_grad():
        want = base(ids).logits

    def error(search: bool) -> float:
        model = copy.deepcopy(base)
        quantized = awq.quantize_model(model, ids, GROUP, search=search)
        with torch.no_grad():
            for name, parts in quantized.items():
                model.get_submodule(name).weight.copy_(int4.dequantize(*parts))
            return (model(ids).logits - want).pow(2).mean().item()

    rtn, aware = error(False), error(True)
    assert aware < 0.7 * rtn, (aware, rtn)


def test_auto_awq_cli(tiny_models, tmp_path, capsys):
    from cluster.cli import main

    path, _ = tiny_models("llama")
    out = tmp_path / "q"
    assert main(["lite", "auto_awq", str(path), "--work-dir", str(out), "--w-group-size", "32",
                 "--calib-samples", "4", "--calib-seqlen", "32"]) == 0
    assert "wrote 4-bit AWQ checkpoint (14 linears, group 32" in capsys.readouterr().out
    engine = LLMEngine(str(out), EngineConfig(cache_dir=str(tmp_path / "c"), device="cpu", dtype="float32"))
    assert len(engine.generate([engine.tokenizer.encode("Hi")], G)[0].token_ids) == G.max_new_tokens
    assert main(["lite", "auto_awq", str(path), "--work-dir", str(out), "--w-group-size", "48"]) == 2
    assert "not a multiple of --w-group-size 48" in capsys.readouterr().err


def test_other_quantized_checkpoints_are_refused():
    from cluster.convert.awq import awq_config

    with pytest.raises(ValueError, match="'gptq' is not supported"):
        awq_config({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(ValueError, match="version='gemv'"):
        awq_config({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}})
