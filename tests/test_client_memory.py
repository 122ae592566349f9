"""Bounded memory: inputs are read, and long inputs' windows encoded, no further ahead than
requests are in flight (the figures are in docs/PERFORMANCE.md, tools/measure_client_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import captioner.audio
from captioner.cli import main
from captioner.errors import ExitCode
from tests.test_client_support import SR, StubServer, tone, write_wav

REPO = Path(__file__).resolve().parent.parent

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
    real = captioner.batch.open_media

    def counting(*args: Any) -> Any:
        nonlocal loaded
        with lock:
            loaded += 1
        return real(*args)

    monkeypatch.setattr(captioner.batch, "open_media", counting)
    seen: list[int] = []
    with StubServer(delay=0.05, on_request=lambda body: seen.append(loaded)) as stub:
        code = main([str(folder), "--base-url", stub.base_url, "-c", "2", "-f", "jsonl"])
    assert code == ExitCode.OK and len(seen) == 40
    # Request k arrives once k inputs were read; at most 2 (concurrency) + the readers more.
    readers = min(captioner.audio.DECODE_WORKERS, 2)  # as batch.run_batch picks them
    assert all(count <= k + 2 + readers for k, count in enumerate(seen, 1)), seen
    assert max(count - k for k, count in enumerate(seen, 1)) < 40 - 2 * readers


# --- memory bounded whatever the batch, the concurrency and the cores (issue #20, item 4) ------------

PEAK_RSS_MIB = 130  # 6 x 2-minute WAVs, all 30 windows in flight: ~100 MiB measured; 211 MiB before #20


def test_a_batch_of_long_files_with_every_window_in_flight_peaks_under_the_bound() -> None:
    tool = REPO / "tools" / "measure_client_memory.py"
    command = [sys.executable, str(tool), "--files", "6", "--minutes", "2", "--delay", "3", "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["records"] == 6 and result["peak_requests"] >= 20  # most windows were in flight at once
    assert result["peak_rss_mib"] < PEAK_RSS_MIB, result


def test_request_bodies_held_at_once_stay_within_the_budget_at_any_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import captioner.batch

    clip = write_wav(tmp_path / "long.wav", tone(60))  # twelve 5 s windows: 213 KB bodies
    body = -(-(5 * SR * 2 + 44) // 3) * 4 + 1024
    monkeypatch.setattr(captioner.batch, "_BODIES", captioner.batch._Budget(3 * body))
    arrivals: list[float] = []
    with StubServer(delay=0.3, on_request=lambda body: arrivals.append(time.monotonic())) as stub:
        code = main([str(clip), "--base-url", stub.base_url, "-c", "12", "--segment-seconds", "5",
                     "-f", "json"])  # fmt: skip
    assert code == ExitCode.OK and len(stub.requests) == 12
    # A request is at the server for 0.3 s: at most three at once (twelve request threads, three
    # bodies' worth of budget), so no fourth arrives within 0.25 s of three others.
    peak = max(sum(1 for a in arrivals if a <= t < a + 0.25) for t in arrivals)
    assert peak == 3


def test_decode_workers_are_at_most_four_on_any_core_count_and_never_more_than_the_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = "import os; os.cpu_count = lambda: 64; import captioner.audio as a; print(a.DECODE_WORKERS)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout == "4\n"  # fmt: skip
    import captioner.batch

    monkeypatch.setattr(captioner.batch, "DECODE_WORKERS", 64)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        write_wav(folder / f"{i}.wav", tone(0.5, 200 + 10 * i))
    readers: list[int] = []

    def seen(body: object) -> None:
        readers.append(sum(1 for t in threading.enumerate() if t.name.startswith("captioner-item")))

    before = sum(1 for t in threading.enumerate() if t.name.startswith("captioner-item"))
    with StubServer(on_request=seen) as stub:
        assert main([str(folder), "--base-url", stub.base_url, "-c", "1", "-f", "jsonl"]) == ExitCode.OK
    assert len(readers) == 6 and max(readers) - before <= 1
