#!/usr/bin/env python3
"""Plot throughput against p95 latency for one or more loadgen results.

Usage: bench/plot.py OUT.png RESULT.json [RESULT.json ...] [--title TEXT] [--metric captions|tokens]

One line per file (its label, else its file name), one point per level of the sweep, points
sorted by concurrency (or rate) and annotated with it. x: captions/s (or output tokens/s),
y: p95 latency in seconds. Needs matplotlib (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from compare import load_of  # bench/, beside this file


def series(path: Path) -> tuple[str, list[dict[str, Any]]]:
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    label = str(meta.get("label") or path.stem)
    if meta.get("greedy") and "greedy" not in label:
        label += ", greedy"
    if meta.get("warmup_requests") and "warm" not in label:
        label += f", warm-up {meta['warmup_requests']}"
    elif meta.get("warmup_requests") == 0 and "warm" not in label:
        label += ", no warm-up"
    runs = sorted(data["runs"], key=lambda r: r.get("concurrency") or r.get("rate") or 0)
    return label, runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="PNG file to write")
    p.add_argument("results", nargs="+", type=Path, help="loadgen JSON files")
    p.add_argument("--title", default="Throughput against p95 latency")
    p.add_argument("--metric", choices=("captions", "tokens"), default="captions")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    key, xlabel = {
        "captions": ("captions_per_s", "captions per second"),
        "tokens": ("output_tokens_per_s", "output tokens per second"),
    }[args.metric]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for path in args.results:
        label, runs = series(path)
        runs = [r for r in runs if r["ok"] and r["latency_s"]["p95"] is not None]
        xs = [r[key] for r in runs]
        ys = [r["latency_s"]["p95"] for r in runs]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(runs, xs, ys, strict=True):
            ax.annotate(load_of(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("p95 latency (s)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
