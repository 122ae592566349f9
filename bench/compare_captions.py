#!/usr/bin/env python3
"""Caption the same audio on two services and report how far their captions differ.

Usage:
  bench/compare_captions.py --a URL --b URL [--baseline] [-o REPORT.md] [--work DIR] \
                            [CLIENT OPTION...] INPUT...

Options it does not know (--api-key, --retries, --concurrency, ...) go to test_client.py.

For a decision such as FP8 weights (QUANTIZATION) against bf16: start one service of each, point
--a at the reference (bf16) and --b at the candidate, and give your own recordings. Each service
captions every input through test_client.py (same windows, retries and resume as a normal batch:
a rerun with the same --work folder picks up where it stopped), then every pair of captions is
scored with a word-level similarity: 100 = the same words in the same order, 0 = nothing in
common (rapidfuzz's normalized Indel similarity over words, case and punctuation ignored).

Sampling (temperature 0.6) makes two captions of one clip differ even on one service. With
--baseline, service A captions everything a second time, and the report puts A-vs-B beside
A-vs-A: the candidate is as good as the reference when A-vs-B is about as similar as A-vs-A.

The report (Markdown: the overall figures, then one row per input with both captions side by
side, lowest score first) goes to stdout or -o. Exit 0 when every input was captioned by every
run, 1 otherwise (the failed inputs are listed, or the run that captioned nothing is named),
2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz.distance import Indel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the kit's captioner package

from captioner.formats import escape_text  # noqa: E402

CLIENT = ROOT / "test_client.py"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def similarity(a: str, b: str) -> float:
    """0-100: how much of the two captions' word sequences is shared, in order."""
    return 100.0 * Indel.normalized_similarity(words(a), words(b))


def caption_all(base_url: str, client_args: list[str], out: Path) -> int:
    """Caption every input on one service into a jsonl file (resumable): test_client.py's exit code."""
    cmd = [sys.executable, str(CLIENT), "--base-url", base_url, "--format", "jsonl", "-o", str(out),
           *client_args]
    print(f"compare_captions: captioning on {base_url} into {out}", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


def read_captions(path: Path) -> dict[str, str | None]:
    """source -> caption (None for an input that failed) from a client jsonl file."""
    captions: dict[str, str | None] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                captions[record["source"]] = None if record.get("error") else record["caption"]
    return captions


@dataclass
class Pair:
    source: str
    a: str
    b: str
    score: float
    baseline: float | None = None


def compare(a: dict[str, str | None], b: dict[str, str | None],
            a_again: dict[str, str | None] | None) -> tuple[list[Pair], list[str]]:
    """Score every input captioned by every run; list the others as failed."""
    pairs, failed = [], []
    for source in sorted(set(a) | set(b) | set(a_again or {})):
        ca, cb = a.get(source), b.get(source)
        again = a_again.get(source) if a_again is not None else ""
        if ca is None or cb is None or again is None:
            failed.append(source)
            continue
        pairs.append(Pair(source, ca, cb, similarity(ca, cb),
                          similarity(ca, again) if a_again is not None else None))
    return pairs, failed


def summary_line(name: str, scores: list[float]) -> str:
    return (f"| {name} | {statistics.mean(scores):.1f} | {statistics.median(scores):.1f} | "
            f"{min(scores):.1f} |")


def cell(text: str) -> str:
    """`text` as one Markdown table cell: pipes escaped, line breaks as spaces, other controls as
    escapes (a carriage return or a \\x1e would split the row for a reader)."""
    return escape_text(text.replace("|", "\\|").replace("\n", " "))


def report(pairs: list[Pair], failed: list[str], url_a: str, url_b: str) -> str:
    lines = [f"# Captions compared: A = {url_a}, B = {url_b}", ""]
    if pairs:
        lines += [f"{len(pairs)} inputs captioned by every run. Word-level similarity, 0-100:", "",
                  "| pair | mean | median | lowest |", "|---|---|---|---|",
                  summary_line("A vs B", [p.score for p in pairs])]
        if pairs[0].baseline is not None:
            lines.append(summary_line("A vs A (sampling alone)", [p.baseline or 0.0 for p in pairs]))
        lines.append("")
        with_baseline = pairs[0].baseline is not None
        lines += ["| input | A vs B |" + (" A vs A |" if with_baseline else "") + " caption A | caption B |",
                  "|---|---|" + ("---|" if with_baseline else "") + "---|---|"]
        for p in sorted(pairs, key=lambda p: p.score):
            base = f" {p.baseline:.1f} |" if p.baseline is not None else ""
            lines.append(f"| {cell(p.source)} | {p.score:.1f} |{base} {cell(p.a)} | {cell(p.b)} |")
    if failed:
        lines += ["", f"Not compared ({len(failed)}): an input some run did not caption:", ""]
        lines += [f"- {cell(s)}" for s in failed]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_captions.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, metavar="URL", help="the reference service")
    p.add_argument("--b", required=True, metavar="URL", help="the candidate service")
    p.add_argument("--baseline", action="store_true", help="also caption everything twice on A")
    p.add_argument("--work", default="compare-work", help="folder for the runs' jsonl files (resumable)")
    p.add_argument("-o", "--output", help="the Markdown report (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, client_args = build_parser().parse_known_args(argv)
    if not client_args:
        print("compare_captions: give the files or folders to caption (see --help)", file=sys.stderr)
        return 2
    work = Path(args.work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"compare_captions: cannot use --work {work}: {exc.strerror}", file=sys.stderr)
        return 2
    runs = [(args.a, work / "a.jsonl"), (args.b, work / "b.jsonl")]
    if args.baseline:
        runs.append((args.a, work / "a-again.jsonl"))
    for url, out in runs:
        code = caption_all(url, client_args, out)
        if code in (2, 130):  # bad usage (the same for every run) or Ctrl-C
            return code
        if code != 0 and not read_captions(out):
            print(f"compare_captions: nothing was captioned on {url} (test_client.py exit {code}, "
                  f"its message above); fix that and rerun: finished captions are kept in {work}",
                  file=sys.stderr)
            return 1
    a, b = read_captions(runs[0][1]), read_captions(runs[1][1])
    a_again = read_captions(runs[2][1]) if args.baseline else None
    pairs, failed = compare(a, b, a_again)
    text = report(pairs, failed, args.a, args.b)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if failed:
        print(f"compare_captions: {len(failed)} input(s) not captioned by every run", file=sys.stderr)
    return 1 if failed or not pairs else 0


if __name__ == "__main__":
    sys.exit(main())
