"""Serving benchmark against a running OpenAI-compatible server: a concurrency sweep, streamed requests.

    python benchmarks/bench_serving.py http://127.0.0.1:8000 [--concurrency 1,8,32,128] [--max-tokens 128]
        [--num-prompts N] [--prompt-tokens 256] [--api-key KEY] [--model ID] [--out results.json]

At each concurrency level C, C clients send requests back to back (each waits for its previous response) until
`num_prompts` requests are done. Per level: request throughput, output-token throughput, TTFT (time to the first
streamed token) and TPOT (time per output token after the first) at p50/p99, end-to-end latency. Token counts are
the server's own (`usage` in the last chunk). Prints a table to stderr and JSON to stdout (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
         "old stone bridges under silver moonlight and distant thunder rolls across green valleys").split()


def make_prompt(rng: random.Random, approx_tokens: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(max(1, int(approx_tokens * 0.8))))
    return f"Continue this text for a while: {body}"


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      chat: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    t0 = time.perf_counter()
    ttft = None
    usage = None
    err = None
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])
                if "error" in ch:
                    err = ch["error"]["message"]
                    break
                for c in ch.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                usage = ch.get("usage") or usage
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    e2e = time.perf_counter() - t0
    if err or usage is None:
        return {"ok": False, "error": err or "no usage in the stream"}
    n = usage["completion_tokens"]
    return {"ok": True, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "out": n, "in": usage["prompt_tokens"],
            "tpot": (e2e - (ttft or e2e)) / (n - 1) if n > 1 else None}


async def run_level(url: str, model: str, conc: int, prompts: list[str], args) -> dict:
    num = len(prompts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), headers=headers, limits=limits) as client:
        queue = list(range(num))

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, model, prompts[i], args.max_tokens, args.chat))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    e2e = [r["e2e"] for r in ok]
    out_tokens = sum(r["out"] for r in ok)
    return {
        "concurrency": conc, "requests": num, "completed": len(ok), "failed": num - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "duration_s": wall, "request_throughput": len(ok) / wall, "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (out_tokens + sum(r["in"] for r in ok)) / wall,
        "mean_input_tokens": statistics.mean(r["in"] for r in ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
    }


def _fmt(v, scale=1.0, digits=1):
    return "-" if v is None else f"{v * scale:.{digits}f}"


async def main_async(args) -> dict:
    url = args.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=30, headers=headers) as c:
        r = await c.get(url + "/v1/models")
        r.raise_for_status()
        model = args.model or r.json()["data"][0]["id"]
        # warm-up (first requests pay one-time costs)
        await one_request(c, url, model, "Hello", 4, args.chat)
    rng = random.Random(args.seed)
    levels = []
    for conc in args.concurrency:
        num = args.num_prompts or max(2 * conc, 16)
        prompts = [make_prompt(rng, args.prompt_tokens) for _ in range(num)]
        res = await run_level(url, model, conc, prompts, args)
        res["prompts"] = prompts
        levels.append(res)
        print(f"c={conc:>4}  {res['completed']:>4}/{num} ok  {res['request_throughput']:7.2f} req/s  "
              f"{res['output_token_throughput']:8.1f} tok/s  TTFT p50 {_fmt(res['ttft_p50_s'], 1e3, 0)} ms "
              f"p99 {_fmt(res['ttft_p99_s'], 1e3, 0)} ms  TPOT p50 {_fmt(res['tpot_p50_s'], 1e3)} ms "
              f"p99 {_fmt(res['tpot_p99_s'], 1e3)} ms", file=sys.stderr, flush=True)
    return {"url": url, "model": model, "endpoint": "chat" if args.chat else "completions",
            "max_tokens": args.max_tokens, "prompt_tokens_approx": args.prompt_tokens, "levels": levels}


def offline_baseline(result: dict, args) -> None:
    """The engine's own throughput on the same prompts and lengths: what Ray and HTTP are measured against."""
    from cluster.config import EngineConfig, GenerationConfig
    from cluster.engine.engine import LLMEngine

    model = None if args.offline_baseline == "default" else args.offline_baseline
    engine = LLMEngine(model, EngineConfig(device="cpu") if not __import__("torch").cuda.is_available() else None)
    gen = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(["Hello"], GenerationConfig(max_new_tokens=4))
    for lv in result["levels"]:
        engine.scheduler.max_batch_size = lv["concurrency"]
        t0 = time.perf_counter()
        outs = engine.generate(lv["prompts"], gen)
        wall = time.perf_counter() - t0
        lv["offline_output_token_throughput"] = sum(len(o.token_ids) for o in outs) / wall
        lv["serving_over_offline"] = lv["output_token_throughput"] / lv["offline_output_token_throughput"]
        print(f"c={lv['concurrency']:>4}  offline engine {lv['offline_output_token_throughput']:8.1f} tok/s  "
              f"serving/offline {lv['serving_over_offline']:.2f}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: max(2C, 16))")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=256, help="approximate prompt length")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default: /v1/completions)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    p.add_argument("--offline-baseline", nargs="?", const="default", default=None, metavar="MODEL",
                   help="afterwards, run the same prompts through the engine in this process (no Ray, no HTTP; "
                        "at most C sequences at once) and report serving / offline throughput per level")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.offline_baseline:
        offline_baseline(result, args)
    for lv in result["levels"]:
        lv.pop("prompts", None)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if all(lv["failed"] == 0 for lv in result["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
