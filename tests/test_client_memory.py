"""Bounded memory: inputs are read, and long inputs' windows encoded, no further ahead than
requests are in flight (the figures are in docs/PERFORMANCE.md, tools/measure_client_memory.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

import captioner.audio
from captioner.cli import main
from captioner.errors import ExitCode
from tests.test_client_support import StubServer, tone, write_wav

pytestmark = pytest.mark.usefixtures("client_env_cleared")


def test_a_long_files_windows_are_encoded_only_as_requests_free_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(60))  # twelve 5 s windows
    encoded = 0
    lock = threading.Lock()
    real = captioner.audio.wav_bytes

    def counting(pcm: Any) -> bytes:
        nonlocal encoded
        with lock:
            encoded += 1
        return real(pcm)

    monkeypatch.setattr(captioner.audio, "wav_bytes", counting)
    seen: list[int] = []
    with StubServer(delay=0.2, on_request=lambda body: seen.append(encoded)) as stub:
        code = main([str(clip), "--base-url", stub.base_url, "-c", "1", "--segment-seconds", "5",
                     "-f", "json"])  # fmt: skip
    assert code == ExitCode.OK and len(seen) == 12
    # When request k arrives, at most k + 1 windows exist: the one in flight and one read ahead
    # (concurrency 1 plus one reader), not all twelve at once.
    assert all(count <= k + 1 for k, count in enumerate(seen, 1)), seen


def test_inputs_are_read_no_further_ahead_than_requests_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        write_wav(folder / f"{i:02d}.wav", tone(0.5, 200 + 10 * i))
    import captioner.batch

    loaded = 0
    lock = threading.Lock()
    real = captioner.batch.load_bytes

    def counting(*args: Any) -> bytes:
        nonlocal loaded
        with lock:
            loaded += 1
        return real(*args)

    monkeypatch.setattr(captioner.batch, "load_bytes", counting)
    seen: list[int] = []
    with StubServer(delay=0.05, on_request=lambda body: seen.append(loaded)) as stub:
        code = main([str(folder), "--base-url", stub.base_url, "-c", "2", "-f", "jsonl"])
    assert code == ExitCode.OK and len(seen) == 40
    # Request k arrives once k inputs were read; at most 2 (concurrency) + the readers more.
    readers = max(4, 2 * (os.cpu_count() or 2))  # as batch.run_batch picks them
    assert all(count <= k + 2 + readers for k, count in enumerate(seen, 1)), seen
    assert max(count - k for k, count in enumerate(seen, 1)) < 40 - 2 * readers
