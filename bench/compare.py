#!/usr/bin/env python3
"""Compare loadgen results with a baseline: a Markdown table of every level, then each result's
captions/s at the baseline's p95 and its ratio to the baseline.

Usage: bench/compare.py BASELINE.json RESULT.json [RESULT.json ...]
   e.g. bench/compare.py bench/results/2026-12-07-h100-round3/{pred,fp8,fp8-untuned,bf16,bf16-untuned}.json

The baseline's operating point is its level with the most captions/s (saturated); that level's
p95 latency is the budget. For each result: "measured" is the most captions/s of a level whose p95
is within the budget; "at the budget" reads captions/s off the straight line between the two
levels whose p95s lie either side of it (blank where the budget is outside the sweep). Open-loop
levels count captions/s over their whole span, the drain included (what loadgen measured).
A file whose requests collapsed to few distinct sequences (greedy on random weights) is refused:
its speed is not a caption load's.
Exit codes: 0 printed, 1 a file unreadable, not a loadgen result or collapsed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any


class CompareError(Exception):
    """One line for the user; main maps it to exit code 1."""


@dataclass(frozen=True)
class Point:
    load: str
    captions_per_s: float
    p95: float


def load(path: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    try:
        data = json.loads(path.read_text())
        meta, runs = data.get("meta", {}), data["runs"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompareError(f"{path}: not a loadgen result ({type(e).__name__}: {e}); "
                           "give the JSON that bench/loadgen.py --output wrote") from None
    for run in runs:
        if run.get("collapsed"):
            raise CompareError(f"{path}: {run['ok']} requests decoded only {run['distinct_sequences']} "
                               "distinct sequences (greedy on random weights?): rerun it sampled")
    return str(meta.get("label") or path.stem), meta, runs


def load_of(run: dict[str, Any]) -> str:
    return f"c={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate']:g}/s"


def points(runs: list[dict[str, Any]]) -> list[Point]:
    return sorted((Point(load_of(r), r["captions_per_s"], r["latency_s"]["p95"])
                   for r in runs if r["ok"] and r["latency_s"]["p95"] is not None),
                  key=lambda p: p.p95)


def within(pts: list[Point], budget: float) -> Point | None:
    fit = [p for p in pts if p.p95 <= budget]
    return max(fit, key=lambda p: p.captions_per_s) if fit else None


def at_budget(pts: list[Point], budget: float) -> float | None:
    for lo, hi in pairwise(pts):
        if lo.p95 <= budget <= hi.p95 and hi.p95 > lo.p95:
            share = (budget - lo.p95) / (hi.p95 - lo.p95)
            return lo.captions_per_s + share * (hi.captions_per_s - lo.captions_per_s)
    return None


def table(files: list[tuple[str, dict[str, Any], list[dict[str, Any]]]]) -> list[str]:
    def f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if x is None else f"{x * scale:.{digits}f}"

    head = ("setting", "load", "captions/s", "audio s/s", "p50 s", "p95 s", "TTFT p95 s", "TPOT p50 ms",
            "distinct", "start s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, meta, runs in files:
        for r in runs:
            lines.append(
                f"| {label} | {load_of(r)} | {f(r['captions_per_s'])} | {f(r['audio_s_per_s'], digits=0)} "
                f"| {f(r['latency_s']['p50'])} | {f(r['latency_s']['p95'])} | {f(r['ttft_s']['p95'])} "
                f"| {f(r['tpot_s']['p50'], 1000, 1)} | {r['distinct_sequences']}/{r['ok']} "
                f"| {meta.get('start_seconds', '–')} |")
    return lines


def ratios(files: list[tuple[str, dict[str, Any], list[dict[str, Any]]]]) -> list[str]:
    base_label, _, base_runs = files[0]
    base = max(points(base_runs), key=lambda p: p.captions_per_s, default=None)
    if base is None:
        raise CompareError(f"{base_label}: no level with answered requests to compare with")
    lines = [f"Budget: the p95 of {base_label} saturated ({base.load}: {base.captions_per_s:.2f} captions/s, "
             f"p95 {base.p95:.2f} s).", "",
             "| setting | measured within the budget | ratio | at the budget (interpolated) | ratio |",
             "|---|---|---|---|---|"]

    def ratio(x: float | None) -> str:
        return "–" if x is None else f"{x / base.captions_per_s:.1f}×"

    for label, _, runs in files[1:]:
        pts = points(runs)
        best, line = within(pts, base.p95), at_budget(pts, base.p95)
        if best is None:
            measured, best_rate = "none", None
        else:
            measured = f"{best.captions_per_s:.2f} ({best.load}, p95 {best.p95:.2f} s)"
            best_rate = best.captions_per_s
        at = "–" if line is None else f"{line:.2f}"
        lines.append(f"| {label} | {measured} | {ratio(best_rate)} | {at} | {ratio(line)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", type=Path, help="the baseline's loadgen JSON (the predecessor's settings)")
    p.add_argument("results", nargs="+", type=Path, help="loadgen JSONs to compare with it")
    args = p.parse_args(argv)
    try:
        files = [load(path) for path in (args.baseline, *args.results)]
        print("\n".join([*table(files), "", *ratios(files)]))
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
