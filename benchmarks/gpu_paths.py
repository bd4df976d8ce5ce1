#!/usr/bin/env python3
"""The engine's newer paths through the GPU's kernels (Triton, CUDA graphs, overlapped steps), token for token
against transformers (or, for a quantized KV cache, against the same engine on the CPU's reference path):

    python3 benchmarks/gpu_paths.py [--device cuda] [--out DIR]

| case | what runs on the device | compared with |
|---|---|---|
| mixtral, qwen2_moe | the Triton grouped-GEMM experts (eager and in CUDA graphs) | transformers, same weights |
| awq | 4-bit weights through the W4A16 Triton matmul | transformers on the dequantized weights |
| kv8, kv4 | the quantized KV cache's store and attention kernels | our engine on the CPU (reference kernels) |
| deepseek_v2, deepseek_v3 | MLA: the latent store, prefill and decode kernels (mla.py), DeepSeek routing into the Triton experts | transformers, same weights |
| qwen3, qwen3_moe, phi3, gemma, glm, glm4, falcon7b, falcon40b, dbrx | tests/family_models.py's tiny models (q/k norms, padded head_dim, GeGLU, partial rotary, sandwich norms, LayerNorm and parallel attention, clip_qkv + experts) through the Triton kernels and CUDA graphs | transformers, same weights |
| qwen_v1, internlm, baichuan, baichuan2, baichuan13b, chatglm, deepseek_moe | the remote-code layouts (tests/family_layouts.py) converted from a folder: fused W_pack / c_attn / query_key_value, ALiBi, half-head rotary, DeepSeek-MoE v1's experts | their native twin in transformers, same weights |
| gemma2, gemma3_text | soft-capped, sliding-window (16 keys) prefill and decode attention, eager and in CUDA graphs; Gemma 3's second rope table | transformers (eager attention), same weights |

Tiny fp32 models, random weights scaled up for peakier logits, prompts of token ids; no tokenizer, Ray or
pydantic-free imports needed beyond what bench_engine.py needs. `--device cpu` runs the same comparisons on the
CPU (a check of this script). Prints a table; writes gpu_paths.json to --out."""
from __future__ import annotations

import argparse
import json
import os
import random
import traceback
from pathlib import Path

import torch

from bench_engine import engine_from_hf, rand_prompts

TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.02, tie_word_embeddings=False)
NEW = 24
ENGINE = dict(max_prefill_token_num=64, session_len=1024, max_batch_size=16)


def hf_tokens(model, prompts: list[list[int]], device: str) -> list[list[int]]:
    out = []
    for p in prompts:
        with torch.inference_mode():
            ids = model.generate(torch.tensor([p], device=device), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=[], pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def ours(eng, prompts: list[list[int]]) -> list[list[int]]:
    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in eng.generate(prompts, gen)]


def peaky(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model


GEMMA_WINDOW = 16
GEMMA = {
    "gemma2": lambda tf: tf.Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=24, sliding_window=GEMMA_WINDOW,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    "gemma3_text": lambda tf: tf.Gemma3TextConfig(
        **TINY, head_dim=32, query_pre_attn_scalar=48, sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=10.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}),
}


# tests/family_models.py's kinds that transformers implements natively (the remote-code layouts need a tokenizer
# folder to be written): their tiny test models, weights made peaky as the other cases'
FAMILIES = ("qwen3", "qwen3_moe", "phi3", "gemma", "glm", "glm4", "falcon7b", "falcon40b", "dbrx")
# the remote-code layouts (QWen v1, InternLM v1, Baichuan/Baichuan2/Baichuan-13B's ALiBi, ChatGLM2/3, DeepSeek-MoE
# v1): the native twin's weights rewritten into the family's published names (tests/family_layouts.py), converted
# from that folder as a user's checkpoint is; a word tokenizer stands in for SmolLM2's (no gguf on the GPU machine)
REMOTE = ("qwen_v1", "internlm", "baichuan", "baichuan2", "baichuan13b", "chatglm", "deepseek_moe")


def family(kind: str, device: str):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from family_models import native_model

    return peaky(native_model(kind).float().to(device).eval())


