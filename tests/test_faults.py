"""Faults against the real server, each survived with nothing lost: kill -9 of the engine, SIGTERM
under load (the drain window lets in-flight captions finish), an unwritable log folder, and a
server restarted under a running batch (the client's retries carry it through).

Covered elsewhere: kill -9 of the API server, concurrent starts, stale and reused PID files
(test_service_lifecycle.py); a port already taken (tests/bats/start_service.bats); a batch
interrupted and resumed (test_client_server.py). The decoy standing in for the 8002 service must be
alive and unsignalled after every test here too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.service import ROOT, SAMPLE, Service, sample_folder, server_fixture
from tests.test_client_server import client_env

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.usefixtures("decoy_untouched")]

ENGINE_COMM = "VLLM::EngineCor"  # "VLLM::EngineCore", cut to 15 characters by the kernel


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def health(svc: Service) -> int | None:
    """/health's status, or None when nothing answers."""
    try:
        return requests.get(f"{svc.base_url}/health", timeout=5).status_code
    except requests.RequestException:
        return None


def kill9_of_the_engine(svc: Service) -> None:
    """What test_kill9_of_the_engine_... asserts on, done ahead beside other tests (Starts): a start,
    kill -9 of the engine, /health until it fails, status, stop, a start again and a caption, then
    a stop. What each step gave goes in `notes`."""
    notes = svc.notes
    svc.start()
    notes["processes"] = [(p, comm(p)) for p in svc.leftovers()]
    engines = notes["engines"] = [p for p, name in notes["processes"] if name.startswith(ENGINE_COMM)]
    if len(engines) != 1:
        return  # the test says what ran instead
    os.kill(engines[0], signal.SIGKILL)
    # vLLM notices a dead engine: /health answers 503, then its watchdog ends the API server.
    seen: list[int | None] = notes.setdefault("seen", [])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code = health(svc)
        if not seen or seen[-1] != code:
            seen.append(code)
        if code != 200:
            break
        time.sleep(0.2)
    notes["status"] = svc.status()
    notes["stop"] = svc.stop()
    notes["left"] = svc.leftovers()
    svc.start()
    notes["caption"] = svc.caption(SAMPLE.read_bytes()).status_code
    svc.stop()


# The client's retries back off 0, 1, 2, 4, 8, 16, 30, 30, ... s (at most 30 s each): 12 retries
# wait 211 s in all, a margin over a restart of the tiny model (65 s on a quiet 2-core machine,
# 113 s measured with three other servers starting beside it; the default 7 waits 61 s).
RESTART_RETRIES = "12"
RESTART_BATCH = 40


def restart_under_a_running_batch(svc: Service) -> None:
    """What test_server_restarted_under_... asserts on, done ahead beside other tests (Starts): a
    start, a batch of RESTART_BATCH sample copies under way, the client frozen while the service
    stops, a start again while the client runs on, the batch's end, status, then a stop. What each
    step gave goes in `notes`."""
    notes = svc.notes
    svc.start()
    work = svc.log_dir.with_name(svc.log_dir.name + "-batch")
    folder = notes["folder"] = sample_folder(work / "batch", RESTART_BATCH)
    out = notes["out"] = work / "out.jsonl"
    batch = subprocess.Popen(
        [sys.executable, str(ROOT / "test_client.py"), str(folder), "-o", str(out), "--base-url",
         svc.base_url, "--max-tokens", "64", "--concurrency", "1", "--retries", RESTART_RETRIES],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=client_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4):
            assert batch.poll() is None, f"the batch ended before the restart: {batch.stderr}"
            assert time.monotonic() < deadline, "the batch wrote no 4 records in 120 s"
            time.sleep(0.05)
        # The client is frozen while the service stops, then runs on while it is down: its requests
        # fail and are retried until the new server answers. Not frozen, it captioned every input
        # while vLLM was still shutting down on a fast machine (40 in 6.8 s), and proved nothing.
        restart_started = time.monotonic()
        os.kill(batch.pid, signal.SIGSTOP)
        try:
            notes["stop"] = svc.stop()
            notes["done_at_stop"] = out.read_bytes().count(b"\n")
        finally:
            os.kill(batch.pid, signal.SIGCONT)
        svc.start()
        notes["restart_seconds"] = time.monotonic() - restart_started
        _, notes["stderr"] = batch.communicate(timeout=300)
        notes["returncode"] = batch.returncode
        notes["status"] = svc.status()
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    svc.stop()


# Each test's own server, started ahead with others (tests/service.py's Starts): the tests stop them.
# Two run their whole story ahead (it waits on restarts and retries, beside other tests) and
# assert on what it noted.
engine_killed = server_fixture("engine_killed", start=kill9_of_the_engine, holds=False)
drained = server_fixture(
    "drained", SHUTDOWN_DRAIN="60", STOP_TIMEOUT="90", MAX_TOKENS="3000", MAX_NUM_SEQS="8"
)
restarted = server_fixture("restarted", start=restart_under_a_running_batch, holds=False, SHUTDOWN_DRAIN="2")


