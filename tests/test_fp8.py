"""FP8 weights end to end on the CPU: `cluster lite fp8` writes a compressed-tensors checkpoint, and the engine on it
(the dequantizing reference path) is token-exact with transformers on the dequantized weights, at tp=1 and tp=2;
`--quant fp8` / `--quant awq` on a full-precision checkpoint quantize at conversion; per-tensor and block-scaled
checkpoints load; bad checkpoints and an FP8 model on a pre-Ada GPU are one-line errors naming the fix."""
from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.config import EngineConfig, GenerationConfig
from cluster.convert import fp8 as fp8_ckpt
from cluster.convert.quant import checkpoint_quant
from cluster.engine.engine import LLMEngine
from cluster.quant import fp8, int4
from cluster.quant.fp8_export import LINEAR, write_fp8_checkpoint
from conftest import hf_greedy

G = GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ("The capital of France is", "Hello there, how are you doing today?")


def _engine(path, cache, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig(cache_dir=cache, device="cpu", dtype="float32", **kw))


def _with_weights(hf_model, weights: dict[str, torch.Tensor]):
    """A copy of transformers' model holding `weights` (HF names) in fp32."""
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_parameter(name).copy_(w.float())
    return model


def _assert_parity(engine: LLMEngine, reference) -> None:
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        assert engine.generate([ids], G)[0].token_ids == hf_greedy(reference, ids, G.max_new_tokens), prompt


@pytest.fixture(scope="module")
def fp8_model(tiny_models, tmp_path_factory):
    """The tiny Llama through `cluster lite fp8`, and transformers' model on the checkpoint's dequantized weights."""
    path, hf_model = tiny_models("llama")
    out, linears = write_fp8_checkpoint(str(path), tmp_path_factory.mktemp("fp8"), progress=False)
    assert linears == 14
    sd = load_file(str(out / "model.safetensors"))
    deq = {k: fp8.dequantize(v, sd[k[: -len(".weight")] + ".weight_scale"]) for k, v in sd.items()
           if LINEAR.fullmatch(k)}
    return out, _with_weights(hf_model, deq)


def test_fp8_quantization_round_trips():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 2, 48)[:, None]
    w[3] = 0.0
    q, s = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (48,) and torch.isfinite(s).all()
    assert (q.float().abs().amax(1)[s > fp8.MIN_SCALE] == 448).all()  # each row's max at e4m3's max
    err = (fp8.dequantize(q, s) - w).abs()
    assert (err <= w.abs() / 16 + s[:, None] * 2 ** -9 + 1e-30).all()  # half a step: 3 mantissa bits (+ subnormals)
    assert torch.equal(fp8.to_fp8(torch.tensor([1e6, -1e9, 500.0])).float(), torch.tensor([448.0, -448.0, 448.0]))
    x = torch.randn(5, 96)
    xq, xs = fp8.quantize_tokens(x)
    assert xs.shape == (5, 1) and ((xq.float() * xs - x).abs() <= x.abs().amax(1, keepdim=True) / 28).all()


def test_block_scales_convert_to_channels():
    """128 x 128 blocks (odd edges: 200 x 300) -> per channel within one e4m3 step of the block-scaled weight."""
    torch.manual_seed(1)
    w = torch.randn(200, 300)
    s_inv = torch.rand(2, 3) + 0.01
    q = fp8.to_fp8(w / s_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300])
    want = fp8.dequantize_blocks(q, s_inv)
    q2, s2 = fp8.from_blocks(q, s_inv)
    assert ((fp8.dequantize(q2, s2) - want).abs() <= want.abs() / 16 + s2[:, None] * 2 ** -9).all()
    with pytest.raises(ValueError, match=r"do not tile a \[200, 300\] weight in 64 x 64 blocks.*weight_block_size"):
        fp8.from_blocks(q, s_inv, (64, 64))


