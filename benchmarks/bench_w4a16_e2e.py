"""End to end, W4A16 and FP8 beside bf16: the engine's decode speed with 4-bit weights in the engine's own layout
and with e4m3 weights (a scale per output channel, activations per token on the _scaled_mm path) (issue 19).

One process, no checkpoint, no Ray: random Llama-3-8B-shape weights (bench_engine's `random_hf_model`), mapped by
the converter's `build_shards` to a bf16 shard. First the FP8 kernels alone at the 8B layer shapes (fp8_parts.py:
`ok` / `FAIL` against the dequantized reference, then bf16 and FP8 times at 1 to 4096 rows). Then:

1. the bf16 engine on that shard: warm-up, decode-1, steady decode steps at batch 1 and 64, and 64 x 512-token
   prompts x 256 new tokens (prefill included);
2. every decoder linear rounded to 4 bits (`int4.quantize`, group 128, on the device) into a second shard in the
   engine's 4-bit format (`<linear>.qweight` packed by `int4.pack`, `.zeros`, `.scales` in bf16; embeddings, norms
   and the LM head shared with the bf16 shard); the bf16 shard's linears are overwritten in place by their
   dequantized values, so the bf16 engine (whose parameters they are) becomes the reference "dequantized bf16"
   engine: greedy tokens of a few short prompts on it;
3. the FP8 shard (fp8_parts.fp8_shard, from the original bf16 weights, taken before step 2) likewise: the bf16
   engine's linears overwritten by its dequantized values, the same greedy prompts;
4. the bf16 engine freed, the W4A16 engine built on the 4-bit shard (its kernels tune on first use, during the
   engine's start and warm-up); the same greedy prompts (agreement with the dequantized engine: with random
   weights the original bf16 weights are not the reference), then the same cases as 1;
5. the W4A16 engine freed, the FP8 engine on the FP8 shard: agreement with its dequantized engine, the same cases.

Each engine's cases also time a prefill of the offline case's prompts (1 new token): TFLOP/s of its linears.

A decode step's floor is (bytes of every weight it reads: everything but the embedding table, + the KV it reads) /
--tbps (4.1 TB/s by default, about what `sum` reads on the H200; the run's own probe is recorded beside it).

    python3 benchmarks/bench_w4a16_e2e.py [--shape llama3-8b] [--out DIR]
    python3 benchmarks/bench_w4a16_e2e.py --shape tiny     # a check of this script, on the CPU (or GPU) in seconds

At the tiny shape the 4-bit shard is also checked against the converter's own path (AutoAWQ GEMM tensors from
`int4.to_awq` through `build_shards`): identical q values and zeros, scales within fp16 rounding; and the FP8 shard
against a `cluster lite fp8`-format checkpoint through `build_shards`: identical bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import time
from pathlib import Path

import torch

import fp8_parts
from bench_engine import SHAPES, _per_second, rand_prompts, random_hf_model, steady_step_ms, timed

from cluster.quant import int4

GROUP = 128
AWQ_HF = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")


def sizes(quick: bool) -> dict:
    if quick:  # the CPU smoke run
        return dict(p1=16, new1=8, n64=4, p64=32, new64=8, steady=5, check_n=3, check_new=8)
    return dict(p1=128, new1=256, n64=64, p64=512, new64=256, steady=50, check_n=8, check_new=32)


def engine_from_shard(cfg, shard: dict[str, torch.Tensor], device: str, **engine_kw):
    """The engine on one rank's tensors as they are (the tail of bench_engine.engine_from_hf, without the mapping):
    load_state_dict(assign=True) makes the shard's tensors the model's parameters."""
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine
    from cluster.executor import single_rank

    ec = EngineConfig(**engine_kw, device=device)
    runner = single_rank(cfg, shard, ec, torch.device(device), ec.session_len or cfg.max_position_embeddings)
    return LLMEngine(runner=runner, tokenizer=None, engine_config=ec)


def random_shard(shape: str, dtype: torch.dtype, device: str) -> tuple[dict, dict, object, dict]:
    """A random model of `shape` as one rank's engine tensors on `device`: (its HF config dict, its HF state dict,
    the engine config, the bf16 shard). Some shard tensors are views of the state's."""
    from cluster.convert.hf import build_shards, engine_config

    hf_model = random_hf_model(shape, dtype, 8192, device=device)
    hf = hf_model.config.to_dict()
    state = hf_model.state_dict()

    def get(name: str) -> torch.Tensor:
        return state[name]

    get.names = set(state)
    cfg = engine_config(hf, "bfloat16", 1, "random")
    shard = {k: (v if k == "rotary.inv_freq" else v.contiguous()).to(device)
             for k, v in build_shards(get, hf, cfg, 1)[0].items()}
    return hf, state, cfg, shard