def test_kill9_of_the_engine_health_fails_status_says_so_stop_cleans_up_next_start_works(
        engine_killed: Service) -> None:
    notes = engine_killed.notes  # kill9_of_the_engine ran the steps
    assert len(notes["engines"]) == 1, notes["processes"]
    seen = notes["seen"]
    assert seen[-1] in (503, None), f"/health answers: {seen}"
    print(f"/health after kill -9 of the engine: {seen}")
    status = notes["status"]
    assert status.returncode == 1, status.stdout + status.stderr
    assert ("the engine is dead" in status.stdout or "API server pid" in status.stdout
            or "not answering" in status.stdout), status.stdout
    stop = notes["stop"]
    assert stop.returncode == 0, stop.stderr
    assert notes["left"] == []
    assert notes["caption"] == 200


def test_sigterm_under_load_lets_in_flight_captions_finish_within_the_drain_window(
        drained: Service) -> None:
    svc = drained
    tokens, n = 1500, 6
    results: list[Any] = [None] * n
    try:
        def one(i: int) -> None:
            try:
                r = svc.caption(SAMPLE.read_bytes(), max_tokens=tokens, ignore_eos=True)
                results[i] = (r.status_code, r.json().get("usage", {}).get("completion_tokens"))
            except requests.RequestException as exc:
                results[i] = (type(exc).__name__, None)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the engine is working on them
            metrics = requests.get(f"{svc.base_url}/metrics", timeout=10).text
            running = sum(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("vllm:num_requests_running"))
            if running >= n:
                break
            time.sleep(0.2)
        stop_started = time.monotonic()
        stop = svc.stop()
        stop_seconds = time.monotonic() - stop_started
        for t in threads:
            t.join(timeout=120)
        print(f"stop took {stop_seconds:.1f}s; results {results}")
        assert stop.returncode == 0, stop.stderr
        assert "SIGKILL" not in stop.stderr and "still running" not in stop.stderr, stop.stderr
        assert results == [(200, tokens)] * n
        assert svc.leftovers() == []
    finally:
        svc.stop()
        svc.force_cleanup()


def test_unwritable_log_dir_is_refused_in_one_line_and_nothing_is_launched(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a folder should be")
    svc = Service(tmp_path / "pidfiles", overrides={"LOG_DIR": str(blocker / "logs"),
                                                   "PID_FILE": str(tmp_path / "pidfiles" / "service.pid")})
    started = time.monotonic()
    r = svc.start(check=False)
    assert r.returncode == 1
    assert r.stderr == (f"start_service: LOG_DIR={blocker}/logs cannot be created ({blocker}/logs)\n")
    assert time.monotonic() - started < 15
    assert not svc.pid_file.exists()
    assert health(svc) is None, "something answers on the service's port"


def test_read_only_log_dir_is_refused_in_one_line_and_nothing_is_launched(tmp_path: Path) -> None:
    """A log folder on a read-only mount (root can write through permissions, not through `ro`)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private read-only bind mount")
    logs = tmp_path / "ro-logs"
    logs.mkdir()
    svc = Service(tmp_path / "state", overrides={"LOG_DIR": str(logs),
                                                "PID_FILE": str(tmp_path / "state" / "service.pid")})
    # The mount lives in a private mount namespace that ends with the command.
    wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2"', "sh", str(logs),
               str(ROOT / "start_service.sh")]
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    r = subprocess.run(wrapped, env=svc.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"start_service: LOG_DIR={logs} is not writable ({logs})\n"
    assert not svc.pid_file.exists() and list(logs.iterdir()) == []
    assert health(svc) is None


def test_server_restarted_under_a_running_batch_every_input_captioned_exactly_once(
        restarted: Service) -> None:
    notes = restarted.notes  # restart_under_a_running_batch ran the steps
    done_at_stop, stderr, total = notes["done_at_stop"], notes["stderr"], RESTART_BATCH
    print(f"restart took {notes['restart_seconds']:.1f}s; {done_at_stop} of {total} done at the stop; "
          f"client said: {stderr!r}")
    assert notes["stop"].returncode == 0
    assert done_at_stop < total, "the batch finished before the restart: nothing was proved"
    assert notes["returncode"] == 0, stderr
    records = [json.loads(line) for line in notes["out"].read_text(encoding="utf-8").splitlines()]
    assert sorted(r["source"] for r in records) == sorted(str(p) for p in notes["folder"].iterdir())
    assert all(r["error"] is None for r in records)
    assert f"{total} files: {total} captioned, 0 failed" in stderr
    assert notes["status"].returncode == 0
