"""Two real services, one stopped under two batches: each finishes with every input captioned exactly
once, one through vLLM's router (deploy/router.sh), one through the client's own repeated --base-url.
One test for both, so the suite starts one service for it and never restarts one: the one left
running (only paused) is the suite's shared server."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.service import ROOT, Service, free_port, sample_folder, server_fixture
from tests.test_client_server import client_command, client_env

pytestmark = [pytest.mark.server, pytest.mark.slow]
BATCH = 40


# A short drain: the live service is paused while this one stops, and a long pause would take it
# out of the router's rotation too (health checks every 5 s, out after 2 failures).
stopped_service = server_fixture("stopped_service", scope="module", SHUTDOWN_DRAIN="2")


@pytest.fixture(scope="module")
def two_services(server: Service, stopped_service: Service) -> tuple[Service, Service]:
    """(live, stopping): the live one is only paused, so it is the suite's shared server (its
    drain, 1 s, never comes into play); the other is this module's own."""
    return server, stopped_service


@pytest.fixture
def router(two_services: tuple[Service, Service], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "router.log").open("w")
    proc = subprocess.Popen([str(ROOT / "deploy" / "router.sh"), "--port", str(port), "--metrics-port",
                             str(free_port()), *(s.base_url for s in two_services)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "router.log").read_text()[-2000:]
            try:
                if requests.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the router did not answer within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def start_batch(folder: Path, *base_urls: str) -> tuple[Path, Path, subprocess.Popen[str]]:
    """BATCH copies of the sample clip in `folder`, captioned into out.jsonl beside it through the
    given --base-urls; returns at once."""
    sample_folder(folder, BATCH)
    out = folder.with_name(folder.name + ".jsonl")
    urls = [arg for url in base_urls for arg in ("--base-url", url)]
    batch = subprocess.Popen(
        client_command(str(folder), "-o", str(out), "--concurrency", "2", *urls, "--max-tokens", "64"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(), cwd=ROOT,
    )
    return folder, out, batch


def wait_under_way(*batches: tuple[Path, Path, subprocess.Popen[str]]) -> None:
    """Until each batch has written 4 records."""
    deadline = time.monotonic() + 300
    for _, out, batch in batches:
        while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 4):
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)


def wait_connected(*batches: tuple[Path, Path, subprocess.Popen[str]]) -> None:
    """Until each batch's client has a TCP connection open: it has started and asked."""
    deadline = time.monotonic() + 120
    for _, _, batch in batches:
        while not psutil.Process(batch.pid).net_connections(kind="tcp"):
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline, "the client never connected"
            time.sleep(0.05)


def sigterm_pending(pid: int | None) -> bool:
    """Whether a SIGTERM waits to be delivered to `pid` (a stopped process gets it on SIGCONT)."""
    status = Path(f"/proc/{pid}/status").read_text()
    lines = [line.split() for line in status.splitlines()]
    pending = [int(fields[1], 16) for fields in lines if fields and fields[0] in ("SigPnd:", "ShdPnd:")]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in pending)


def finished_each_input_once(folder: Path, out: Path, batch: subprocess.Popen[str]) -> str:
    """The batch's stderr, once it has exited 0 with one good record per input, in input order."""
    _, err = batch.communicate(timeout=600)
    assert batch.returncode == 0, err
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in records] == [str(p) for p in sorted(folder.iterdir())]
    assert all(r["error"] is None for r in records)
    return err


# vllm-router 0.1.17 re-serializes every chat request with seven fields of its own at their defaults;
# captioner_server/request_guard.py accepts exactly those values, so captions pass through it unchanged.
def test_a_service_stopped_under_two_batches_one_routed_one_over_two_base_urls_each_input_once(
    two_services: tuple[Service, Service], router: str, tmp_path: Path
) -> None:
    live, stopping = two_services
    # Both batches start while the services are frozen, and go on from the same moment once both
    # clients are connected: a client takes seconds to start on a busy machine, and the batch
    # started first once captioned all its files before the other had four.
    with live.paused(), stopping.paused():
        direct = start_batch(tmp_path / "direct", live.base_url, stopping.base_url)
        routed = start_batch(tmp_path / "routed", router)
        wait_connected(direct, routed)
    try:
        wait_under_way(direct, routed)
        # Both services are frozen while stop_service.sh sends its SIGTERM; the stopped one then
        # runs again for its 2 s drain only, and the live one stays frozen until the other is gone.
        # So the batches cannot end before the stop, nor can the stopped service caption all that
        # is left while its stop gets going (it once did), however fast this machine captions.
        with live.paused():
            with stopping.paused():
                stop = subprocess.Popen([str(ROOT / "stop_service.sh")], env=stopping.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                deadline = time.monotonic() + 60
                while not sigterm_pending(stopping.pid):
                    assert stop.poll() is None, stop.communicate()
                    assert time.monotonic() < deadline, "stop_service.sh sent no SIGTERM"
                    time.sleep(0.05)
            _, stop_err = stop.communicate(timeout=120)
            assert stop.returncode == 0, stop_err
            assert direct[2].poll() is None and routed[2].poll() is None
        err = finished_each_input_once(*direct)
        assert f"captioner: warning: {stopping.base_url} left the rotation" in err
        assert f"{BATCH} files: {BATCH} captioned, 0 failed" in finished_each_input_once(*routed)
    finally:
        for _, _, batch in (direct, routed):
            if batch.poll() is None:
                batch.kill()