def test_fp8_checkpoint_matches_transformers_on_its_weights(fp8_model, engine_cache):
    path, reference = fp8_model
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    engine = _engine(path, engine_cache)
    assert engine.model_config.quant == {"method": "fp8", "weights": "channel", "activations": "token"}
    qkv = engine.runner.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.dtype == torch.float32
    assert qkv.weight_scale.shape == (qkv.weight.shape[0],)
    _assert_parity(engine, reference)


def test_fp8_at_tp2_matches_transformers(fp8_model, engine_cache):
    """Column-parallel shards slice the scales with their rows, row-parallel ones keep them whole."""
    from cluster import pipeline

    path, reference = fp8_model
    pipe = pipeline(str(path), engine_config=EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32",
                                                          session_len=256, max_batch_size=8, tp=2))
    try:
        ids = pipe.engine.engine.tokenizer.encode(PROMPTS[0])
        assert pipe(ids, G).token_ids == hf_greedy(reference, ids, G.max_new_tokens)
    finally:
        pipe.close()
        pipe.engine.engine.runner.close()


def test_quant_fp8_quantizes_a_full_precision_checkpoint(tiny_models, fp8_model, engine_cache):
    """--quant fp8 on the fp32 checkpoint: the same e4m3 values as `cluster lite fp8`, in a cache entry of its own."""
    path, _ = tiny_models("llama")
    engine = _engine(path, engine_cache, quant="fp8")
    assert "-fp8-" in engine.model_dir.name and engine.model_config.quant["method"] == "fp8"
    _assert_parity(engine, fp8_model[1])
    assert _engine(path, engine_cache).model_config.quant == {}  # without --quant: the plain entry


def test_quant_awq_rounds_a_full_precision_checkpoint(tiny_models, engine_cache, monkeypatch, caplog):
    """--quant awq: round-to-nearest 4 bits at conversion (group 128; 32 here, the tiny model's widths), said in
    a log line that points to `cluster lite auto_awq`."""
    import cluster.convert.quant as cq

    path, hf_model = tiny_models("llama")
    with pytest.raises(ValueError, match="groups of 128 input channels.*use --quant fp8"):
        _engine(path, engine_cache, quant="awq")
    monkeypatch.setattr(cq, "RTN_GROUP", 32)
    with caplog.at_level(logging.WARNING):
        engine = _engine(path, engine_cache, quant="awq")
    assert "cluster lite auto_awq" in caplog.text
    assert engine.model_config.quant == {"method": "awq", "bits": 4, "group_size": 32}
    deq = {}
    for name, w in hf_model.state_dict().items():
        if LINEAR.fullmatch(name):
            q, z, s = int4.quantize(w, 32)
            deq[name] = int4.dequantize(q, z, s)
    _assert_parity(engine, _with_weights(hf_model, deq))


