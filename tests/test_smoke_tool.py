"""tools/smoke_test.py, the install check docs/GPU.md runs on a GPU, here on the CPU build: it starts
the service with the kit's scripts, captions, gets every refusal it expects with the engine still
serving, and stops, leaving nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ROOT, Service, free_port, server_fixture, service_env

pytestmark = [pytest.mark.server, pytest.mark.slow]


def run_the_smoke_tool(svc: Service) -> None:
    svc.last_start = subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_test.py")], env=svc.env,
                                    capture_output=True, text=True, timeout=900)


# The run starts and stops a server of its own: it goes ahead, beside other tests (tests/service.py
# Starts), and the test reads what it printed.
smoke_run = server_fixture("smoke_run", start=run_the_smoke_tool, holds=False)


def test_smoke_test_runs_start_caption_refusals_and_stop_on_the_tiny_model(smoke_run: Service) -> None:
    r = smoke_run.last_start
    assert r is not None
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 12 and not any("unexpected" in row for row in rows), r.stdout
    assert "then 200 |" in rows[5] and "stop_token_ids must be token ids from 0 to" in rows[9]
    assert rows[-1].startswith("| `./stop_service.sh` | exit 0")
    assert not smoke_run.pid_file.exists()


def test_smoke_test_fails_when_the_service_cannot_start(tmp_path: Path) -> None:
    env = service_env(tmp_path / "logs", free_port(), MODEL_PATH=str(tmp_path / "no-such-model"))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_test.py")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "| `./start_service.sh` | exit 1" in r.stdout and "unexpected" in r.stdout
    assert "MODEL_PATH=" in r.stderr and "no such folder" in r.stderr