def remote(kind: str, device: str, scratch: Path):
    """(the remote-code layout's checkpoint folder, its native twin on `device`)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from family_models import _remote, native_model
    from random_checkpoint import save_word_tokenizer

    model = peaky(native_model(kind).float().eval())
    tokenizer = scratch / f"{kind}-tokenizer"
    save_word_tokenizer(tokenizer, model.config.vocab_size)
    path = _remote(kind, model, tokenizer, scratch / kind)  # may change the twin in place (ALiBi, unit LM rows)
    return path, model.to(device)


def build(kind: str, device: str):
    import transformers as tf

    if kind in FAMILIES:
        return family(kind, device)

    torch.manual_seed({"mixtral": 1, "qwen2_moe": 2, "awq": 3, "kv8": 4, "kv4": 4, "deepseek_v2": 5,
                       "deepseek_v3": 6, "gemma2": 5, "gemma3_text": 6}[kind])
    if kind in ("deepseek_v2", "deepseek_v3"):
        return deepseek(kind, device)
    kw = {}
    if kind in GEMMA:  # the prompts (5 to 200 tokens) run far past the window; eager: transformers' soft-cap path
        cfg = GEMMA[kind](tf)
        kw["attn_implementation"] = "eager"
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                shared_expert_intermediate_size=256, mlp_only_layers=[1])
    else:
        cfg = tf.LlamaConfig(**TINY)
    with torch.device(device):
        return peaky(tf.AutoModelForCausalLM.from_config(cfg, **kw).float().eval())


def deepseek(kind: str, device: str):
    """DeepSeek-V2 (q_proj, softmax + group_limited_greedy) or -V3 (q_a/q_b, sigmoid + noaux_tc with a random
    correction bias): layer 0 dense, layer 1 experts + shared experts; latent 64 + rope 16 (the decode kernel's
    powers of two)."""
    import transformers as tf

    mla = dict(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1,
               moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    base = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    if kind == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**base, **mla, q_lora_rank=None, n_shared_experts=2,
                                  topk_method="group_limited_greedy", routed_scaling_factor=2.0)
    else:
        cfg = tf.DeepseekV3Config(**base, **mla, q_lora_rank=64, n_shared_experts=1, routed_scaling_factor=2.5)
    with torch.device(device):
        model = peaky(tf.AutoModelForCausalLM.from_config(cfg).float().eval())
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn_like(bias) * 0.1)
    return model


def awq_state(model, prompts: list[list[int]]) -> tuple[dict, dict]:
    """AWQ-quantize `model` in place (left holding the dequantized weights) and return the checkpoint's tensors
    and config, as `cluster lite auto_awq` would write them."""
    from cluster.quant import awq, int4

    ids = torch.tensor([p[:32] for p in prompts if len(p) >= 32][:4])
    quantized = awq.quantize_model(model, ids, group_size=32)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, (q, zeros, scales) in quantized.items():
            qw, qz, s16 = int4.to_awq(q, zeros, scales)
            del state[name + ".weight"]
            state.update({name + ".qweight": qw, name + ".qzeros": qz, name + ".scales": s16})
            model.get_submodule(name).weight.copy_(int4.dequantize(q, zeros, s16.t().float()))
    hf = model.config.to_dict()
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                 "version": "gemm"}
    return state, hf


def run_case(kind: str, device: str, prompts: list[list[int]]) -> dict:
    if kind in REMOTE:
        import tempfile

        from cluster.config import EngineConfig
        from cluster.engine.engine import LLMEngine

        scratch = Path(tempfile.mkdtemp(prefix="gpu_paths-"))
        path, model = remote(kind, device, scratch)
        eng = LLMEngine(str(path), EngineConfig(cache_dir=str(scratch / "cache"), device=device, dtype="float32",
                                                **{**ENGINE, "session_len": 256}))  # the tiny configs' context
        want = hf_tokens(model, prompts, device)
        return _compare(eng, prompts, want)
    model = build(kind, device)
    if kind in ("kv8", "kv4"):
        bits = int(kind[2:])
        eng = engine_from_hf(model, "float32", device, quant_policy=bits, **ENGINE)
        want = ours(engine_from_hf(model.cpu(), "float32", "cpu", quant_policy=bits, **ENGINE), prompts)
    else:
        state, hf = awq_state(model, prompts) if kind == "awq" else (None, None)
        eng = engine_from_hf(model, "float32", device, state=state, hf=hf, **ENGINE)
        want = hf_tokens(model, prompts, device)
    return _compare(eng, prompts, want)


def _compare(eng, prompts: list[list[int]], want: list[list[int]]) -> dict:
    got = ours(eng, prompts)
    first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), NEW) for g, w in zip(got, want)]
    return {"identical": sum(g == w for g, w in zip(got, want)), "of": len(prompts), "first_difference": first,
            "graphs": sorted(getattr(eng.runner, "graphs", {})), "steps_ahead": eng.stats_dict()["steps_ahead"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cases", nargs="*", default=["mixtral", "qwen2_moe", "awq", "kv8", "kv4", "deepseek_v2",
                                                   "deepseek_v3", "gemma2", "gemma3_text", *FAMILIES, *REMOTE])
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = rand_prompts(6, (5, 200), TINY["vocab_size"], rng)
    prompts.append(prompts[0][:100] + prompts[1][:20])  # a prefix-cache hit
    results = {}
    for kind in args.cases:
        try:
            results[kind] = run_case(kind, args.device, prompts)
        except Exception as e:  # noqa: BLE001 - one failing case still lets the others report
            traceback.print_exc()
            results[kind] = {"error": repr(e)[:300]}
        print(kind, results[kind], flush=True)
    print("\n| case | identical | first differing token per prompt | graphs captured |\n|---|---:|---|---|")
    for kind, r in results.items():
        if "error" in r:
            print(f"| {kind} | ERROR | {r['error'][:80]} | |")
        else:
            print(f"| {kind} | {r['identical']}/{r['of']} | {r['first_difference']} | {r['graphs'][:4]}... |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_paths.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
