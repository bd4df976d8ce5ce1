"""GPU benchmark: our engine against transformers `generate` on the same random bf16 weights of a real shape.

Runs in one process without Ray (the GPU machine has none): checks the engine against transformers on a tiny
fp32 model first (Triton kernels, CUDA graphs, chunked prefill, prefix cache), measures the read and copy bandwidth
and the matmul rate, then the cases of issue 3, steady decode steps and a concurrency sweep; prints a table last and
writes JSON (+ PNG). A decode step's floor is (weight bytes + KV bytes read) / read bandwidth.

    python benchmarks/bench_engine.py [--shape llama3-8b] [--out DIR] [--quick]
    python benchmarks/bench_engine.py --shape gemma2-9b     # Gemma 2 9B: soft-capped, windowed attention, tied head

--shape deepseek-v2-lite: DeepSeek-V2-Lite's shape (15.7B parameters, 2.4B read a token besides the embedding
table; MLA with a 512 + 64 latent row a token and layer, 64 routed experts top-6 + 2 shared, layer 0 dense). Its
floor counts the weights a step reads: of each expert layer, only the experts its tokens choose (weight_bytes_read).
transformers' own DeepSeek-V2 runs the experts in a Python loop: --skip-hf saves its minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import random
import time
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=128256, rope_theta=500000.0),
    # Gemma-2-9B (google/gemma-2-9b's config.json): head_dim 256 apart from hidden / heads, every other layer
    # windowed to 4096 keys (longer than this script's contexts: the floors below read every key), caps 50 and 30
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, intermediate_size=14336, vocab_size=256000,
                      query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024),
    # deepseek-ai/DeepSeek-V2-Lite's config.json (its YaRN rope left out: random weights, short contexts)
    "deepseek-v2-lite": dict(model_type="deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                             intermediate_size=10944, vocab_size=102400, kv_lora_rank=512, q_lora_rank=None,
                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=64,
                             num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
                             first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0),
}


def _per_second(fn, amount: float, reps: int = 10) -> float:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(3):
        fn()
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return amount * reps / (ev[0].elapsed_time(ev[1]) / 1e3)


def hardware_ceilings() -> dict:
    """Measured, not datasheet: the read and copy bandwidth of 4 GiB buffers (gemv_headroom's probes) and a large
    bf16 matmul. In this process, after the tiny parity check, the read probe has given 2.61 TB/s (H100, two runs)
    where gemv_headroom's fresh process gives 3.05 and the engine's own GEMV chain reaches 3.00: the floors printed
    here are then too low, and docs/benchmarks.md gives the fractions against 3.05 as well."""
    from gemv_headroom import bandwidths

    read, bw = (tb * 1e12 for tb in bandwidths())
    torch.cuda.empty_cache()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = _per_second(lambda: a @ b, 2 * 8192 ** 3)
    a = b = None
    torch.cuda.empty_cache()
    return {"read_bytes_per_s": read, "copy_bytes_per_s": bw, "bf16_flops_per_s": flops}


@contextlib.contextmanager
def decoding(eng, prompts: list[list[int]], steps: int):
    """Inside: every prompt prefilled and decoding (5 steps in), with room for `steps` more; aborted after."""
    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=steps + 64, temperature=0.0, ignore_eos=True)
    rids = [eng.add_request(p, gen) for p in prompts]
    while eng.scheduler.waiting or any(s.num_uncomputed > 1 for s in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    try:
        yield
    finally:
        for rid in rids:
            eng.abort(rid)
        eng.step()  # reads out (and drops) a step still in flight


def steady_step_ms(eng, prompts: list[list[int]], steps: int = 50) -> float:
    """Mean time of engine.step() once every prompt is prefilled and decoding (prefill left out)."""
    with decoding(eng, prompts, steps):
        t, _ = timed(lambda: [eng.step() for _ in range(steps)])
    return t * 1e3 / steps


def random_hf_model(shape: str, dtype: torch.dtype, max_pos: int, device: str = "cuda"):
    """Random weights of a shape: a Llama unless the shape names its model_type (Gemma 2: eager attention, the one
    transformers path that soft-caps)."""
    import transformers as tf

    kw = {"tie_word_embeddings": False, **SHAPES[shape]}
    kind = kw.pop("model_type", "llama")
    cfg = tf.AutoConfig.for_model(kind, **kw, max_position_embeddings=max_pos, initializer_range=0.02)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, **({} if kind == "llama" else {"attn_implementation": "eager"}))
    return model.to(dtype).eval()


def expert_share(cfg, batch: int) -> float:
    """Of a routed-expert layer's experts, the share a decode step of `batch` tokens reads: k / E for one token;
    for more, what at least one token chooses if each token's k experts were uniformly drawn (random weights route
    close to that): 1 - (1 - k / E) ** batch."""
    e, k = getattr(cfg, "n_routed_experts", 0) or 0, getattr(cfg, "num_experts_per_tok", 0) or 0
    return 1.0 if not e else 1 - (1 - k / e) ** batch


def weight_bytes_read(hf_model, batch: int = 1) -> float:
    """Weight bytes a decode step of `batch` tokens reads: every parameter but the embedding table, routed experts
    (transformers' mlp.experts.*) at expert_share."""
    share = expert_share(hf_model.config, batch)
    total = sum(p.numel() * p.element_size() * (share if ".mlp.experts." in n else 1.0)
                for n, p in hf_model.named_parameters() if "embed_tokens" not in n)
    if hf_model.config.tie_word_embeddings:  # a head tied to the embedding (Gemma) is read whole, as the head
        emb = hf_model.get_input_embeddings().weight
        total += emb.numel() * emb.element_size()
    return total


def attention_flops(cfg, tokens: int) -> float:
    """Causal attention's multiply-adds x 2 for one sequence of `tokens`, per layer summed: Llama's q.k and p.v at
    head_dim; MLA's absorbed form (what the engine runs) scores over the latent row (kv_lora_rank + rope) and sums
    the latent (kv_lora_rank)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_pair = (2 * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) if getattr(cfg, "kv_lora_rank", 0)
                else 2 * 2 * head_dim)
    return cfg.num_hidden_layers * cfg.num_attention_heads * per_pair * tokens ** 2 / 2


def engine_from_hf(hf_model, dtype: str, device: str = "cuda", state: dict | None = None, hf: dict | None = None,
                   **engine_kw):
    """Our engine on the same weights: the converter's mapping applied to the in-memory state dict (or to `state`,
    a checkpoint's tensors, with `hf` its config)."""
    from cluster.config import EngineConfig
    from cluster.convert.hf import build_shards, engine_config, in_model_dtype
    from cluster.engine.engine import LLMEngine
    from cluster.executor import single_rank

    hf = hf or hf_model.config.to_dict()
    state = state if state is not None else hf_model.state_dict()

    def get(name: str) -> torch.Tensor:
        return state[name]

    get.names = set(state)  # the converter looks some layouts up by name
    cfg = engine_config(hf, dtype, 1, "random")
    weights = in_model_dtype(build_shards(get, hf, cfg, 1)[0], getattr(torch, dtype))  # as convert_checkpoint saves
    weights = {k: (v if k == "rotary.inv_freq" else v.contiguous()).to(device) for k, v in weights.items()}
    ec = EngineConfig(**engine_kw, device=device)
    session_len = ec.session_len or cfg.max_position_embeddings
    runner = single_rank(cfg, weights, ec, torch.device(device), session_len)
    return LLMEngine(runner=runner, tokenizer=None, engine_config=ec)


def wait_for_file(path: str | None, limit_s: float = 600.0) -> float:
    """Block until `path` exists (another job sharing the GPU has finished: start up beside it, measure alone);
    returns the seconds waited."""
    t = time.perf_counter()
    while path and not Path(path).exists() and time.perf_counter() - t < limit_s:
        time.sleep(0.5)
    return time.perf_counter() - t


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    gc_ = copy.deepcopy(model.generation_config)
    gc_.do_sample, gc_.max_new_tokens, gc_.eos_token_id, gc_.pad_token_id = False, new_tokens, [], 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_)
    torch.cuda.synchronize()
    return [row[width:].tolist() for row in out.cpu()]


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def rand_prompts(n: int, length: int | tuple[int, int], vocab: int, rng: random.Random) -> list[list[int]]:
    lens = [length if isinstance(length, int) else rng.randint(*length) for _ in range(n)]
    return [[rng.randrange(1, vocab) for _ in range(L)] for L in lens]


