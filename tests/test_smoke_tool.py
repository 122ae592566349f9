"""tools/smoke_test.py, the install check docs/GPU.md runs on a GPU, here on the CPU build: it starts
the service with the kit's scripts, captions, gets every refusal it expects with the engine still
serving, and stops, leaving nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ROOT, free_port, service_env

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_smoke_test_runs_start_caption_refusals_and_stop_on_the_tiny_model(tmp_path: Path) -> None:
    env = service_env(tmp_path / "logs", free_port())
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_test.py")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 12 and not any("unexpected" in row for row in rows), r.stdout
    assert "then 200 |" in rows[5] and "stop_token_ids must be token ids from 0 to" in rows[9]
    assert rows[-1].startswith("| `./stop_service.sh` | exit 0")
    assert not (tmp_path / "logs" / "service.pid").exists()


def test_smoke_test_fails_when_the_service_cannot_start(tmp_path: Path) -> None:
    env = service_env(tmp_path / "logs", free_port(), MODEL_PATH=str(tmp_path / "no-such-model"))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_test.py")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "| `./start_service.sh` | exit 1" in r.stdout and "unexpected" in r.stdout
    assert "MODEL_PATH=" in r.stderr and "no such folder" in r.stderr
