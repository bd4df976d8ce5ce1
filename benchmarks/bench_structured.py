"""Structured output's cost: time per output token under a JSON schema against the same decode unconstrained
(issue 15's target: at most 1.1x), and grammar compilation of a 50-field schema (target: under 100 ms, cached
thereafter), with and without a string length bound.

TPOT is the median wall time of a decode step (every request gets one token per step), over the steps after the
first token, at each concurrency. Both runs decode the same number of tokens: the schema (an array of at least
256 small objects) cannot end before max_new_tokens, and the unconstrained run ignores EOS. The grammar's own
share of a step (filling the bitmask on the host, sending it and applying it to the logits) is timed apart.

By default the embedded SmolLM2 on the CPU (fp32). With --shape, random weights of that shape
(bench_engine.SHAPES; bf16 on CUDA, fp32 on the CPU) and the tokenizer in --tokenizer: a folder of Hugging Face
tokenizer files, which --save-tokenizer writes from the embedded SmolLM2 (its GGUF needs the gguf package; the
folder does not). The logits keep the shape's width (128256 for llama3-8b); ids past the tokenizer's 49152 are
never allowed by a grammar and decode to nothing.

    python benchmarks/bench_structured.py [--concurrency 1,8,32] [--tokens 64] [--out result.json]
    python benchmarks/bench_structured.py --save-tokenizer .tok
    python benchmarks/bench_structured.py --device cuda --shape llama3-8b --tokenizer .tok --concurrency 1,8,64
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
from cluster.engine.grammar import GrammarKey, Grammars, grammar_key

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


def _fill_us(grammars: Grammars, compiled, text: str) -> float:
    """Mean time to fill one row's bitmask while the matcher walks `text`'s tokens."""
    import xgrammar as xgr

    m, bitmask, total = grammars.matcher(compiled, ()), xgr.allocate_token_bitmask(1, grammars.vocab_size), 0.0
    ids = grammars.hf.encode(text, add_special_tokens=False)
    for i in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        total += time.perf_counter() - t
        assert m.accept_token(i), text
    return total / len(ids) * 1e6


def compile_times(engine: LLMEngine) -> dict:
    """Fresh caches each time. `tokenizer_info_ms`: the vocabulary table, once per engine. Per schema: xgrammar's
    own lowering (a bounded string as a counted repetition; what ran before string_bounds.py), ours cold (the
    chain of a bounded string computed on first use), ours after the engine's background warm-up (the chain up to
    WARM_STRING_LENGTH characters already built), and a cached lookup. Then the bitmask fill per token inside a
    32-character string under each lowering."""
    out: dict = {}
    hf, vocab = engine.tokenizer.hf, engine.grammars.vocab_size
    t0 = time.perf_counter()
    Grammars(hf, vocab, warm_strings=0)._get_compiler()
    out["tokenizer_info_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    warm = Grammars(hf, vocab, warm_strings=0)
    warm.warm()
    out["warm_up_ms"] = (time.perf_counter() - t0) * 1e3 - out["tokenizer_info_ms"]
    for name, schema in (("50_fields", FIFTY), ("50_fields_with_maxLength", BOUNDED)):
        src = json.dumps(schema)
        plain = Grammars(hf, vocab, warm_strings=0)
        compiler = plain._get_compiler()
        t = time.perf_counter()
        compiler.compile_json_schema(src, any_whitespace=False, strict_mode=True)
        out[f"compile_{name}_xgrammar_ms"] = (time.perf_counter() - t) * 1e3
        cold = Grammars(hf, vocab, warm_strings=0)
        cold._get_compiler()
        key = GrammarKey("json_schema", src)
        for label, g in (("cold", cold), ("warm", warm)):
            t = time.perf_counter()
            g.get(key)
            out[f"compile_{name}_{label}_ms"] = (time.perf_counter() - t) * 1e3
        cached = []
        for _ in range(100):
            t = time.perf_counter()
            warm.get(key)
            cached.append(time.perf_counter() - t)
        out[f"cached_{name}_us"] = statistics.median(cached) * 1e6
    one = json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 32}}, "required": ["s"]})
    text = '{"s": "' + "the quick brown fox jumps over t" + '"}'
    counted = warm._get_compiler().compile_json_schema(one, any_whitespace=False, strict_mode=True)
    out["fill_maxLength_32_xgrammar_us"] = _fill_us(warm, counted, text)
    out["fill_maxLength_32_chain_us"] = _fill_us(warm, warm.get(GrammarKey("json_schema", one)), text)
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


def mask_parts(args) -> dict:
    """apply_masks' parts timed apart at each concurrency, without a model: the host fill (one matcher, or the
    batch at 1, 4 and xgrammar's own thread count), the copy to the device and xgrammar's kernel."""
    from transformers import AutoTokenizer

    import xgrammar as xgr

    hf = AutoTokenizer.from_pretrained(args.tokenizer or str(_embedded_dir()))
    vocab = args.vocab_size or 128256
    grammars = Grammars(hf, vocab)
    compiled = grammars.get(grammar_key(GenerationConfig(guided_json=LONG)))
    prefix = hf.encode('[{"id": 12, "tag": "a"}, {"id": 3', add_special_tokens=False)
    dev = torch.device(args.device)
    out: dict = {}

    def timed(fn, reps: int = 50) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e6

    for c in args.levels:
        ms = [grammars.matcher(compiled, [0]) for _ in range(c)]
        for i, m in enumerate(ms):
            for t in prefix[: 3 + i % 10]:
                assert m.accept_token(t)
        host = xgr.allocate_token_bitmask(c, vocab)
        if dev.type == "cuda":
            host = host.pin_memory()
        on_dev = torch.empty(host.shape, dtype=host.dtype, device=dev)
        logits = torch.randn(c, vocab, device=dev)
        row = {"concurrency": c, "fill_-1_us": timed(lambda: host.fill_(-1)),
               "fill_one_by_one_us": timed(lambda: [m.fill_next_token_bitmask(host, i) for i, m in enumerate(ms)])}
        for threads in (1, 4, "auto"):
            batch = xgr.BatchGrammarMatcher(threads)
            row[f"batch_fill_{threads}_us"] = timed(lambda: batch.batch_fill_next_token_bitmask(ms, host,
                                                                                              list(range(c))))
        if dev.type == "cuda":
            row["copy_us"] = timed(lambda: on_dev.copy_(host, non_blocking=True))
            row["apply_us"] = timed(lambda: xgr.apply_token_bitmask_inplace(logits, on_dev, vocab_size=vocab))
        row["apply_masks_us"] = timed(lambda: grammar_mod.apply_masks(logits, ms))
        out[c] = row
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return out


def build_engine(args) -> LLMEngine:
    """The embedded SmolLM2, or random weights of --shape with the tokenizer of --tokenizer."""
    cpu = args.device == "cpu"
    kw = dict(session_len=1024, max_batch_size=max(64, *args.levels))
    if cpu:
        kw["num_blocks"] = 2048
    else:
        kw["cache_max_entry_count"] = 0.5
    if args.shape is None:
        return LLMEngine(None, EngineConfig(device=args.device, dtype="float32" if cpu else "bfloat16", **kw))
    from bench_engine import SHAPES, engine_from_hf, random_hf_model

    from cluster.engine.tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer or _embedded_dir())
    vocab = args.vocab_size or SHAPES[args.shape]["vocab_size"]
    if vocab < len(tok.hf):
        raise SystemExit(f"--shape {args.shape}: its logits are {vocab} wide, the tokenizer has {len(tok.hf)} ids; "
                         f"give --vocab-size {len(tok.hf)} (or more)")
    SHAPES[args.shape] = {**SHAPES[args.shape], "vocab_size": vocab}
    dtype = torch.float32 if cpu else torch.bfloat16
    torch.manual_seed(0)
    hf_model = random_hf_model(args.shape, dtype, 2048, device=args.device)
    base = engine_from_hf(hf_model, str(dtype).split(".")[1], device=args.device, **kw)
    del hf_model
    if not cpu:
        torch.cuda.empty_cache()
    return LLMEngine(runner=base.runner, tokenizer=tok, engine_config=EngineConfig(**kw, device=args.device))


def _embedded_dir():
    from cluster.convert.cache import ensure_converted

    return ensure_converted(None, 1, "float32", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", help="random weights of bench_engine's shape (llama3-8b, tiny, ...)")
    ap.add_argument("--vocab-size", type=int, help="the logits' width with --shape (default: the shape's)")
    ap.add_argument("--tokenizer", help="tokenizer folder with --shape (default: the embedded SmolLM2's)")
    ap.add_argument("--save-tokenizer", metavar="DIR", help="write the embedded SmolLM2's tokenizer files, then exit")
    ap.add_argument("--skip-compile", action="store_true", help="no compile-time section")
    ap.add_argument("--mask-parts", action="store_true", help="only time the mask's parts (no model), then exit")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(_embedded_dir())).save_pretrained(args.save_tokenizer)
        print("tokenizer files in", args.save_tokenizer)
        return
    args.levels = [int(x) for x in args.concurrency.split(",")]
    if args.mask_parts:
        result = mask_parts(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    if args.device == "cpu":
        torch.set_num_threads(2)
    engine = build_engine(args)
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "shape": args.shape or "SmolLM2-135M", "vocab": engine.grammars.vocab_size, "tpot": []}
    if not args.skip_compile:
        result["compile"] = compile_times(engine)
        print(json.dumps(result["compile"]), flush=True)
    free = GenerationConfig(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    constrained = GenerationConfig(max_new_tokens=args.tokens, temperature=0, guided_json=LONG)
    decode_steps(engine, 2, free)  # warm-up (oneDNN or CUDA graphs, the grammar's compile)
    decode_steps(engine, 2, constrained)
    for c in args.levels:
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
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