def quantize_shard(shard: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """bf16 shard -> the engine's 4-bit shard (every decoder linear; the rest shared, not copied). Each linear of
    `shard` is overwritten in place by its dequantized value, in the dtype, from the same rounded zeros and scales
    the 4-bit shard holds: the two then compute the same function up to the kernels' rounding."""
    w4: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in shard.items():
            if not LINEAR.fullmatch(name):
                w4[name] = t
                continue
            base = name[: -len(".weight")]
            q, z, s = int4.quantize(t, group)
            z, s = z.to(t.dtype), s.to(t.dtype)
            w4[base + ".qweight"], w4[base + ".zeros"], w4[base + ".scales"] = int4.pack(q), z, s
            t.copy_(int4.dequantize(q, z, s, t.dtype))
            del q
    return w4


def check_converter(hf_q: dict, hf_state: dict[str, torch.Tensor], w4: dict[str, torch.Tensor], dtype) -> dict:
    """The same rounding as AutoAWQ GEMM tensors, through the converter (AWQReader, merge_shards): the shards agree."""
    from cluster.convert.hf import build_shards, engine_config

    state = {}
    for name, t in hf_state.items():
        if re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight", name):
            base = name[: -len(".weight")]
            parts = int4.to_awq(*(x.cpu() for x in int4.quantize(t, GROUP)))
            state[base + ".qweight"], state[base + ".qzeros"], state[base + ".scales"] = parts
        else:
            state[name] = t.cpu()

    def get(name: str) -> torch.Tensor:
        return state[name]

    get.names = set(state)
    ref = build_shards(get, hf_q, engine_config(hf_q, str(dtype).split(".")[-1], 1, "random"), 1)[0]
    assert set(ref) == set(w4), sorted(set(ref) ^ set(w4))
    worst = 0.0
    for k, v in w4.items():
        r = ref[k].to(v.device)
        if k.endswith(".scales"):
            worst = max(worst, ((r.float() - v.float()).abs() / v.float().abs()).max().item())
        elif k.endswith(".qweight") or k.endswith(".zeros"):
            assert torch.equal(r.to(v.dtype), v), k
    assert worst < 1e-2, worst  # fp16 (AutoAWQ's scales) then the dtype, against the dtype at once
    return {"tensors": len(w4), "qweight_zeros_identical": True, "scales_max_rel_diff": worst}


def greedy(eng, prompts: list[list[int]], new: int) -> list[list[int]]:
    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in eng.generate(prompts, gen)]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences, and each one's common prefix (a random model's near-tied logits can flip a token on
    rounding-level differences; everything after a flip differs)."""
    prefix = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {"identical": sum(x == y for x, y in zip(a, b)), "of": len(a), "common_prefix": prefix,
            "tokens": len(a[0]) if a else 0}


def measure(eng, sz: dict, vocab: int, rng: random.Random, bw: float, weight_bytes: int, linear_params: int) -> dict:
    """Warm-up (every step shape and kernel bucket the cases meet), then the cases; tok/s, ms and floors; prefill
    TFLOP/s counts the decoder linears' 2 x params a token (attention's own FLOPs left out)."""
    from cluster.config import GenerationConfig

    runner = eng.runner
    kv_tok = runner.block_bytes / runner.block_size

    def floor_s(batch: int, ctx: float) -> float:
        return (weight_bytes + batch * ctx * kv_tok) / bw

    def run(prompts, new):
        gen = GenerationConfig(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        return timed(lambda: eng.generate(prompts, gen))[0]

    p1, new1, n64, p64, new64 = (sz[k] for k in ("p1", "new1", "n64", "p64", "new64"))
    t0 = time.perf_counter()
    run(rand_prompts(1, p1, vocab, rng), 16)
    run(rand_prompts(n64, p64, vocab, rng), 16)  # the offline case's prefill steps, so their buckets are tuned
    r = {"warmup_s": time.perf_counter() - t0, "kv_bytes_per_token": kv_tok, "kv_blocks": runner.num_blocks}
    t = run(rand_prompts(1, p1, vocab, rng), new1)
    r["decode-1"] = {"tok_s": new1 / t, "floor_tok_s": 1 / floor_s(1, p1 + new1 / 2)}
    print(f"  decode-1 {new1 / t:.1f} tok/s (floor {r['decode-1']['floor_tok_s']:.1f})", flush=True)
    for batch, plen in ((1, p1), (n64, p64)):
        ms = steady_step_ms(eng, rand_prompts(batch, plen, vocab, rng), sz["steady"])
        fl = floor_s(batch, plen + 5 + sz["steady"] / 2) * 1e3  # context over the timed steps
        r[f"step-{batch}"] = {"ms": ms, "tok_s": batch / ms * 1e3, "floor_ms": fl, "floor_tok_s": batch / fl * 1e3}
        print(f"  steady step at batch {batch}: {ms:.3f} ms (floor {fl:.3f} ms)", flush=True)
    t = run(rand_prompts(n64, p64, vocab, rng), new64)
    r["offline"] = {"tok_s": n64 * new64 / t, "seconds": t, "floor_tok_s": n64 / floor_s(n64, p64 + new64 / 2)}
    print(f"  {n64} x {p64} prompt, {new64} new: {n64 * new64 / t:.1f} tok/s in {t:.2f} s", flush=True)
    t = run(rand_prompts(n64, p64, vocab, rng), 1)
    r["prefill"] = {"tok_s": n64 * p64 / t, "tflops": 2 * linear_params * n64 * p64 / t / 1e12, "seconds": t}
    print(f"  prefill {n64} x {p64}: {n64 * p64 / t:.0f} tok/s, {r['prefill']['tflops']:.1f} TFLOP/s (linears)",
          flush=True)
    return r


def free(*_) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tbps", type=float, default=4.1, help="read bandwidth of the floors, TB/s")
    ap.add_argument("--quick", action="store_true", help="small cases (default at --shape tiny)")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.5)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if not cuda:  # bench_engine's timers synchronize the GPU; on a CPU-only machine there is none
        torch.cuda.synchronize = lambda *a, **k: None
    sz = sizes(args.quick or args.shape == "tiny")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_w4a16_e2e.json"
    import triton

    from cluster.convert.hf import engine_config

    res: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "torch": torch.__version__, "triton": triton.__version__, "sizes": sz, "group": GROUP,
                 "tbps_floor": args.tbps}
    save = lambda: path.write_text(json.dumps(res, indent=2, default=str))  # noqa: E731 - after every phase
    bw = args.tbps * 1e12
    if cuda:
        buf = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB, random (not zeros)
        res["read_probe_tbps"] = _per_second(lambda: buf.sum(), buf.numel() * 2, reps=20) / 1e12
        del buf
        free()
        print(f"read probe (sum over 2 GiB) {res['read_probe_tbps']:.2f} TB/s; floors at {args.tbps} TB/s",
              flush=True)
    dtype = torch.bfloat16
    engine_kw = dict(session_len=4096, max_batch_size=64, max_prefill_token_num=8192 if cuda else 256,
                     cache_max_entry_count=args.cache_max_entry_count)
    vocab = SHAPES[args.shape]["vocab_size"]
    res["fp8_kernels"] = fp8_parts.kernels("tiny" if args.shape == "tiny" else "llama3-8b", args.tbps)
    save()
    free()

    t0 = time.perf_counter()
    torch.manual_seed(1)
    hf, hf_state, cfg, shard = random_shard(args.shape, dtype, args.device)
    # the shard's o_proj and down_proj are views of the model's tensors, which quantize_shard overwrites
    hf_state = {k: v.clone() for k, v in hf_state.items()} if args.shape == "tiny" else None
    free()
    res["build_s"] = time.perf_counter() - t0

    def step_bytes(sh: dict[str, torch.Tensor]) -> int:
        return sum(v.numel() * v.element_size() for k, v in sh.items() if k not in ("embed_tokens.weight",
                                                                                  "rotary.inv_freq"))

    bytes_bf16 = step_bytes(shard)
    linear_params = sum(v.numel() for k, v in shard.items() if LINEAR.fullmatch(k))
    rng = random.Random(1)
    t0 = time.perf_counter()
    eng = engine_from_shard(cfg, shard, args.device, **engine_kw)
    res["bf16"] = {"engine_start_s": time.perf_counter() - t0, "step_weight_bytes": bytes_bf16}
    print(f"bf16 engine up in {res['bf16']['engine_start_s']:.1f} s; a step reads {bytes_bf16 / 1e9:.2f} GB of "
          "weights", flush=True)
    check_prompts = rand_prompts(sz["check_n"], (16, 64) if cuda else (5, 30), vocab, random.Random(7))
    orig_tokens = greedy(eng, check_prompts, sz["check_new"])
    res["bf16"].update(measure(eng, sz, vocab, rng, bw, bytes_bf16, linear_params))
    save()
    f8 = fp8_parts.fp8_shard(shard)  # from the original weights, before quantize_shard overwrites them

    t0 = time.perf_counter()
    w4 = quantize_shard(shard, GROUP)  # and the bf16 engine's linears now hold the dequantized weights
    if cuda:
        torch.cuda.synchronize()
    res["quantize_s"] = time.perf_counter() - t0
    hf_q = dict(hf, quantization_config=AWQ_HF)
    if args.shape == "tiny":
        res["converter_check"] = check_converter(hf_q, hf_state, w4, dtype)
        print("converter check:", res["converter_check"], flush=True)
    eng.scheduler.bm.enable_prefix_caching = False  # the prompts' cached K/V are of the original weights
    deq_tokens = greedy(eng, check_prompts, sz["check_new"])
    res["agreement_bf16_vs_dequantized"] = agreement(orig_tokens, deq_tokens)
    fp8_parts.load_dequantized(shard, f8)
    deq8_tokens = greedy(eng, check_prompts, sz["check_new"])
    res["agreement_bf16_vs_fp8_dequantized"] = agreement(orig_tokens, deq8_tokens)
    if args.shape == "tiny":
        res["fp8_converter_check"] = fp8_parts.check_converter(hf, hf_state, f8)
        print("fp8 converter check:", res["fp8_converter_check"], flush=True)
    del eng, shard
    free()
    if cuda:
        res["allocated_after_free_gb"] = torch.cuda.memory_allocated() / 1e9
    bytes_w4 = step_bytes(w4)
    print(f"quantized in {res['quantize_s']:.1f} s; a W4A16 step reads {bytes_w4 / 1e9:.2f} GB of weights",
          flush=True)

    cfg_q = engine_config(hf_q, "bfloat16", 1, "random")
    t0 = time.perf_counter()
    eng = engine_from_shard(cfg_q, w4, args.device, **engine_kw)
    res["w4a16"] = {"engine_start_s": time.perf_counter() - t0, "step_weight_bytes": bytes_w4}
    print(f"W4A16 engine up in {res['w4a16']['engine_start_s']:.1f} s (kernel tuning included)", flush=True)
    w4_tokens = greedy(eng, check_prompts, sz["check_new"])
    res["agreement_w4a16_vs_dequantized"] = agreement(w4_tokens, deq_tokens)
    print("greedy agreement, W4A16 vs the dequantized bf16 engine:", res["agreement_w4a16_vs_dequantized"],
          "| original bf16 vs dequantized:", res["agreement_bf16_vs_dequantized"], flush=True)
    save()
    res["w4a16"].update(measure(eng, sz, vocab, random.Random(1), bw, bytes_w4, linear_params))
    if cuda:
        from cluster.kernels import w4a16

        res["w4a16"]["tuned_configs"] = w4a16.chosen_configs()
    save()
    del eng, w4
    free()

    from cluster.quant.fp8_export import quantization_config

    bytes_f8 = step_bytes(f8)
    cfg_8 = engine_config(dict(hf, quantization_config=quantization_config()), "bfloat16", 1, "random")
    t0 = time.perf_counter()
    eng = engine_from_shard(cfg_8, f8, args.device, **engine_kw)
    res["fp8"] = {"engine_start_s": time.perf_counter() - t0, "step_weight_bytes": bytes_f8}
    print(f"FP8 engine up in {res['fp8']['engine_start_s']:.1f} s (kernel tuning included); a step reads "
          f"{bytes_f8 / 1e9:.2f} GB of weights", flush=True)
    res["agreement_fp8_vs_dequantized"] = agreement(greedy(eng, check_prompts, sz["check_new"]), deq8_tokens)
    print("greedy agreement, FP8 vs the dequantized bf16 engine:", res["agreement_fp8_vs_dequantized"], flush=True)
    save()
    res["fp8"].update(measure(eng, sz, vocab, random.Random(1), bw, bytes_f8, linear_params))
    if cuda:
        from cluster.kernels import fp8 as kfp8

        res["fp8"]["tuned_configs"] = kfp8.chosen_configs()
    save()

    print_table(res, sz, args.tbps)


def print_table(res: dict, sz: dict, tbps: float) -> None:
    """bf16, W4A16 and FP8 side by side, each against bf16 and against its own bandwidth floor."""
    names = ("bf16", "w4a16", "fp8")
    rows = [(f"decode-1 ({sz['p1']} prompt, {sz['new1']} new), tok/s", "decode-1"),
            ("decode-1 steady step, tok/s", "step-1"),
            (f"decode-{sz['n64']} steady step, tok/s", f"step-{sz['n64']}"),
            (f"{sz['n64']} x {sz['p64']} prompt, {sz['new64']} new, tok/s", "offline")]
    gb = " / ".join(f"{res[n]['step_weight_bytes'] / 1e9:.2f}" for n in names)
    print(f"\nfloors at {tbps} TB/s; a step reads {gb} GB (bf16 / W4A16 / FP8) of weights + KV")
    print(f"{'case':<40} {'bf16':>9} {'W4A16':>9} {'FP8':>9} {'W4/bf16':>8} {'FP8/bf16':>9} {'bf16/fl':>8} "
          f"{'W4/fl':>6} {'FP8/fl':>7}")
    for label, key in rows:
        x, y, z = (res[n][key] for n in names)
        fl = [v["tok_s"] / v["floor_tok_s"] for v in (x, y, z)]
        print(f"{label:<40} {x['tok_s']:9.1f} {y['tok_s']:9.1f} {z['tok_s']:9.1f} {y['tok_s'] / x['tok_s']:8.2f} "
              f"{z['tok_s'] / x['tok_s']:9.2f} {fl[0]:8.2f} {fl[1]:6.2f} {fl[2]:7.2f}")
    x, y, z = (res[n]["prefill"]["tflops"] for n in names)
    print(f"{'prefill, TFLOP/s of the linears':<40} {x:9.1f} {y:9.1f} {z:9.1f} {y / x:8.2f} {z / x:9.2f}")
    for n in (1, sz["n64"]):
        print(f"step-{n}: " + ", ".join(f"{name} {res[name][f'step-{n}']['ms']:.3f} ms (floor "
                                         f"{res[name][f'step-{n}']['floor_ms']:.3f})" for name in names))
    print("agreement W4A16 vs dequantized:", res["agreement_w4a16_vs_dequantized"])
    print("agreement FP8 vs dequantized:", res["agreement_fp8_vs_dequantized"])
    k = res.get("fp8_kernels", {})
    if k.get("checks"):
        print(f"fp8 kernel checks: {sum(c['ok'] for c in k['checks'])} / {len(k['checks'])} ok")


if __name__ == "__main__":
    main()