def _rewrite(src, dst, qc: dict, tensors) -> None:
    """A copy of checkpoint `src` with `qc` as its quantization_config and tensors(state dict) as its weights."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    save_file(tensors(load_file(str(dst / "model.safetensors"))), str(dst / "model.safetensors"))


def _per_tensor(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if LINEAR.fullmatch(k):
            s = v.abs().max() / fp8.FP8_MAX
            out[k], out[k[:-7] + ".weight_scale"] = fp8.to_fp8(v / s), s.reshape(())
        else:
            out[k] = v
    return out


def _blocks(sd: dict, b: int = 32) -> dict:
    out = {}
    for k, v in sd.items():
        if LINEAR.fullmatch(k):
            blocks = v.unflatten(0, (-1, b)).unflatten(2, (-1, b)).abs().amax((1, 3)) / fp8.FP8_MAX
            full = blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)
            out[k], out[k[:-7] + ".weight_scale_inv"] = fp8.to_fp8(v / full), blocks
        else:
            out[k] = v
    return out


FP8_TENSOR = {"quant_method": "fp8", "activation_scheme": "static", "fmt": "e4m3"}
FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 32]}


@pytest.mark.parametrize("kind", ["tensor", "block"])
def test_per_tensor_and_block_scaled_checkpoints(kind, tiny_models, tmp_path, engine_cache):
    """quant_method 'fp8' with a per-tensor weight_scale (static input scales: activations go per token), and
    with weight_scale_inv per block (rounded again per channel at conversion: the reference is that rounding)."""
    path, hf_model = tiny_models("llama")
    qc, make = (FP8_TENSOR, _per_tensor) if kind == "tensor" else (FP8_BLOCK, _blocks)
    _rewrite(path, tmp_path / kind, qc, make)
    sd = load_file(str(tmp_path / kind / "model.safetensors"))
    deq = {}
    for k, v in sd.items():
        if LINEAR.fullmatch(k):
            deq[k] = (fp8.dequantize(v, sd[k[:-7] + ".weight_scale"]) if kind == "tensor"
                      else fp8.dequantize(*fp8.from_blocks(v, sd[k[:-7] + ".weight_scale_inv"], (32, 32))))
    _assert_parity(_engine(tmp_path / kind, engine_cache), _with_weights(hf_model, deq))


def test_bad_fp8_checkpoints_say_what_to_do(tiny_models, tmp_path, engine_cache):
    path, _ = tiny_models("llama")

    def no_scale(sd: dict) -> dict:
        return {k: v for k, v in _per_tensor(sd).items() if k != "model.layers.0.self_attn.q_proj.weight_scale"}

    _rewrite(path, tmp_path / "noscale", FP8_TENSOR, no_scale)
    with pytest.raises(ValueError, match="q_proj.weight is float8 but the checkpoint has no .*weight_scale"):
        _engine(tmp_path / "noscale", engine_cache)
    _rewrite(path, tmp_path / "badblock", dict(FP8_BLOCK, weight_block_size=[16, 16]), _blocks)
    with pytest.raises(ValueError, match="do not tile.*16 x 16 blocks.*weight_block_size is wrong"):
        _engine(tmp_path / "badblock", engine_cache)
    with pytest.raises(ValueError, match="already fp8-quantized, so --quant awq contradicts it: leave --quant out"):
        _engine(tmp_path / "noscale", engine_cache, quant="awq")
    int8 = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "format": "int-quantized", "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}
    refused = [(int8, "group 'group_0' .*int.* is not supported; supported: quant_method 'fp8'"),
               ({"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8, "type": "float"}},
                "without weight groups \\(kv_cache_scheme only\\?\\)"),
               (dict(FP8_TENSOR, fmt="e5m2"), "'e5m2' is not supported"),
               ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported; supported: awq .* and fp8")]
    for qc, message in refused:
        with pytest.raises(ValueError, match=message):
            checkpoint_quant({"quantization_config": qc})
        assert "\n" not in str(pytest.raises(ValueError, checkpoint_quant, {"quantization_config": qc}).value)
    assert fp8_ckpt.fp8_config({}) == {}


def test_fp8_is_refused_below_compute_capability_8_9(tiny_models, engine_cache, monkeypatch):
    from cluster.executor import resolve_model

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    message = ("FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is 8.0: use --quant awq or no "
               "--quant")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fp8.check_device(torch.device("cuda", 0))
    path, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="compute capability >= 8.9"):  # before converting anything
        resolve_model(str(path), EngineConfig(cache_dir=engine_cache, device="cuda", quant="fp8"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    fp8.check_device(torch.device("cuda", 0))


def test_cli_lite_fp8_and_serve_flag(tiny_models, tmp_path, capsys):
    from cluster.cli import build_parser, main
    from cluster.cli_args import engine_config_from_args

    path, _ = tiny_models("llama")
    assert main(["lite", "fp8", str(path), "--work-dir", str(tmp_path / "q")]) == 0
    assert "wrote FP8 checkpoint (14 linears in e4m3" in capsys.readouterr().out
    assert checkpoint_quant(json.loads((tmp_path / "q" / "config.json").read_text()))["method"] == "fp8"
    assert main(["lite", "fp8", str(tmp_path / "q"), "--work-dir", str(tmp_path / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", str(path), "--quant", "fp8"])
    assert engine_config_from_args(args).quant == "fp8"
