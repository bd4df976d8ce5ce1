#!/usr/bin/env python3
"""What quantized weights cost in quality: held-out perplexity of a model in full precision, rounded to 4 bits
(round to nearest) and with AWQ's activation-aware scales, as `cluster lite auto_awq` makes them, and in FP8 (e4m3,
a scale per output channel, as `cluster lite fp8` and `--quant fp8` make them): weights alone (what the decode GEMV
computes, W8A16) and with every linear's input also rounded to e4m3 per token (W8A8, the torch._scaled_mm path of
prefill and large batches).

    python benchmarks/quant_quality.py [MODEL] [--group 64] [--json OUT]

MODEL: an HF checkpoint or .gguf (default: the embedded SmolLM2-135M-Instruct). Runs on the CPU in fp32. The
held-out text below is not in the calibration text (cluster/quant/calibration.txt)."""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

HELD_OUT = """The lighthouse keeper climbed the spiral stairs twice each night, once to light the lamp and once, just before dawn, to put it out. In winter the wind found every crack in the old stone tower, and the glass of the lantern room rattled in its frame. He kept a log of every ship that passed, its name if he could read it, and the direction it was heading.
Sorting algorithms differ in how they trade time for memory. Merge sort always takes time proportional to n log n but needs extra space for the merged output, while heapsort works in place with the same bound. Quicksort is usually fastest in practice, because its inner loop is simple and it uses the cache well, although a poor choice of pivot can make it quadratic.
The human heart beats about one hundred thousand times a day, pumping blood through a network of vessels long enough to circle the Earth more than twice. Its four chambers work in two pairs: the right side sends blood to the lungs to collect oxygen, and the left side pushes the oxygen-rich blood out to the rest of the body.
A budget is a plan for money. Start by writing down what comes in each month and what goes out, including small purchases that are easy to forget. Then decide which costs are fixed, such as rent, and which can change, such as eating out, and set a limit for each category before the month begins."""


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def fp8_model(base, activations: bool):
    """A copy of `base` with every decoder linear's weight through e4m3 per channel; activations: each linear's
    input through e4m3 per token as well (forward pre-hooks)."""
    from cluster.quant import fp8

    model = copy.deepcopy(base)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(fp8.dequantize(*fp8.quantize_weight(m.weight)))
            if activations:
                def hook(_, args):
                    x = args[0]
                    q, s = fp8.quantize_tokens(x.reshape(-1, x.shape[-1]))
                    return ((q.float() * s).reshape(x.shape).to(x.dtype),)

                m.register_forward_pre_hook(hook)
    return model, len(linears)


def engine_perplexity(eng, ids: list[int]) -> float:
    """Held-out perplexity through our engine: one prefill of the text whose attention reads the cache it has just
    written (quantized under quant_policy), with logits at every position."""
    import torch.nn.functional as F

    from cluster.engine.model_runner import StepInput

    runner, n = eng.runner, len(ids)
    bs = runner.block_size
    blocks = -(-n // bs)
    assert blocks <= runner.num_blocks, "the held-out text must fit the cache"
    step = StepInput(
        input_ids=torch.tensor(ids), positions=torch.arange(n), slot_mapping=torch.arange(n),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], context_lens=torch.tensor([n], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), logit_indices=torch.arange(n - 1), max_context_len=n,
        decode_only=False)
    logits = runner.execute(step)
    return math.exp(F.cross_entropy(logits, torch.tensor(ids[1:])).item())


def kv_rows(model: str | None, held: torch.Tensor) -> list[dict]:
    """Each KV cache policy's held-out perplexity through our engine (fp32 weights on the CPU): the first row is the
    engine with the full cache, so the others' change is the cache's alone."""
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine

    rows = []
    for policy, name in ((0, "our engine, fp32 KV cache"), (8, "KV int8 (quant_policy 8)"),
                         ("fp8", "KV fp8 e4m3 (quant_policy 'fp8')"), (4, "KV 4-bit (quant_policy 4)")):
        t0 = time.time()
        eng = LLMEngine(model, EngineConfig(device="cpu", dtype="float32", quant_policy=policy,
                                            enable_prefix_caching=False))
        rows.append({"weights": name, "ppl": engine_perplexity(eng, held[0].tolist()), "seconds": time.time() - t0})
    return rows


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.convert.source import resolve_source
    from cluster.quant import awq, int4

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["int4", "fp8", "kv"], default=None,
                    help="just these rows (AWQ's search is minutes); kv: the KV cache policies through our engine")
    args = ap.parse_args()
    src = resolve_source(args.model)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    base = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(src.path), **kw)
    held = tok(HELD_OUT, return_tensors="pt").input_ids
    calib = awq.calibration_ids(tok, awq.default_calibration_text(), 64, 128)
    rows = [{"weights": "fp32", "ppl": perplexity(base, held), "seconds": 0.0}]
    if args.only in (None, "kv"):
        rows += kv_rows(args.model, held)
    for name, search in (("int4 round-to-nearest", False), ("int4 AWQ", True)) if args.only in (None, "int4") else ():
        model = copy.deepcopy(base)
        t0 = time.time()
        quantized = awq.quantize_model(model, calib, args.group, search=search, progress=True)
        seconds = time.time() - t0
        with torch.no_grad():
            for mod, (q, zeros, scales) in quantized.items():  # through the checkpoint's fp16 scales
                model.get_submodule(mod).weight.copy_(int4.dequantize(q, zeros, scales.half().float()))
        rows.append({"weights": name, "ppl": perplexity(model, held), "seconds": seconds})
    fp8_rows = (("fp8 e4m3 weights, per channel (W8A16)", False), ("fp8 W8A8 (+ activations per token)", True))
    for name, acts in fp8_rows if args.only in (None, "fp8") else ():
        t0 = time.time()
        model, _ = fp8_model(base, acts)
        rows.append({"weights": name, "ppl": perplexity(model, held), "seconds": time.time() - t0})
    print(f"\n{src.gguf_file or src.path.name}: held-out perplexity ({held.shape[1]} tokens), group {args.group}, "
          f"calibration {calib.shape[0]} x {calib.shape[1]} tokens")
    print("| weights | perplexity | vs fp32 | quantize time |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['weights']} | {r['ppl']:.2f} | {r['ppl'] / rows[0]['ppl'] - 1:+.1%} | {r['seconds']:.0f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": str(src.gguf_file or src.path), "group": args.group, "held_out_tokens": held.shape[1],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
