"""Our engine against Hugging Face transformers on the same model, prompts and settings (greedy, fixed output
length), on whatever device is here: batch 1, and 16 prompts of mixed lengths (transformers one at a time, the
seed tutorial's loop, and as one padded batch). Prints a table; --json writes the numbers.

    python benchmarks/bench_vs_transformers.py [MODEL] [--new-tokens 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from tqdm import tqdm

QUESTIONS = [
    "Hi, please introduce yourself.",
    "Shanghai is",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in simple terms how a refrigerator keeps food cold, and why it needs electricity to do so.",
    "List three fruits.",
    "Tell me a short story about a robot who learns to paint, with a happy ending and a lesson about patience.",
    "What is 17 times 3?",
    "Give me two tips for learning a new language quickly while working a full-time job.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer like a physics teacher talking to curious ten-year-old students in a classroom.",
    "Name a famous painter.",
    "Describe the water cycle in four sentences.",
    "What does a CPU do?",
    "Summarize the plot of Romeo and Juliet for someone who has never read Shakespeare, in a few sentences.",
    "Say hello.",
]


def hf_generate(model, tok, prompts: list[list[int]], new_tokens: int, eos: list[int]) -> list[list[int]]:
    """One padded batch through transformers `generate` (left padding), greedy; each row cut after its EOS."""
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.max_new_tokens, gc.eos_token_id = False, new_tokens, eos
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[gc.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=gc)
    rows = []
    for row in out.cpu():
        ids = row[width:].tolist()
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(ids[:cut])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fixed-length", action="store_true",
                    help="ignore EOS: every answer exactly --new-tokens long (default: stop at EOS, as users run it)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from cluster.config import EngineConfig, GenerationConfig
    from cluster.convert.source import resolve_source
    from cluster.engine.engine import LLMEngine

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    engine = LLMEngine(args.model, EngineConfig(device=args.device, dtype=dtype))
    tok = engine.tokenizer
    prompts = [tok.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    src = resolve_source(args.model)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(src.path, dtype=getattr(torch, dtype), **kw).to(args.device).eval()
    gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.fixed_length)
    eos = [] if args.fixed_length else sorted(engine.eos_ids)

    def words(ids_list):
        return sum(len(tok.decode(ids).split()) for ids in ids_list)

    def ours(batch):
        t = time.perf_counter()
        out = engine.generate(batch, gen)
        return time.perf_counter() - t, [r.token_ids for r in out]

    def count(ids_list):
        return sum(len(x) for x in ids_list)

    ours([prompts[0]])  # warm-up both
    hf_generate(hf, tok.hf, [prompts[0]], 4, eos)
    rows = []
    one = [prompts[6]]  # a prompt with a long answer
    t, o1 = ours(one)
    rows.append(("batch 1", "ours", t, count(o1), words(o1)))
    t0 = time.perf_counter()
    h1 = hf_generate(hf, tok.hf, one, args.new_tokens, eos)
    rows.append(("batch 1", "transformers", time.perf_counter() - t0, count(h1), words(h1)))
    t, o16 = ours(prompts)
    rows.append(("16 mixed", "ours (continuous batching)", t, count(o16), words(o16)))
    t0 = time.perf_counter()
    h_seq = [hf_generate(hf, tok.hf, [p], args.new_tokens, eos)[0] for p in tqdm(prompts, desc="transformers one at a time")]
    rows.append(("16 mixed", "transformers, one at a time", time.perf_counter() - t0, count(h_seq), words(h_seq)))
    t0 = time.perf_counter()
    h_pad = hf_generate(hf, tok.hf, prompts, args.new_tokens, eos)
    rows.append(("16 mixed", "transformers, padded batch", time.perf_counter() - t0, count(h_pad), words(h_pad)))

    same = sum(a == b for a, b in zip(o16, h_seq))
    print(f"\n{'case':<10} {'engine':<28} {'seconds':>8} {'tok/s':>8} {'words/s':>8}")
    results = []
    for case, who, secs, toks, wds in rows:
        print(f"{case:<10} {who:<28} {secs:8.2f} {toks / secs:8.1f} {wds / secs:8.1f}")
        results.append({"case": case, "engine": who, "seconds": secs, "tokens": toks, "tok_per_s": toks / secs,
                        "words_per_s": wds / secs})
    by = {(r["case"], r["engine"]): r["tok_per_s"] for r in results}
    ratios = {
        "batch1_vs_transformers": by[("batch 1", "ours")] / by[("batch 1", "transformers")],
        "mixed16_vs_one_at_a_time": by[("16 mixed", "ours (continuous batching)")] / by[("16 mixed", "transformers, one at a time")],
        "mixed16_vs_padded_batch": by[("16 mixed", "ours (continuous batching)")] / by[("16 mixed", "transformers, padded batch")],
    }
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    print(f"greedy outputs identical to transformers (one at a time): {same}/16 prompts; batch 1: {o1[0] == h1[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "max_new_tokens": args.new_tokens, "fixed_length": args.fixed_length, "threads": torch.get_num_threads(), "rows": results,
                       "ratios": ratios, "identical": same}, f, indent=2)


if __name__ == "__main__":
    main()
