"""Structured output's cost on the CPU with the embedded SmolLM2 (fp32): time per output token under a JSON schema
against the same decode unconstrained (issue 15's target: at most 1.1x), and grammar compilation of a 50-field
schema (target: under 100 ms, cached thereafter).

TPOT is the mean wall time of a decode step (every request gets one token per step), over the steps after the
first token, at each concurrency. Both runs decode the same number of tokens: the schema (an array of at least
256 small objects) cannot end before max_new_tokens, and the unconstrained run ignores EOS. The grammar's own
share of a step (filling the bitmask on the host, applying it to the logits) is timed apart.

    python benchmarks/bench_structured.py [--concurrency 1,8,32] [--tokens 64] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine import grammar as grammar_mod
from cluster.engine.engine import LLMEngine
from cluster.engine.grammar import GrammarKey, Grammars

LONG = {"type": "array", "minItems": 256, "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "b", "c"]}},
    "required": ["id", "tag"]}}
TYPES = [{"type": "string"}, {"type": "integer", "minimum": 0, "maximum": 10000}, {"type": "number"},
         {"type": "boolean"}, {"enum": ["x", "y", "z"]}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
         {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}]


def fifty(types: list[dict]) -> dict:
    return {"type": "object", "properties": {f"field_{i}": types[i % len(types)] for i in range(50)},
            "required": [f"field_{i}" for i in range(50)]}


FIFTY = fifty(TYPES)  # what a pydantic model of 50 fields gives
BOUNDED = fifty(TYPES + [{"type": "string", "maxLength": 32}])  # ... with one string length bound
PROMPT = [{"role": "user", "content": "List the items as JSON."}]


def compile_times(engine: LLMEngine) -> dict:
    """Fresh caches: the tokenizer's vocabulary table (once per engine), a first compile, and a cached one."""
    out = {}
    for name, schema in (("50_fields", FIFTY), ("50_fields_with_maxLength", BOUNDED)):
        g = Grammars(engine.tokenizer.hf, engine.grammars.vocab_size)
        t0 = time.perf_counter()
        g._get_compiler()
        t1 = time.perf_counter()
        key = GrammarKey("json_schema", json.dumps(schema))
        g.get(key)
        t2 = time.perf_counter()
        cached = []
        for _ in range(100):
            t = time.perf_counter()
            g.get(key)
            cached.append(time.perf_counter() - t)
        out.update({"tokenizer_info_ms": (t1 - t0) * 1e3, f"compile_{name}_ms": (t2 - t1) * 1e3,
                    f"cached_{name}_us": statistics.median(cached) * 1e6})
    return out


class MaskTimer:
    """Wraps grammar.apply_masks to time the grammar's share of each step."""

    def __init__(self):
        self.total, self.calls, self._orig = 0.0, 0, grammar_mod.apply_masks

    def __enter__(self):
        import cluster.engine.sampler as sampler

        def timed(logits, matchers):
            t = time.perf_counter()
            self._orig(logits, matchers)
            self.total += time.perf_counter() - t
            self.calls += 1

        self._sampler = sampler
        sampler.apply_masks = timed
        return self

    def __exit__(self, *exc):
        self._sampler.apply_masks = self._orig


def decode_steps(engine: LLMEngine, n: int, gen: GenerationConfig) -> list[float]:
    """Wall time of each step after every request has its first token."""
    rids = [engine.add_request(PROMPT, gen) for _ in range(n)]
    started: set[str] = set()
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if len(started) == n and outs:
            times.append(dt)
        started.update(o.request_id for o in outs if o.token_ids)
    assert set(rids) <= started
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = LLMEngine(None, EngineConfig(device="cpu", dtype="float32", session_len=1024, num_blocks=2048,
                                          max_batch_size=64))
    result = {"compile": compile_times(engine), "tpot": []}
    print(json.dumps(result["compile"]))
    free = GenerationConfig(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    constrained = GenerationConfig(max_new_tokens=args.tokens, temperature=0, guided_json=LONG)
    decode_steps(engine, 2, free)  # warm-up (oneDNN, the grammar's compile)
    decode_steps(engine, 2, constrained)
    for c in (int(x) for x in args.concurrency.split(",")):
        row = {"concurrency": c}
        steps: dict[str, list[float]] = {"free": [], "json_schema": []}
        with MaskTimer() as mt:
            for _ in range(args.repeats):  # interleaved, so the shared box's drift falls on both alike
                steps["free"] += decode_steps(engine, c, free)
                steps["json_schema"] += decode_steps(engine, c, constrained)
        for name, times in steps.items():
            row[f"{name}_tpot_ms"] = statistics.median(times) * 1e3
        row["mask_ms_per_step"] = mt.total / max(1, mt.calls) * 1e3
        row["ratio"] = row["json_schema_tpot_ms"] / row["free_tpot_ms"]
        result["tpot"].append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