def check_tiny(results: dict) -> None:
    """Token-exact against transformers on a tiny fp32 model through the GPU path (kernels + graphs)."""
    from cluster.config import GenerationConfig

    torch.manual_seed(0)
    hf_model = random_hf_model("tiny", torch.float32, 1024)
    with torch.no_grad():  # peakier logits: fewer near-ties
        for p in hf_model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    eng = engine_from_hf(hf_model, "float32", max_prefill_token_num=64, session_len=1024, max_batch_size=32)
    rng = random.Random(0)
    prompts = rand_prompts(6, (5, 300), 1024, rng)
    prompts.append(prompts[0][:200] + prompts[1][:50])  # shares a 200-token prefix with prompt 0: cache hit
    gen = GenerationConfig(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    ours = [r.token_ids for r in eng.generate(prompts, gen)]
    ref = [hf_generate(hf_model, [p], 32)[0] for p in prompts]
    same = sum(a == b for a, b in zip(ours, ref))
    hit = eng.stats_dict()["prefix_cache_hit_tokens"]
    results["tiny_fp32_parity"] = {"identical": same, "of": len(prompts), "prefix_hit_tokens": hit,
                                   "graphs": sorted(eng.runner.graphs)}
    print(f"tiny fp32 parity: {same}/{len(prompts)} identical, prefix hit tokens {hit}", flush=True)
    del eng, hf_model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="smaller cases (a smoke run)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode-only", action="store_true",
                    help="stop after decode-1 / decode-64 and their steady steps (a real shape's decode in one short "
                         "call); the tiny-model check is left out")
    ap.add_argument("--wait-for", default=None, help="start up, then measure only once this file exists")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.9)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cluster.config import GenerationConfig

    results: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.decode_only:
        check_tiny(results)
    ceil = hardware_ceilings()
    results["ceilings"] = ceil
    bw, mm = ceil["read_bytes_per_s"], ceil["bf16_flops_per_s"]
    print(f"read bandwidth {bw / 1e12:.2f} TB/s (the floors' bandwidth), copy {ceil['copy_bytes_per_s'] / 1e12:.2f} "
          f"TB/s (read + write), bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)

    rng = random.Random(1)
    torch.manual_seed(1)
    hf_model = random_hf_model(args.shape, torch.bfloat16, 8192)
    cfgd = SHAPES[args.shape]
    vocab = cfgd["vocab_size"]
    q = args.quick
    new1, p1 = (64, 128) if q else (256, 128)
    n64, p64, new64 = (64, 512, 64) if q else (64, 512, 256)
    off_n = 64 if q else 512
    off_rng = (100, 300) if q else (100, 1024)
    rows = []

    hf_res = {}
    if not args.skip_hf:
        prompts1 = rand_prompts(1, p1, vocab, rng)
        hf_generate(hf_model, prompts1, 4)
        t, _ = timed(lambda: hf_generate(hf_model, prompts1, new1))
        hf_res["decode-1"] = new1 / t
        prompts64 = rand_prompts(n64, p64, vocab, rng)
        t, _ = timed(lambda: hf_generate(hf_model, prompts64, new64))
        hf_res["decode-64"] = n64 * new64 / t
        off_slice = rand_prompts(64, off_rng, vocab, rng)
        outs = [rng.randint(*off_rng) for _ in off_slice]
        t, _ = timed(lambda: hf_generate(hf_model, off_slice, max(outs)))
        hf_res["offline"] = sum(outs) / t  # useful tokens: each request's own length
        print("transformers:", {k: round(v, 1) for k, v in hf_res.items()}, flush=True)
    results["transformers"] = hf_res

    weight_bytes = weight_bytes_read(hf_model)  # all but the embedding table (of an expert layer: one token's experts)
    step_weights = {b: weight_bytes_read(hf_model, b) for b in (1, 8, 32, 64, 128)}
    model_cfg = hf_model.config
    free_before = torch.cuda.mem_get_info()[0]
    eng = engine_from_hf(hf_model, "bfloat16", session_len=4096, max_batch_size=256, max_prefill_token_num=8192,
                         cache_max_entry_count=args.cache_max_entry_count)
    hf_model = None
    gc.collect()
    torch.cuda.empty_cache()
    runner = eng.runner
    kv_bytes = runner.num_blocks * runner.block_bytes
    allowed = runner.free_memory_for_cache * args.cache_max_entry_count
    results["kv_cache"] = {"blocks": runner.num_blocks, "bytes": kv_bytes, "allowed_bytes": allowed,
                           "ratio": kv_bytes / allowed, "free_before_engine": free_before}
    print(f"KV cache {kv_bytes / 2**30:.1f} GiB = {kv_bytes / allowed:.3f} of cache_max_entry_count x free", flush=True)
    kv_per_token = runner.block_bytes / runner.block_size

    def step_floor(batch: int, ctx: float) -> float:
        return (step_weights[batch] + batch * ctx * kv_per_token) / bw

    def run(prompts, new_tokens):
        gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return timed(lambda: eng.generate(prompts, gen))

    results["waited_s"] = wait_for_file(args.wait_for)
    run(rand_prompts(1, p1, vocab, rng), 16)  # warm-up: the eager step shapes each case meets
    run(rand_prompts(32, 512, vocab, rng), 16)
    gens_w = [GenerationConfig(max_new_tokens=o, temperature=0.0, ignore_eos=True) for o in (8, 40, 24, 16)]
    eng.generate(rand_prompts(4, (100, 1000), vocab, rng), gens_w)
    ours = {}
    t, _ = run(rand_prompts(1, p1, vocab, rng), new1)
    ours["decode-1"] = new1 / t
    fl1 = 1 / step_floor(1, p1 + new1 / 2)
    rows.append(("decode-1", ours["decode-1"], hf_res.get("decode-1"), fl1))
    print("ours decode-1", round(ours["decode-1"], 1), "floor", round(fl1, 1), "of floor",
          round(ours["decode-1"] / fl1, 3), flush=True)
    t, _ = run(rand_prompts(n64, p64, vocab, rng), new64)
    ours["decode-64"] = n64 * new64 / t
    fl64 = n64 / step_floor(n64, p64 + new64 / 2)
    rows.append(("decode-64", ours["decode-64"], hf_res.get("decode-64"), fl64))
    print("ours decode-64", round(ours["decode-64"], 1), "floor", round(fl64, 1), "of floor",
          round(ours["decode-64"] / fl64, 3), flush=True)
    for batch, plen in ((1, p1), (n64, p64)):
        ms = steady_step_ms(eng, rand_prompts(batch, plen, vocab, rng))
        ours[f"decode-{batch} steady step ms"] = ms
        fl = step_floor(batch, plen + 31) * 1e3  # context over the 50 timed steps: prompt + 6 .. prompt + 56
        rows.append((f"decode-{batch} step", batch / ms * 1e3, None, batch / fl * 1e3))
        print(f"steady decode step at batch {batch}: {ms:.2f} ms, floor {fl:.2f} ms ({fl / ms:.3f} of floor)",
              flush=True)
    if args.decode_only:
        results["ours"], results["stats"] = ours, eng.stats_dict()
        (out / "bench_engine.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"\n{'case':<16} {'ours':>10} {'floor':>10} {'of floor':>9}")
        for case, o, _, fl in rows:
            print(f"{case:<16} {o:10.1f} {fl:10.1f} {o / fl:9.2f}")
        return
    eng.overlap = False  # the same two cases with every step serial: what overlapping steps is worth
    t, _ = run(rand_prompts(1, p1, vocab, rng), new1)
    ours["decode-1, overlap off"] = new1 / t
    t, _ = run(rand_prompts(n64, p64, vocab, rng), new64)
    ours["decode-64, overlap off"] = n64 * new64 / t
    eng.overlap = True
    print("overlap off: decode-1", round(ours["decode-1, overlap off"], 1), "decode-64",
          round(ours["decode-64, overlap off"], 1), flush=True)
    off_prompts = rand_prompts(off_n, off_rng, vocab, rng)
    off_outs = [rng.randint(*off_rng) for _ in off_prompts]
    gens = [GenerationConfig(max_new_tokens=o, temperature=0.0, ignore_eos=True) for o in off_outs]
    t, _ = timed(lambda: eng.generate(off_prompts, gens))
    ours["offline"] = sum(off_outs) / t
    ours["offline_seconds"] = t
    rows.append(("offline", ours["offline"], hf_res.get("offline"), None))
    print("ours offline", round(ours["offline"], 1), "tok/s in", round(t, 1), "s", flush=True)
    pre = rand_prompts(16, 2048 if not q else 1024, vocab, rng)
    t, _ = run(pre, 1)
    toks = sum(len(p) for p in pre)
    H = cfgd["hidden_size"]
    # bf16: 2 bytes a parameter; lm_head runs for 16 rows only; an expert layer: the k experts each token runs
    layer_params = weight_bytes / 2 - vocab * H
    attn_flops = 16 * attention_flops(model_cfg, len(pre[0]))
    flops = 2 * layer_params * toks + attn_flops
    ours["prefill_tok_s"] = toks / t
    ours["prefill_tflops"] = flops / t / 1e12
    rows.append(("prefill", ours["prefill_tok_s"], None, mm / (flops / toks)))

    sweep = {}
    for c in ([1, 8, 32] if q else [1, 8, 32, 64, 128]):
        t, _ = run(rand_prompts(c, 512, vocab, rng), 128 if not q else 32)
        sweep[c] = {"ours": c * (128 if not q else 32) / t, "floor": c / step_floor(c, 512 + 64)}
        print("sweep", c, round(sweep[c]["ours"], 1), flush=True)
    results["ours"], results["sweep"], results["stats"] = ours, sweep, eng.stats_dict()
    (out / "bench_engine.json").write_text(json.dumps(results, indent=2, default=str))
    try:
        from plot_throughput import plot

        plot(results, out / "throughput_vs_concurrency.png")
    except Exception as e:  # noqa: BLE001 - the plot is a nicety
        print("no plot:", e)

    print(f"\n{'case':<16} {'ours':>10} {'transformers':>13} {'ratio':>7} {'floor':>10} {'of floor':>9}")
    for case, o, h, fl in rows:
        ratio = f"{o / h:7.1f}" if h else "      -"
        hs = f"{h:13.1f}" if h else "            -"
        fls = f"{fl:10.1f}" if fl else "         -"
        frac = f"{o / fl:9.2f}" if fl else "        -"
        print(f"{case:<16} {o:10.1f} {hs} {ratio} {fls} {frac}")
    print(f"prefill {ours['prefill_tflops']:.0f} TFLOP/s = {ours['prefill_tflops'] * 1e12 / mm:.2f} of matmul rate; "
          f"offline {off_n} requests in {ours['offline_seconds']:.1f} s; KV cache {results['kv_cache']['ratio']:.3f} of allowed")
    print("sweep:", {c: (round(v["ours"]), round(v["floor"])) for c, v in sweep.items()})


if __name__ == "__main__":
    main()
