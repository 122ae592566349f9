#!/usr/bin/env python3
"""Load generator for the caption service: closed or open loop, streaming, JSON out.

Usage:
  bench/loadgen.py --concurrency 64 --requests 192                # closed loop
  bench/loadgen.py --sweep 8,32,64,128 --requests-per-slot 3      # closed loop, one run per level
  bench/loadgen.py --rate 10 --requests 200                       # open loop, Poisson arrivals
  options: --seconds 30 (audio length) --max-tokens 400 (ignore_eos: fixed caption length)
           --output FILE.json --label NAME --meta KEY=VALUE --greedy

Every request carries its own audio (generated here: 16 kHz mono 16-bit WAV, unique per request,
so the server's multimodal and prefix caches never turn a request into a cache hit), streams its
answer, and is timed: time to the first streamed chunk (counted even when its text is empty: a
weightless model decodes most ids to ""), total latency, output tokens from the final usage chunk.
A run is bounded in count (--requests) and time (--max-seconds: no new request after it) and
only ever targets this host (127.0.0.1 / localhost / ::1).

Every run also counts how many distinct token sequences its requests produced (vLLM's
`return_token_ids`). With random (dummy) weights, greedy requests all decode the same tokens,
every token of a step routes to the same few experts and the step reads a fraction of the
weights: such a run is ~1.45x too fast. A level whose requests produced fewer distinct sequences
than a quarter of them is marked `collapsed` and named in a warning; never publish its figures.

The JSON holds `meta` (settings, host) and one entry of `runs` per level with throughput
(captions/s, audio-seconds/s, output tokens/s), latency / ttft / tpot percentiles and every
request's own timings. Progress goes to stderr; results to --output (or stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the kit's captioner package

from captioner.payload import SAMPLE_RATE, chat_request, data_url, wav_bytes

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUDIO_KINDS = ("speechlike", "tone", "noise")


# --- audio ------------------------------------------------------------------------------------


def make_audio(seconds: float, kind: str = "speechlike", seed: int = 0) -> np.ndarray:
    """Mono int16 samples at 16 kHz. `seed` makes each clip's bytes (and so its hash) unique."""
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    if kind == "tone":
        freq = 220.0 + 20.0 * (seed % 20)
        x = 0.3 * np.sin(2 * np.pi * freq * t)
    elif kind == "noise":
        x = 0.1 * rng.standard_normal(n)
    elif kind == "speechlike":
        # Voiced "syllables": a wandering pitch with harmonics, 4 Hz syllable envelope, pauses.
        pitch = 120.0 + 30.0 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.28))
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
        envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6.28)), 0, None) ** 2
        pauses = (np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6.28)) > -0.7).astype(np.float32)
        x = 0.25 * voiced * envelope * pauses + 0.01 * rng.standard_normal(n)
    else:
        raise ValueError(f"unknown audio kind {kind!r}; one of {', '.join(AUDIO_KINDS)}")
    samples = np.clip(x, -1.0, 1.0) * 32767
    out = samples.astype(np.int16)
    out[:8] = rng.integers(-64, 64, 8)  # unique bytes even for the deterministic kinds
    return out


def make_wav(seconds: float, kind: str = "speechlike", seed: int = 0) -> bytes:
    return wav_bytes(make_audio(seconds, kind, seed).astype("<i2").tobytes())


_HEAD = 96  # bytes of WAV made unique per request; a multiple of 3, so base64 parts concatenate
_BASES: dict[tuple[float, str, int], tuple[bytes, str]] = {}


def audio_data_url(seconds: float, kind: str, seed: int) -> str:
    """A WAV data: URL, unique per `seed`, in ~1 ms: clips are made once per (length, kind,
    seed % 4); a request rewrites the first samples and re-encodes only that head."""
    key = (seconds, kind, seed % 4)
    if key not in _BASES:
        data = make_wav(seconds, kind, seed % 4)
        _BASES[key] = (data[:_HEAD], base64.b64encode(data[_HEAD:]).decode("ascii"))
    head, tail = _BASES[key]
    if len(head) > 44:
        noise = np.random.default_rng(seed).integers(-64, 64, (len(head) - 44) // 2).astype("<i2")
        head = head[:44] + noise.tobytes() + head[44 + 2 * len(noise) :]
    return data_url(head) + tail


# --- one request --------------------------------------------------------------------------------


@dataclass
class Settings:
    base_url: str
    model: str = ""
    seconds: float = 30.0
    audio_kind: str = "speechlike"
    max_tokens: int = 400
    ignore_eos: bool = True
    greedy: bool = False
    timeout: float = 600.0
    api_key: str | None = None
    seed: int = 0


@dataclass
class RequestResult:
    index: int
    start: float  # seconds since the run's start
    ok: bool = False
    ttft: float | None = None  # first streamed chunk
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    sequence: str | None = None  # digest of the output token ids, when the server returns them
    error: str | None = None


def request_body(settings: Settings, audio_url: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"return_token_ids": True}
    if settings.ignore_eos:
        fields["ignore_eos"] = True
    if settings.greedy:
        fields["temperature"] = 0.0
    return chat_request(audio_url, settings.model, settings.max_tokens, stream=True, **fields)


async def one_request(
    session: aiohttp.ClientSession, settings: Settings, index: int, t0: float
) -> RequestResult:
    audio = audio_data_url(settings.seconds, settings.audio_kind, settings.seed + index)
    body = request_body(settings, audio)
    started = time.perf_counter()
    result = RequestResult(index=index, start=started - t0)
    try:
        async with session.post(settings.base_url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                result.error = f"HTTP {resp.status}: {text}"
                return result
            buffer = b""
            token_ids: list[int] = []
            async for raw in resp.content:
                buffer += raw
                if not buffer.endswith(b"\n"):
                    continue
                line, buffer = buffer.strip(), b""
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = f"stream error: {str(event['error'])[:300]}"
                    return result
                if event.get("choices"):
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - started
                    result.chunks += 1
                    token_ids.extend(event["choices"][0].get("token_ids") or ())
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.latency = time.perf_counter() - started
        if result.ttft is None:
            result.error = "no streamed chunk"
        else:
            result.ok = True
            if not result.output_tokens:  # a server without usage in the stream: count chunks
                result.output_tokens = result.chunks
            if token_ids:
                result.sequence = hashlib.sha256(repr(token_ids).encode()).hexdigest()[:16]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


# --- loops --------------------------------------------------------------------------------------


def _session(settings: Settings, connections: int) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=settings.timeout),
        connector=aiohttp.TCPConnector(limit=max(connections, 1)),
    )


