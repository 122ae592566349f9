#!/usr/bin/env python3
"""Warm a freshly started caption server up: one request alone, then N at once.

Usage: tools/warm_up.py --base-url http://127.0.0.1:8003 --requests N [--seconds 30]
                        [--max-tokens 32] [--rounds 1] [--api-key KEY] [--unix-socket PATH]

start_service.sh runs it after /health when WARMUP_REQUESTS > 0, with the Python that runs vLLM,
so it needs nothing beyond the standard library (the request and its WAV come from the kit's
captioner/payload.py, which needs no more). The first requests after a start pay one-off
costs (the audio encoder's first batches, the sampler and the media decoder's first calls); a
warm-up takes them before users come. Each request carries its own 30 s clip (unique bytes, so no
server cache turns it into a hit) and asks for a short, fixed-length caption (ignore_eos).
The key is --api-key, else $CAPTIONER_API_KEY, $VLLM_API_KEY or $API_KEY. With --unix-socket
the requests go through that socket (a server started with UNIX_SOCKET); --base-url then gives only
the Host header (http://localhost).
Prints one line per wave; exits 0 when every request succeeded, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The kit's root, for captioner/payload.py: the Python that runs vLLM need not have the client
# installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioner.payload import SAMPLE_RATE, chat_request, data_url, wav_bytes


def base_clip(seconds: float) -> array:
    """A harmonic tone with a 4 Hz syllable envelope: speech-like enough for the encoder."""
    n = int(seconds * SAMPLE_RATE)
    out = array("h", bytes(2 * n))
    for i in range(n):
        t = i / SAMPLE_RATE
        env = max(0.0, math.sin(2 * math.pi * 4 * t)) ** 2
        ph = 2 * math.pi * 140 * t
        out[i] = int(6000 * env * (math.sin(ph) + 0.5 * math.sin(2 * ph) + 0.3 * math.sin(3 * ph)))
    return out


def unique_wav(clip: array, index: int) -> bytes:
    samples = array("h", clip)
    samples[0], samples[1] = index % 32768, index // 32768 % 32768  # unique bytes per request
    if sys.byteorder != "little":
        samples.byteswap()
    return wav_bytes(samples.tobytes())


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket: the host given is the Host header's, the socket is the path."""

    def __init__(self, path: str, host: str, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class HTTPStatusError(Exception):
    """An answer other than 2xx."""


def call(args: argparse.Namespace, path: str, body: dict | None, timeout: float) -> dict:
    url = urllib.parse.urlsplit(args.base_url)
    conn: http.client.HTTPConnection
    if args.unix_socket:
        conn = UnixHTTPConnection(args.unix_socket, url.netloc or "localhost", timeout)
    elif url.scheme == "https":
        conn = http.client.HTTPSConnection(url.netloc, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(url.netloc, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    try:
        conn.request("GET" if body is None else "POST", url.path + path,
                     None if body is None else json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        raise HTTPStatusError(f"HTTP {resp.status} {resp.reason} from {path}")
    return json.loads(data)


def caption(args: argparse.Namespace, model: str, clip: array, index: int) -> str | None:
    body = chat_request(data_url(unique_wav(clip, index)), model, args.max_tokens, ignore_eos=True)
    try:
        call(args, "/v1/chat/completions", body, args.timeout)
        return None
    except (http.client.HTTPException, HTTPStatusError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="warm_up.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8003")
    p.add_argument("--requests", type=int, required=True, help="requests in the concurrent wave")
    p.add_argument("--seconds", type=float, default=30.0, help="audio per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="concurrent waves after the single request")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--api-key", default=os.environ.get("CAPTIONER_API_KEY")
                   or os.environ.get("VLLM_API_KEY") or os.environ.get("API_KEY") or None)
    p.add_argument("--unix-socket", metavar="PATH",
                   help="send the requests through this UNIX socket (the server's UNIX_SOCKET)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.seconds <= 0 or args.max_tokens < 1 or args.rounds < 0:
        print("warm_up: --requests, --seconds, --max-tokens must be positive", file=sys.stderr)
        return 2
    args.base_url = args.base_url.rstrip("/")
    where = f"unix:{args.unix_socket}" if args.unix_socket else args.base_url
    try:
        model = call(args, "/v1/models", None, 30)["data"][0]["id"]
    except (http.client.HTTPException, HTTPStatusError, OSError, ValueError, KeyError, IndexError,
            TypeError) as exc:
        print(f"warm_up: cannot list models at {where}: {exc}", file=sys.stderr)
        return 1
    clip = base_clip(args.seconds)
    failures = 0
    index = 0
    for size in [1] + [args.requests] * args.rounds:
        started = time.monotonic()
        with ThreadPoolExecutor(size) as pool:
            errors = [e for e in pool.map(lambda i: caption(args, model, clip, i),
                                          range(index, index + size)) if e]
        index += size
        failures += len(errors)
        print(f"warm_up: {size} concurrent request(s) of {args.seconds:g} s audio, "
              f"{args.max_tokens} tokens: {time.monotonic() - started:.2f} s, {len(errors)} failed"
              + (f" ({errors[0]})" if errors else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
