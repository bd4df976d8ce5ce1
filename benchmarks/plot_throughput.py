"""The plot of docs/benchmarks.md: output tokens/s against concurrency for our engine, transformers and the
bandwidth floor, from bench_engine.py's JSON. `--transformers OTHER.json` takes transformers' points from an
earlier run on the same machine type when this one skipped them (--skip-hf); `--floor-tbps` draws the floor at
another measured read bandwidth.

    python benchmarks/plot_throughput.py RUN.json OUT.png [--transformers EARLIER.json] [--floor-tbps 3.05]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: dict, out_png: Path, hf_res: dict | None = None, hf_label: str = "transformers generate",
         floor_tbps: float | None = None) -> None:
    """floor_tbps: draw the floor at this read bandwidth instead of the one the run measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = {int(c): v for c, v in results["sweep"].items()}
    hf_res = results.get("transformers") if hf_res is None else hf_res
    xs = sorted(sweep)
    plt.figure(figsize=(6, 4))
    plt.plot(xs, [sweep[c]["ours"] for c in xs], "o-", label="cluster (ours)")
    ceil = results.get("ceilings", {})
    measured = ceil.get("read_bytes_per_s", ceil.get("copy_bytes_per_s"))
    scale = floor_tbps * 1e12 / measured if floor_tbps and measured else 1.0
    tbps = measured * scale / 1e12 if measured else None
    plt.plot(xs, [sweep[c]["floor"] * scale for c in xs], "k--",
             label=f"bandwidth floor ({tbps:.2f} TB/s)" if tbps else "bandwidth floor")
    hx = [c for c in (1, 64) if f"decode-{c}" in (hf_res or {})]
    if hx:
        plt.plot(hx, [hf_res[f"decode-{c}"] for c in hx], "s-", label=hf_label)
    plt.xscale("log", base=2)
    plt.yscale("log")
    plt.xlabel("concurrent requests")
    plt.ylabel("output tokens/s")
    plt.title(f"{results['shape']}, bf16, {results['device']}")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(out_png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--transformers", default=None)
    ap.add_argument("--floor-tbps", type=float, default=None, help="read bandwidth for the floor line (TB/s)")
    args = ap.parse_args()
    results = json.loads(Path(args.run).read_text())
    hf, label = None, "transformers generate"
    if args.transformers:
        hf = json.loads(Path(args.transformers).read_text())["transformers"]
        label += f" ({Path(args.transformers).name})"
    plot(results, Path(args.out), hf, label, args.floor_tbps)


if __name__ == "__main__":
    main()