async def closed_loop(
    settings: Settings, concurrency: int, requests: int, max_seconds: float
) -> tuple[list[RequestResult], float]:
    """`concurrency` workers, each sending its next request when the last one ends."""
    results: list[RequestResult] = []
    counter = iter(range(requests))
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in counter:
            if time.perf_counter() >= deadline:
                return
            results.append(await one_request(session, settings, index, t0))

    async with _session(settings, concurrency) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def open_loop(
    settings: Settings, rate: float, requests: int, max_seconds: float
) -> tuple[list[RequestResult], float]:
    """Poisson arrivals at `rate` per second, whatever the server's pace."""
    rng = random.Random(settings.seed)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []
    async with _session(settings, requests) as session:
        at = 0.0
        for index in range(requests):
            if at >= max_seconds:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, settings, index, t0)))
            at += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - t0


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def distribution(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": float(np.mean(values)) if values else None,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def distinct_sequences(results: list[RequestResult]) -> int | None:
    """How many different token sequences the successful requests produced (None: not returned)."""
    sequences = [r.sequence for r in results if r.ok]
    if not sequences or None in sequences:
        return None
    return len(set(sequences))


def collapsed(ok: int, distinct: int | None) -> bool:
    """Fewer distinct sequences than a quarter of the requests: the batch decoded the same tokens."""
    return distinct is not None and ok >= 4 and distinct * 4 < ok


def summarize(
    results: list[RequestResult], wall: float, settings: Settings, **level: Any
) -> dict[str, Any]:
    """One level's numbers. Throughput is over the whole level: first send to last answer."""
    ok = [r for r in results if r.ok]
    done = [r.start + (r.latency or 0.0) for r in ok]
    span = (max(done) - min(r.start for r in results)) if ok else wall
    span = span if span > 0 else wall
    tokens = sum(r.output_tokens for r in ok)
    tpot = [
        (r.latency - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.latency is not None and r.ttft is not None and r.output_tokens > 1
    ]
    distinct = distinct_sequences(results)
    return {
        **level,
        "requests": len(results),
        "ok": len(ok),
        "distinct_sequences": distinct,
        "collapsed": collapsed(len(ok), distinct),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "span_s": span,
        "captions_per_s": len(ok) / span if span > 0 else 0.0,
        "audio_s_per_s": len(ok) * settings.seconds / span if span > 0 else 0.0,
        "output_tokens_per_s": tokens / span if span > 0 else 0.0,
        "output_tokens": tokens,
        "prompt_tokens_mean": (sum(r.prompt_tokens for r in ok) / len(ok)) if ok else None,
        "latency_s": distribution([r.latency for r in ok if r.latency is not None]),
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": distribution(tpot),
        "per_request": [asdict(r) for r in sorted(results, key=lambda r: r.index)],
    }


# --- entry points ---------------------------------------------------------------------------------


def check_local(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{base_url}: the load generator only targets this host (http://127.0.0.1:PORT)")
    return base_url.rstrip("/")


async def served_model(settings: Settings) -> str:
    async with _session(settings, 1) as session:
        async with session.get(settings.base_url + "/v1/models") as resp:
            resp.raise_for_status()
            data = await resp.json()
    return str(data["data"][0]["id"])


@dataclass
class Plan:
    mode: str  # closed | open
    levels: list[float]  # concurrencies or rates
    requests: int | None = None
    requests_per_slot: float = 3.0
    min_requests: int = 8
    max_seconds: float = 120.0
    meta: dict[str, Any] = field(default_factory=dict)


def level_requests(plan: Plan, level: float) -> int:
    if plan.requests is not None:
        return plan.requests
    return max(plan.min_requests, int(math.ceil(plan.requests_per_slot * level)))


async def run_plan(settings: Settings, plan: Plan, progress: bool = False) -> dict[str, Any]:
    settings.base_url = check_local(settings.base_url)
    if not settings.model:
        settings.model = await served_model(settings)
    runs = []
    for i, level in enumerate(plan.levels):
        n = level_requests(plan, level)
        # A fresh seed range per level: no clip is ever sent twice in one run.
        level_settings = Settings(**{**asdict(settings), "seed": settings.seed + i * 1_000_000})
        if plan.mode == "closed":
            results, wall = await closed_loop(level_settings, int(level), n, plan.max_seconds)
            summary = summarize(results, wall, settings, mode="closed", concurrency=int(level))
        else:
            results, wall = await open_loop(level_settings, float(level), n, plan.max_seconds)
            summary = summarize(results, wall, settings, mode="open", rate=float(level))
        runs.append(summary)
        if progress:
            print(one_line(summary), file=sys.stderr, flush=True)
            if summary["collapsed"]:
                print(collapse_warning(summary), file=sys.stderr, flush=True)
    return {"meta": run_meta(settings, plan), "runs": runs}


def run_meta(settings: Settings, plan: Plan) -> dict[str, Any]:
    meta = {k: v for k, v in asdict(settings).items() if k != "api_key"}
    meta.update(
        mode=plan.mode,
        levels=plan.levels,
        max_seconds=plan.max_seconds,
        host=platform.node(),
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    meta.update(plan.meta)
    return meta


def one_line(run: dict[str, Any]) -> str:
    level = f"c={run['concurrency']}" if run["mode"] == "closed" else f"rate={run['rate']:g}/s"
    lat, ttft = run["latency_s"], run["ttft_s"]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    distinct = "?" if run["distinct_sequences"] is None else run["distinct_sequences"]
    return (
        f"{level:>10} n={run['requests']:<4} err={run['errors']:<3} "
        f"{run['captions_per_s']:6.2f} cap/s {run['output_tokens_per_s']:8.0f} tok/s "
        f"p50 {f(lat['p50'])} p95 {f(lat['p95'])} p99 {f(lat['p99'])} s  "
        f"ttft p50 {f(ttft['p50'])} p95 {f(ttft['p95'])} s  distinct {distinct}/{run['ok']}"
        + ("  COLLAPSED" if run["collapsed"] else "")
    )


def collapse_warning(run: dict[str, Any]) -> str:
    return (f"loadgen: WARNING: {run['ok']} requests produced only {run['distinct_sequences']} distinct "
            "token sequences: the batch collapsed (greedy on random weights?), so its speed is not a "
            "real caption load's; do not publish these figures")


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None
    if not levels or any(x <= 0 for x in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers")
    return levels


def parse_meta(items: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--meta {item!r}: expected KEY=VALUE")
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadgen.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8003", help="the service (this host only)")
    p.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--concurrency", "-c", type=int, help="closed loop: requests in flight")
    how.add_argument("--sweep", type=parse_levels, help="closed loop at each concurrency, e.g. 8,32,64")
    how.add_argument("--rate", type=parse_levels, help="open loop: Poisson arrivals per second (list ok)")
    p.add_argument("--requests", "-n", type=int, help="requests per level (default: per-slot rule)")
    p.add_argument("--requests-per-slot", type=float, default=3.0,
                   help="without --requests: concurrency (or rate) x this many requests per level")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0, help="no new request after this, per level")
    p.add_argument("--seconds", type=float, default=30.0, help="audio length per request")
    p.add_argument("--audio", choices=AUDIO_KINDS, default="speechlike")
    p.add_argument("--max-tokens", type=int, default=400, help="caption length in tokens")
    p.add_argument("--no-ignore-eos", action="store_true", help="let captions end at EOS (lengths vary)")
    p.add_argument("--greedy", action="store_true",
                   help="temperature 0 (default: the server's sampling); on random weights every request "
                        "then decodes the same tokens: never for speed figures")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--api-key", default=os.environ.get("CAPTIONER_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name of this run (plots use it)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="extra metadata")
    p.add_argument("--output", "-o", help="JSON file (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = parse_meta(args.meta)
    except argparse.ArgumentTypeError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    if args.label:
        meta["label"] = args.label
    if args.rate:
        plan = Plan("open", args.rate)
    else:
        plan = Plan("closed", args.sweep or [float(args.concurrency or 1)])
    plan.requests, plan.requests_per_slot = args.requests, args.requests_per_slot
    plan.min_requests, plan.max_seconds, plan.meta = args.min_requests, args.max_seconds, meta
    settings = Settings(
        base_url=args.base_url, model=args.model, seconds=args.seconds, audio_kind=args.audio,
        max_tokens=args.max_tokens, ignore_eos=not args.no_ignore_eos, greedy=args.greedy,
        timeout=args.timeout, api_key=args.api_key, seed=args.seed,
    )
    try:
        result = asyncio.run(run_plan(settings, plan, progress=True))
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as exc:
        print(f"loadgen: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    text = json.dumps(result, indent=1)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0 if all(r["errors"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
