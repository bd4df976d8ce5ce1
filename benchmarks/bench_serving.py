"""Serving benchmark against a running OpenAI-compatible server: a concurrency sweep, or multi-turn chats.

    python benchmarks/bench_serving.py http://127.0.0.1:8000 [--concurrency 1,8,32,128] [--max-tokens 128]
        [--num-prompts N] [--prompt-tokens 256 | --lengths sharegpt] [--api-key KEY] [--model ID] [--out results.json]
    python benchmarks/bench_serving.py --workload multiturn --serve "--replicas 1" \
        --serve "--replicas 2 --routing pending_work" --serve "--replicas 2" [--conversations 8] [--turns 4] ...

sweep: at each concurrency level C, C clients send requests back to back (each waits for its previous response)
until `num_prompts` requests are done. Per level: request throughput, output-token throughput, TTFT (time to the
first streamed token) and TPOT (time per output token after the first) at p50/p99, end-to-end latency.

multiturn: `--conversations` chats at once, each `--turns` turns long: one shared system prompt
(`--system-tokens`), a first user message of its own (`--first-tokens`), then short user turns (`--turn-tokens`),
each sent with the whole history (the answers included) once the previous answer is in. TTFT p50/p99 over all
turns and over turns 2+, throughput, the share of turn 2+ prompt tokens the engines found in their prefix cache
(`usage.prompt_tokens_details.cached_tokens`), and how many conversations changed replica (X-Cluster-Replica).

fault (`--fault kill-replica`, one sweep level, 2+ replicas): when half the level's requests are done, SIGKILL one
engine replica's rank-0 worker process (this machine's: `--serve`, or `--ray-address` of a local cluster). Reports
requests lost (an HTTP error, an error event, or a stream short of max_tokens: target 0), requests moved
(`cluster_router_moved_requests_total` in /metrics), TTFT p50/p99 of the requests that started before the kill,
within `--fault-window` seconds after it, and later, and the longest pause between two chunks of a stream that was
running at the kill (what a moved stream's client waits).

`--serve "ARGS"` (repeatable) starts `cluster serve ARGS` on a free port for each run, benchmarks it, stops it;
without it the URL's server is used. Token counts are the server's own (`usage` in the last chunk). Prints a table
to stderr and JSON to stdout (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[dict], max_tokens: int,
                      chat: bool) -> dict:
    """One streamed request; `prompt` may be a whole message list (chat)."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    t0 = last = time.perf_counter()
    ttft = None
    usage = None
    err = None
    text = ""
    replica = None
    gap = 0.0  # the longest wait between two chunks with text
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            replica = r.headers.get("x-cluster-replica")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])
                if "error" in ch:
                    err = ch["error"]["message"]
                    break
                for c in ch.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    now = time.perf_counter()
                    if piece and ttft is None:
                        ttft = now - t0
                    if piece:
                        gap, last = max(gap, now - last), now
                    text += piece or ""
                usage = ch.get("usage") or usage
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    e2e = time.perf_counter() - t0
    if err or usage is None:
        return {"ok": False, "error": err or "no usage in the stream", "start": t0, "end": t0 + e2e}
    n = usage["completion_tokens"]
    return {"ok": True, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "out": n, "in": usage["prompt_tokens"],
            "start": t0, "end": t0 + e2e, "max_gap": gap,
            "tpot": (e2e - (ttft or e2e)) / (n - 1) if n > 1 else None, "text": text, "replica": replica,
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0}


async def run_level(url: str, model: str, conc: int, prompts: list[str], args) -> dict:
    num = len(prompts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8)
    results: list[dict] = []
    fault = Fault(url, headers, args.ray_address) if args.fault else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), headers=headers, limits=limits) as client:
        queue = list(range(num))

        async def worker():
            while queue:
                i = queue.pop()
                prompt, want = prompts[i] if isinstance(prompts[i], tuple) else (prompts[i], args.max_tokens)
                r = await one_request(client, url, model, prompt, want, args.chat)
                results.append({**r, "want": want})
                if fault is not None and len(results) == num // 2:
                    fault.kill()

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
        **(fault.report(results, args.max_tokens, args.fault_window) if fault is not None else {}),
    }


