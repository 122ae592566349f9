#!/usr/bin/env python3
"""Peak memory (RSS) and threads of test_client.py on a batch of long WAVs.

Usage: tools/measure_client_memory.py [--kit DIR] [--files 40] [--minutes 7] [--delay 1.0] [--work DIR]

Writes FILES WAVs of MINUTES each (16 kHz mono, a tone with pauses) into WORK (reused when
present), serves captions from a local stand-in server that answers each request after DELAY
seconds (the client's memory does not depend on what the model says, and the real model would
take the 2 cores this is measured on), runs the client of the kit in DIR (default: this one) on
the folder at its default concurrency (the kit's config.env: MAX_NUM_SEQS), and samples
/proc/PID/status every 0.1 s. Prints one line: peak RSS, peak threads, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    delay = 1.0
    protocol_version = "HTTP/1.1"

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
        time.sleep(self.delay)
        self._send({"model": "stub", "choices": [{"message": {"content": "a tone"}}],
                    "usage": {"prompt_tokens": 390, "completion_tokens": 2, "total_tokens": 392}})


def status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, Threads) of a live process; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields.get("VmRSS", "0 kB").split()[0]), int(fields.get("Threads", "0"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, default=KIT)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/captioner-memory"))
    args = p.parse_args()
    folder = args.work / "wavs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.files):
        path = folder / f"{i:02d}.wav"
        if not path.exists():
            write_long_wav(path, args.minutes, 200 + 10 * i)
    Stub.delay = args.delay
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    out = args.work / "out.jsonl"
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env["CAPTIONER_CONFIG"] = str(args.kit / "config.env")  # the shipped defaults: MAX_NUM_SEQS=128
    command = [sys.executable, str(args.kit / "test_client.py"), str(folder), "-o", str(out),
               "--base-url", f"http://127.0.0.1:{httpd.server_address[1]}"]
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_threads = 0
    while proc.poll() is None:
        rss, threads = status(proc.pid)
        peak_rss, peak_threads = max(peak_rss, rss), max(peak_threads, threads)
        time.sleep(0.1)
    wall = time.monotonic() - started
    err = proc.stderr.read() if proc.stderr else ""
    httpd.shutdown()
    lines = out.read_text().splitlines() if out.exists() else []
    print(f"{args.kit}: exit {proc.returncode}, {len(lines)} records, peak RSS {peak_rss / 1024:.0f} MiB, "
          f"peak threads {peak_threads}, {wall:.0f} s; {err.strip().splitlines()[-1] if err.strip() else ''}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
