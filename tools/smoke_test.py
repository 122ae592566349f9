#!/usr/bin/env python3
"""Prove an install end to end with the kit's own scripts: start, status, a caption, the refusals
that keep the engine alive, stop. Run it on the GPU host after `make install` (docs/GPU.md).

Usage: tools/smoke_test.py [--config FILE] [--clip FILE]

With the settings the scripts read (config.env < the environment, or --config FILE) it runs, in
order, and prints one line each (a Markdown table row, for docs/GPU.md):
  1. ./start_service.sh, timed           6. each field vLLM rejects (min_tokens > max_tokens,
  2. ./status_service.sh                    top_logprobs 1000, temperature 9, n 17, stop_token_ids
  3. python3 test_client.py CLIP            past the vocabulary), then the same clip again: 4xx,
  4. an image part beside the audio: 400    then 200 each time (no multimodal-cache drift)
  5. /health still 200                   7. ./stop_service.sh, timed; what is left of the service
Exits 0 when every step did what it should, 1 otherwise. The service must not be running before.
Standard library only (the kit's captioner/payload.py): it runs with the Python that runs vLLM.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioner.config import ConfigError, load  # noqa: E402
from captioner.payload import chat_request, data_url  # noqa: E402

# A 1x1 PNG: the smallest image part.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def rejections(vocab: int) -> dict[str, dict[str, Any]]:
    """Fields the guard may pass to vLLM that vLLM rejects (issue #21's reproducers)."""
    return {
        "min_tokens > max_tokens": {"min_tokens": 20, "max_tokens": 10},
        "top_logprobs 1000": {"logprobs": True, "top_logprobs": 1000},
        "temperature 9": {"temperature": 9},
        "n 17": {"n": 17},
        "stop_token_ids past the vocabulary": {"stop_token_ids": [vocab + 1000]},
    }


class Smoke:
    def __init__(self, settings: dict[str, str], clip: Path, config: str | None) -> None:
        self.settings = settings
        self.base = f"http://127.0.0.1:{settings['PORT']}"
        self.key = settings["API_KEY"]
        self.model = settings["SERVED_MODEL_NAME"]
        self.audio = data_url(clip.read_bytes())
        self.clip = clip
        self.config = ["--config", config] if config else []
        self.failed = 0

    def row(self, step: str, result: str, ok: bool) -> None:
        self.failed += not ok
        print(f"| {step} | {result}{'' if ok else ' **(unexpected)**'} |", flush=True)

    def script(self, name: str) -> tuple[int, float, str]:
        t0 = time.monotonic()
        r = subprocess.run([str(ROOT / name), *self.config], capture_output=True, text=True)
        return r.returncode, time.monotonic() - t0, (r.stdout + r.stderr).strip()

    def post(self, body: dict[str, Any]) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.base + "/v1/chat/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")[:160].replace("\n", " ").replace("|", "/")

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def caption(self, **fields: Any) -> tuple[int, str]:
        return self.post({**chat_request(self.audio, self.model, max_tokens=64), **fields})

    def run(self) -> int:
        code, took, out = self.script("start_service.sh")
        last = out.splitlines()[-1] if out else ""
        self.row("`./start_service.sh`", f"exit {code} in {took:.0f} s: {last}", code == 0)
        if code:
            print(out, file=sys.stderr)
            return 1
        code, _, out = self.script("status_service.sh")
        self.row("`./status_service.sh`", f"exit {code}: {' / '.join(out.splitlines())}", code == 0)
        env = {**os.environ, "CAPTIONER_API_KEY": self.key}
        if self.config:
            env["CAPTIONER_CONFIG"] = self.config[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(ROOT / "test_client.py"), "--format", "json",
                            str(self.clip)], capture_output=True, text=True, env=env)
        caption = r.stdout.strip().replace("\n", " ")[:120].replace("|", "/")
        took, shown = time.monotonic() - t0, caption or r.stderr.strip()[-200:]
        self.row(f"`test_client.py {self.clip.name}`", f"exit {r.returncode} in {took:.1f} s: {shown}",
                 r.returncode == 0)
        body = chat_request(self.audio, self.model, max_tokens=16)
        image = {"type": "image_url", "image_url": {"url": data_url(PNG, "image/png")}}
        body["messages"][0]["content"].append(image)
        code, text = self.post(body)
        self.row("an image part beside the audio", f"{code} {text}", code == 400)
        self.row("`/health` after the refusal", str(self.health()), self.health() == 200)
        vocab = json.loads(self.model_config().read_text())["thinker_config"]["text_config"]["vocab_size"]
        for what, fields in rejections(vocab).items():
            bad, text = self.caption(**fields)
            good, _ = self.caption()
            self.row(f"{what}, then the same clip", f"{bad} {text[:100]} / then {good}",
                     400 <= bad < 500 and good == 200)
        self.row("`/health` after the rejections", str(self.health()), self.health() == 200)
        code, took, out = self.script("stop_service.sh")
        self.row("`./stop_service.sh`", f"exit {code} in {took:.0f} s: {' / '.join(out.splitlines()[-2:])}",
                 code == 0)
        return 1 if self.failed else 0

    def model_config(self) -> Path:
        path = Path(self.settings["MODEL_PATH"])
        return (path if path.is_absolute() else ROOT / path) / "config.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="the config file the scripts read (default: config.env)")
    ap.add_argument("--clip", type=Path, default=ROOT / "samples" / "sample.wav", help="a WAV file")
    args = ap.parse_args(argv)
    try:
        settings = load(os.environ, args.config)
    except ConfigError as exc:
        print(f"smoke_test: {exc}", file=sys.stderr)
        return 2
    print("| step | result |\n|---|---|", flush=True)
    return Smoke(settings, args.clip, args.config).run()


if __name__ == "__main__":
    sys.exit(main())
