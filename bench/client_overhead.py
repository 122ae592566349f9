#!/usr/bin/env python3
"""The caption client's cost, measured side by side against a bare request loop, on one server.

Usage: bench/client_overhead.py --base-url http://127.0.0.1:PORT --max-num-seqs 8
                                [--files 48] [--seconds 30] [--max-tokens 32] [--rounds 3]
                                [--output FILE.json]

Two comparisons, on the same audio files (made here, 16 kHz WAV, one per seed):
  1. overhead: the client's batch path (captioner.batch.run_batch, JSONL written as the CLI
     writes it) against a bare `requests` loop (thread pool, one POST per file, same body) at
     the same concurrency (= --max-num-seqs). Runs alternate client, bare, client, bare, ...
     for --rounds rounds; overhead = median(client wall) / median(bare wall) - 1.
  2. speedup: the client's batch path at concurrency = --max-num-seqs against the same at
     concurrency 1 (sequential), in captions per second.
Start the server with greedy sampling and no prefix or multimodal cache, so that every run does
the same work whichever runs first (see docs/PERFORMANCE.md for the exact command).
Ratios are what this measures; absolute times on a CPU server say nothing about GPUs.
Prints a table to stderr and the JSON to --output (or stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import make_wav

from captioner import BatchOptions, CaptionClient, ServerPool, StateFile, resolve_inputs, run_batch
from captioner.payload import chat_request, data_url


def make_files(folder: Path, count: int, seconds: float) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"clip{i:04d}.wav"
        path.write_bytes(make_wav(seconds, "speechlike", seed=10_000 + i))
        paths.append(path)
    return paths


def served_model(base_url: str) -> str:
    r = requests.get(base_url + "/v1/models", timeout=30)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def client_run(base_url: str, model: str, paths: list[Path], concurrency: int, max_tokens: int,
               out_dir: Path) -> dict[str, Any]:
    """The client's batch path, as `test_client.py FOLDER -o out.jsonl` drives it."""
    items = resolve_inputs([str(p) for p in paths])
    options = BatchOptions(model=model, max_tokens=max_tokens, concurrency=concurrency)
    client = CaptionClient(base_url, pool_size=concurrency)
    out = out_dir / f"client-{time.monotonic_ns()}.jsonl"
    tokens = 0
    captions: dict[str, str] = {}
    try:
        writer = StateFile(out)
        try:
            def on_record(record: Any) -> None:
                nonlocal tokens
                writer.write(record)
                tokens += (record.usage or {}).get("completion_tokens", 0)
                captions[Path(record.source).name] = record.caption

            started = time.perf_counter()
            summary = run_batch(items, options, ServerPool([client]), on_record)
            wall = time.perf_counter() - started
        finally:
            writer.close()
    finally:
        client.close()
        out.unlink(missing_ok=True)
    return {"wall_s": wall, "ok": summary.done, "failed": summary.failed, "tokens": tokens,
            "captions": captions}


def bare_run(base_url: str, model: str, paths: list[Path], concurrency: int,
             max_tokens: int) -> dict[str, Any]:
    """The least a program can do: read, base64, POST, read the caption. No decode, no retries."""
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=concurrency))
    url = base_url + "/v1/chat/completions"

    def one(path: Path) -> tuple[str, str, int]:
        body = chat_request(data_url(path.read_bytes()), model, max_tokens)
        r = session.post(url, json=body, timeout=(10, 300))
        r.raise_for_status()
        data = r.json()
        text = data["choices"][0]["message"]["content"] or ""
        return path.name, text.strip(), int(data["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, paths))
    wall = time.perf_counter() - started
    session.close()
    return {"wall_s": wall, "ok": len(results), "failed": 0, "tokens": sum(r[2] for r in results),
            "captions": {name: text for name, text, _ in results}}


def timed_rounds(
    rounds: int, runs: dict[str, Callable[[], dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Each round runs every entry once, in turn: drift in the machine hits all alike."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for i in range(rounds):
        for name, run in runs.items():
            result = run()
            out[name].append(result)
            print(f"client_overhead: round {i + 1} {name:<12} {result['wall_s']:7.3f} s "
                  f"({result['ok']} ok, {result['failed']} failed, {result['tokens']} tokens)",
                  file=sys.stderr, flush=True)
    return out


def strip(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "captions"} for r in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="client_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--max-num-seqs", type=int, required=True, help="the server's MAX_NUM_SEQS")
    p.add_argument("--files", type=int, default=48)
    p.add_argument("--seconds", type=float, default=30.0, help="audio per file (the client's window)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", "-o")
    args = p.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    model = served_model(base_url)
    c = args.max_num_seqs
    with tempfile.TemporaryDirectory(prefix="client-overhead-") as tmp:
        folder = Path(tmp)
        paths = make_files(folder, args.files, args.seconds)
        client_run(base_url, model, paths[: min(len(paths), c)], c, args.max_tokens, folder)  # warm
        rounds = timed_rounds(args.rounds, {
            "client": lambda: client_run(base_url, model, paths, c, args.max_tokens, folder),
            "bare": lambda: bare_run(base_url, model, paths, c, args.max_tokens),
            "client-seq": lambda: client_run(base_url, model, paths, 1, args.max_tokens, folder),
        })
    med = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in rounds.items()}
    pairs = zip(rounds["client"], rounds["bare"], strict=True)
    paired = [cr["wall_s"] / br["wall_s"] - 1 for cr, br in pairs]
    same = sum(rounds["client"][0]["captions"].get(k) == v for k, v in rounds["bare"][0]["captions"].items())
    result = {
        "meta": {"base_url": base_url, "model": model, "max_num_seqs": c, "files": args.files,
                 "seconds": args.seconds, "max_tokens": args.max_tokens, "rounds": args.rounds,
                 "host": platform.node(), "cpus": os.cpu_count(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "median_wall_s": med,
        "overhead": med["client"] / med["bare"] - 1,
        "overhead_per_round": paired,
        "speedup": med["client-seq"] / med["client"],
        "speedup_target": 0.8 * c,
        "captions_per_s": {name: args.files / w for name, w in med.items()},
        "identical_captions_client_vs_bare": f"{same}/{args.files}",
        "runs": {name: strip(rs) for name, rs in rounds.items()},
    }
    print(f"client_overhead: client {med['client']:.3f} s vs bare {med['bare']:.3f} s at concurrency {c}: "
          f"overhead {100 * result['overhead']:+.2f} % (per round: "
          + ", ".join(f"{100 * x:+.2f} %" for x in paired) + "); "
          f"speedup at concurrency {c} over sequential: {result['speedup']:.2f}x "
          f"(target {0.8 * c:.1f}x); identical captions {same}/{args.files}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
