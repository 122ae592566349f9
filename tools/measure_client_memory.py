#!/usr/bin/env python3
"""Peak memory (RSS) and threads of test_client.py on a batch of long WAVs.

Usage: tools/measure_client_memory.py [--kit DIR] [--files 40] [--minutes 7] [--delay 0]
                                      [--concurrency N] [--work DIR] [--json]

Writes FILES WAVs of MINUTES each (16 kHz mono, a tone with pauses) into a temporary folder (or
WORK, reused when it holds them), serves captions from a local stand-in server that answers each
request after DELAY seconds (default 0: at once; the client's memory does not depend on what the
model says, and the real model would take the cores this is measured on; a DELAY of a few seconds
keeps every request slot full instead), runs the client of the kit in DIR (default: this one) on
the folder at its default concurrency (the kit's config.env: MAX_NUM_SEQS, 128) or --concurrency,
and samples /proc/PID/status every 0.05 s. Prints one line: peak RSS, peak threads, requests at
once, wall time (with --json, one JSON object). Exit 0 when the client exited 0 and captioned every
file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the kit's captioner package

from captioner.payload import SAMPLE_RATE, wav_bytes

KIT = Path(__file__).resolve().parent.parent


def write_long_wav(path: Path, minutes: float, freq: float) -> None:
    seconds = int(minutes * 60)
    tone = np.sin(2 * np.pi * freq * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    loudness = np.where(np.arange(seconds) % 11 == 10, 0.0, 0.4)  # a quiet second now and then
    pcm = (np.outer(loudness, tone) * 32767).astype("<i2")
    path.write_bytes(wav_bytes(pcm.tobytes()))


class Stub(BaseHTTPRequestHandler):
    delay = 0.0
    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    in_flight = 0
    peak_in_flight = 0

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "stub"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with Stub.lock:
            Stub.in_flight += 1
            Stub.peak_in_flight = max(Stub.peak_in_flight, Stub.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            self._send({"model": "stub", "choices": [{"message": {"content": "a tone"}}],
                        "usage": {"prompt_tokens": 390, "completion_tokens": 2, "total_tokens": 392}})
        finally:
            with Stub.lock:
                Stub.in_flight -= 1


def status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, Threads) of a live process; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields.get("VmRSS", "0 kB").split()[0]), int(fields.get("Threads", "0"))


def measure(args: argparse.Namespace, work: Path) -> dict[str, object]:
    folder = work / "wavs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.files):
        path = folder / f"{i:02d}.wav"
        if not path.exists():
            write_long_wav(path, args.minutes, 200 + 10 * i)
    Stub.delay = args.delay
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    out = work / "out.jsonl"
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env["CAPTIONER_CONFIG"] = str(args.kit / "config.env")  # the shipped defaults: MAX_NUM_SEQS=128
    command = [sys.executable, str(args.kit / "test_client.py"), str(folder), "-o", str(out),
               "--base-url", f"http://127.0.0.1:{httpd.server_address[1]}"]
    if args.concurrency:
        command += ["--concurrency", str(args.concurrency)]
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_threads = 0
    while proc.poll() is None:
        rss, threads = status(proc.pid)
        peak_rss, peak_threads = max(peak_rss, rss), max(peak_threads, threads)
        time.sleep(0.05)
    wall = time.monotonic() - started
    err = proc.stderr.read() if proc.stderr else ""
    httpd.shutdown()
    httpd.server_close()
    records = out.read_text().splitlines() if out.exists() else []
    return {
        "kit": str(args.kit), "files": args.files, "minutes": args.minutes, "delay": args.delay,
        "exit": proc.returncode, "records": len(records), "peak_rss_mib": round(peak_rss / 1024, 1),
        "peak_threads": peak_threads, "peak_requests": Stub.peak_in_flight, "wall_s": round(wall, 1),
        "cpus": os.cpu_count(), "last_line": err.strip().splitlines()[-1] if err.strip() else "",
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, default=KIT)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, help="default: the client's own (MAX_NUM_SEQS, 128)")
    p.add_argument("--work", type=Path, help="keep the WAVs here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.work is not None:
        result = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="captioner-memory-") as work:
            result = measure(args, Path(work))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['kit']}: {args.files} x {args.minutes:g} min, delay {args.delay:g} s: exit "
              f"{result['exit']}, {result['records']} records, peak RSS {result['peak_rss_mib']:.0f} MiB, "
              f"peak threads {result['peak_threads']}, {result['peak_requests']} requests at once, "
              f"{result['wall_s']:.0f} s; {result['last_line']}")  # fmt: skip
    return 0 if result["exit"] == 0 and result["records"] == args.files else 1


if __name__ == "__main__":
    sys.exit(main())