# -- a replica killed halfway (--fault kill-replica) ------------------------------------------------------------------
def rank0_pids(ray_address: str) -> dict[str, int]:
    """Engine replica id -> its rank-0 worker's process id, from a second Ray driver (a fresh process: Ray reads its
    auth settings at import; `cluster serve` starts its cluster with token auth)."""
    prog = ("import json, os, ray\n"
            f"ray.init(address={ray_address!r}, logging_level='ERROR', log_to_driver=False)\n"
            "out = {}\n"
            "for a in ray.util.list_named_actors(all_namespaces=True):\n"
            "    if a['name'].startswith('cluster-rank0|'):\n"
            "        h = ray.get_actor(a['name'], namespace=a['namespace'])\n"
            "        out[a['name'].split('|')[3]] = ray.get(h.__ray_call__.remote(lambda self: os.getpid()))\n"
            "print(json.dumps(out))")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"could not list the rank-0 workers at {ray_address}: {out.stderr[-500:]}")
    return {k: int(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def moved_requests(url: str, headers: dict) -> float:
    """cluster_router_moved_requests_total summed over models (this router replica's count)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cluster_router_moved_requests_total"))


class Fault:
    """One engine replica's rank-0 worker SIGKILLed mid-run, and what that did to the requests."""

    def __init__(self, url: str, headers: dict, ray_address: str | None):
        if not ray_address:
            raise SystemExit("--fault needs the server's Ray cluster: use --serve, or give --ray-address")
        self.url, self.headers = url, headers
        self.pids = rank0_pids(ray_address)  # looked up before the load: the kill itself is instant
        if len(self.pids) < 2:
            raise SystemExit(f"--fault kill-replica needs 2+ engine replicas (found {len(self.pids)}): "
                             "serve with --replicas 2")
        self.victim = sorted(self.pids)[0]
        self.moved_before = moved_requests(url, headers)
        self.at: float | None = None

    def kill(self) -> None:
        self.at = time.perf_counter()
        os.kill(self.pids[self.victim], signal.SIGKILL)
        print(f"fault: SIGKILL of engine replica {self.victim}'s rank-0 worker (pid {self.pids[self.victim]})",
              file=sys.stderr, flush=True)

    def report(self, results: list[dict], max_tokens: int, window: float) -> dict:
        assert self.at is not None, "the run ended before half its requests were done"
        lost = [r for r in results if not r["ok"] or r["out"] != r.get("want", max_tokens)]
        ok = [r for r in results if r["ok"]]
        phases = {"before": [r for r in ok if r["start"] < self.at],
                  "around": [r for r in ok if self.at <= r["start"] < self.at + window],
                  "after": [r for r in ok if r["start"] >= self.at + window]}
        running = [r for r in ok if r["start"] < self.at < r["end"]]
        out = {"fault": "kill-replica", "victim": self.victim, "lost": len(lost),
               "lost_errors": sorted({r.get("error") or f"{r['out']} tokens" for r in lost})[:5],
               "moved": moved_requests(self.url, self.headers) - self.moved_before,
               "running_at_kill": len(running), "fault_window_s": window,
               "max_gap_running_s": max((r["max_gap"] for r in running), default=None),
               "max_gap_others_p99_s": pct([r["max_gap"] for r in ok if r not in running], 99)}
        for name, rs in phases.items():
            out[f"ttft_{name}_n"] = len(rs)
            out[f"ttft_{name}_p50_s"] = pct([r["ttft"] for r in rs], 50)
            out[f"ttft_{name}_p99_s"] = pct([r["ttft"] for r in rs], 99)
        return out


def fault_table(runs: list[dict]) -> str:
    """The fault runs as a markdown table (docs/benchmarks.md)."""
    rows = ["| server | requests | lost | moved | TTFT p50 / p99 (ms): before | within the window after | later "
            "| longest pause, streams running at the kill / others p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for lv in r.get("levels", []):
            if "fault" not in lv:
                continue
            ph = [f"{_fmt(lv[f'ttft_{n}_p50_s'], 1e3, 0)} / {_fmt(lv[f'ttft_{n}_p99_s'], 1e3, 0)} "
                  f"({lv[f'ttft_{n}_n']})" for n in ("before", "around", "after")]
            rows.append(f"| `{r.get('label') or r['url']}` c={lv['concurrency']} | {lv['requests']} | {lv['lost']} | "
                        f"{lv['moved']:.0f} | {' | '.join(ph)} | {_fmt(lv['max_gap_running_s'], 1e3, 0)} / "
                        f"{_fmt(lv['max_gap_others_p99_s'], 1e3, 0)} |")
    return "\n".join(rows)


# -- multi-turn chats ---------------------------------------------------------------------------------------------
def make_conversations(rng: random.Random, args) -> tuple[str, list[list[str]]]:
    """(shared system prompt, each conversation's user messages): its own first message, then short turns."""
    system = "You are a careful assistant. Keep these facts in mind: " + make_prompt(rng, args.system_tokens)
    convs = [[f"Conversation {i}. " + make_prompt(rng, args.first_tokens)] +
             [f"Turn {t}: " + make_prompt(rng, args.turn_tokens) for t in range(1, args.turns)]
             for i in range(args.conversations)]
    return system, convs


async def run_multiturn(url: str, model: str, args) -> dict:
    """Every conversation at once; each turn waits for the previous answer and sends the whole history."""
    system, convs = make_conversations(random.Random(args.seed), args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=len(convs) + 8, max_keepalive_connections=len(convs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), headers=headers, limits=limits) as client:
        async def conversation(users: list[str]) -> list[dict]:
            msgs, out = [{"role": "system", "content": system}], []
            for turn, user in enumerate(users):
                msgs.append({"role": "user", "content": user})
                r = await one_request(client, url, model, msgs, args.max_tokens, chat=True)
                out.append({**r, "turn": turn})
                if not r["ok"]:
                    break
                msgs.append({"role": "assistant", "content": r["text"]})
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*[conversation(u) for u in convs])
        wall = time.perf_counter() - t0
    flat = [r for conv in results for r in conv]
    ok = [r for r in flat if r["ok"]]
    later = [r for r in ok if r["turn"] > 0]
    homes = [conv[0].get("replica") for conv in results if conv and conv[0]["ok"]]
    out_tokens = sum(r["out"] for r in ok)
    return {
        "conversations": len(convs), "turns": args.turns, "requests": len(flat), "completed": len(ok),
        "failed": len(flat) - len(ok), "errors": sorted({r["error"] for r in flat if not r["ok"]})[:5],
        "duration_s": wall, "request_throughput": len(ok) / wall, "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (out_tokens + sum(r["in"] for r in ok)) / wall,
        "mean_input_tokens": statistics.mean(r["in"] for r in ok) if ok else None,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "ttft_later_p50_s": pct([r["ttft"] for r in later], 50),
        "ttft_later_p99_s": pct([r["ttft"] for r in later], 99),
        "tpot_p50_s": pct([r["tpot"] for r in ok if r["tpot"] is not None], 50),
        "later_cached_share": sum(r["cached"] for r in later) / max(1, sum(r["in"] for r in later)),
        "conversations_moved": sum(len({r.get("replica") for r in conv if r["ok"]}) > 1 for conv in results),
        "conversations_per_replica": sorted((homes.count(h) for h in set(homes)), reverse=True),
    }


# -- servers started for a run ---------------------------------------------------------------------------------------
class Launched:
    """`cluster serve ARGS` on a free port (its own local Ray cluster), until stop()."""

    def __init__(self, serve_args: str, api_key: str | None, log_dir: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_dir / f"serve-{port}.log"
        self.ray_address: str | None = None
        cmd = [sys.executable, "-m", "cluster.cli", "serve", *shlex.split(serve_args), "--port", str(port)]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         cwd=Path(__file__).resolve().parent.parent)
        deadline = time.time() + 600
        while "serving on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"cluster serve {serve_args} did not start; see {self.log}")
            time.sleep(0.5)
        found = re.search(r"^ray: (\S+)", self.log.read_text(errors="replace"), re.M)
        self.ray_address = found.group(1) if found else None

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen, kill_group: bool = False) -> None:
    """SIGTERM (a server drains and exits), up to 120 s; then SIGKILL: the process, or with `kill_group` its whole
    session (what it started: Ray's processes, vLLM's engine core), even after a clean exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            if not kill_group:
                proc.kill()
    if kill_group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


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
        await one_request(c, url, model, "Hello", 4, args.chat or args.workload == "multiturn")
    if args.workload == "multiturn":
        res = await run_multiturn(url, model, args)
        print(f"{args.label or url}: {res['completed']}/{res['requests']} ok  {res['output_token_throughput']:.1f} "
              f"tok/s  TTFT p50 {_fmt(res['ttft_p50_s'], 1e3, 0)} p99 {_fmt(res['ttft_p99_s'], 1e3, 0)} ms  "
              f"turns 2+ TTFT p50 {_fmt(res['ttft_later_p50_s'], 1e3, 0)} p99 {_fmt(res['ttft_later_p99_s'], 1e3, 0)}"
              f" ms  cached {res['later_cached_share']:.0%}  moved {res['conversations_moved']}  split "
              f"{res['conversations_per_replica']}", file=sys.stderr, flush=True)
        return {"url": url, "model": model, "workload": "multiturn", "label": args.label,
                "max_tokens": args.max_tokens, "system_tokens": args.system_tokens, "first_tokens": args.first_tokens,
                "turn_tokens": args.turn_tokens, **res}
    rng = random.Random(args.seed)
    levels = []
    for conc in args.concurrency:
        num = args.num_prompts or max(2 * conc, 16)
        if args.lengths == "sharegpt":  # sharegpt_like.py's lengths: the same workload offline and through HTTP
            from sharegpt_like import workload

            prompts = [(make_prompt(rng, p), o) for p, o in workload(num, seed=args.seed + conc)]
        else:
            prompts = [make_prompt(rng, args.prompt_tokens) for _ in range(num)]
        res = await run_level(url, model, conc, prompts, args)
        res["prompts"] = prompts
        levels.append(res)
        print(f"c={conc:>4}  {res['completed']:>4}/{num} ok  {res['request_throughput']:7.2f} req/s  "
              f"{res['output_token_throughput']:8.1f} tok/s  TTFT p50 {_fmt(res['ttft_p50_s'], 1e3, 0)} ms "
              f"p99 {_fmt(res['ttft_p99_s'], 1e3, 0)} ms  TPOT p50 {_fmt(res['tpot_p50_s'], 1e3)} ms "
              f"p99 {_fmt(res['tpot_p99_s'], 1e3)} ms", file=sys.stderr, flush=True)
        if args.fault:
            print(f"       lost {res['lost']}  moved {res['moved']:.0f}  TTFT p99 before / after the kill / later "
                  f"{_fmt(res['ttft_before_p99_s'], 1e3, 0)} / {_fmt(res['ttft_around_p99_s'], 1e3, 0)} / "
                  f"{_fmt(res['ttft_after_p99_s'], 1e3, 0)} ms", file=sys.stderr, flush=True)
    return {"url": url, "model": model, "endpoint": "chat" if args.chat else "completions",
            "max_tokens": args.max_tokens, "prompt_tokens_approx": args.prompt_tokens, "levels": levels}


def multiturn_table(runs: list[dict]) -> str:
    """The runs as a markdown table (docs/benchmarks.md)."""
    rows = ["| server | output tok/s | TTFT p50 / p99 (ms) | turns 2+ TTFT p50 / p99 (ms) | turns 2+ cached | "
            "moved | conversations per replica |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        rows.append(f"| `{r['label']}` | {r['output_token_throughput']:.1f} | {_fmt(r['ttft_p50_s'], 1e3, 0)} / "
                    f"{_fmt(r['ttft_p99_s'], 1e3, 0)} | {_fmt(r['ttft_later_p50_s'], 1e3, 0)} / "
                    f"{_fmt(r['ttft_later_p99_s'], 1e3, 0)} | {r['later_cached_share']:.0%} | "
                    f"{r['conversations_moved']}/{r['conversations']} | {r['conversations_per_replica']} |")
    return "\n".join(rows)


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
        pairs = [p if isinstance(p, (tuple, list)) else (p, args.max_tokens) for p in lv["prompts"]]
        gens = [gen.model_copy(update={"max_new_tokens": n}) for _, n in pairs]
        t0 = time.perf_counter()
        outs = engine.generate([p for p, _ in pairs], gens)
        wall = time.perf_counter() - t0
        lv["offline_output_token_throughput"] = sum(len(o.token_ids) for o in outs) / wall
        lv["serving_over_offline"] = lv["output_token_throughput"] / lv["offline_output_token_throughput"]
        print(f"c={lv['concurrency']:>4}  offline engine {lv['offline_output_token_throughput']:8.1f} tok/s  "
              f"serving/offline {lv['serving_over_offline']:.2f}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", default=None, help="the server (not with --serve)")
    p.add_argument("--workload", choices=["sweep", "multiturn"], default="sweep")
    p.add_argument("--serve", action="append", default=None, metavar="ARGS",
                   help="start `cluster serve ARGS` for a run, then stop it (repeat: one run each)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: max(2C, 16))")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=256, help="approximate prompt length")
    p.add_argument("--lengths", choices=["fixed", "sharegpt"], default="fixed",
                   help="sharegpt: each request's prompt and output lengths drawn as benchmarks/sharegpt_like.py "
                        "draws them (--prompt-tokens and --max-tokens then unused)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default: /v1/completions)")
    p.add_argument("--conversations", type=int, default=8, help="multiturn: chats at once")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns per chat")
    p.add_argument("--system-tokens", type=int, default=200, help="multiturn: shared system prompt length")
    p.add_argument("--first-tokens", type=int, default=200, help="multiturn: each chat's first message length")
    p.add_argument("--turn-tokens", type=int, default=16, help="multiturn: each later user message's length")
    p.add_argument("--fault", choices=["kill-replica"], default=None,
                   help="sweep, one level: SIGKILL one engine replica's rank-0 worker when half the requests are done")
    p.add_argument("--fault-window", type=float, default=10.0, metavar="S",
                   help="--fault: TTFT of requests started this long after the kill is reported apart")
    p.add_argument("--ray-address", default=None, help="--fault without --serve: the server's (local) Ray cluster")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    p.add_argument("--offline-baseline", nargs="?", const="default", default=None, metavar="MODEL",
                   help="afterwards, run the same prompts through the engine in this process (no Ray, no HTTP; "
                        "at most C sequences at once) and report serving / offline throughput per level")
    args = p.parse_args(argv)
    if (args.url is None) == (not args.serve):
        p.error("give a server URL or --serve ARGS (not both)")
    if args.fault and (args.workload != "sweep" or len(args.concurrency) != 1):
        p.error("--fault runs one sweep level: give one --concurrency value (and --workload sweep)")
    args.label = None
    runs = []
    if args.serve:
        log_dir = Path(tempfile.mkdtemp(prefix="bench_serving-"))
        for serve_args in args.serve:
            srv = Launched(serve_args, args.api_key, log_dir)
            try:
                args.url, args.label, args.ray_address = srv.url, serve_args, srv.ray_address
                runs.append(asyncio.run(main_async(args)))
            finally:
                srv.stop()
    else:
        runs.append(asyncio.run(main_async(args)))
    for result in runs:
        if args.offline_baseline and args.workload == "sweep":
            offline_baseline(result, args)
        for lv in result.get("levels", []):
            lv.pop("prompts", None)
    if args.workload == "multiturn":
        print(multiturn_table(runs), file=sys.stderr)
    if args.fault:
        print(fault_table(runs), file=sys.stderr)
    text = json.dumps(runs if args.serve else runs[0], indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    failed = [r.get("failed", 0) for r in runs] + [lv["failed"] + lv.get("lost", 0) for r in runs
                                                   for lv in r.get("levels", [])]
    return 0 if not any(failed) else 1


if __name__ == "__main__":
    sys.exit(main())
