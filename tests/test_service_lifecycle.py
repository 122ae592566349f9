"""The service scripts against the real `vllm serve` (CPU build, tiny model): start, caption,
status, stop, crash clean-up, concurrent starts, reused PID files. The decoy standing in for the
video service on port 8002 must be alive and unsignalled after every test."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from captioner.payload import chat_request, data_url
from tests.service import ROOT, SAMPLE, Service, script, server_fixture

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.usefixtures("decoy_untouched")]


def curl_caption(svc: Service) -> dict[str, object]:
    """The README's curl request: one audio part, as a data: URL, nothing else."""
    body = chat_request(data_url(SAMPLE.read_bytes()), svc.model, max_tokens=8)
    r = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", f"{svc.base_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "--data-binary", "@-"],
        input=json.dumps(body), capture_output=True, text=True, timeout=120, check=True)
    text, code = r.stdout.rsplit("\n", 1)
    assert code == "200", text
    return json.loads(text)  # type: ignore[no-any-return]


def port_is_free(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return out.strip() == ""


def a_crash_of_the_api_server(svc: Service) -> None:
    """What test_start_caption_kill9_... asserts on, done ahead beside other tests (Starts): a start,
    a caption, status, kill -9 of the API server, status, stop, a start again, a caption, stop,
    status. What each step gave goes in `notes`."""
    notes = svc.notes
    svc.start()
    notes["health"] = requests.get(f"{svc.base_url}/health", timeout=5).status_code
    notes["caption"] = curl_caption(svc)
    notes["status"] = svc.status().returncode
    leader = notes["leader"] = svc.pid
    notes["processes"] = svc.leftovers()
    assert leader, "start_service.sh named no pid"
    os.kill(leader, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{leader}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    notes["orphans"] = svc.leftovers()
    notes["status_after_kill"] = svc.status()
    notes["stop_after_kill"] = svc.stop()
    notes["left_after_kill"] = svc.leftovers()

    svc.start()
    curl_caption(svc)
    notes["stop"] = svc.stop()
    notes["status_after_stop"] = svc.status().returncode
    notes["left"] = svc.leftovers()
    notes["pid_file_left"] = svc.pid_file.exists()
    notes["port_free"] = port_is_free(svc.port)


def two_starts_over_a_stale_pid_file(svc: Service) -> None:
    """The steps of test_two_starts_at_once_... up to its first assertion: a stale PID file naming
    a live sleep, a stop over it, then two starts at once over it again. What each said goes in
    `notes` for the test."""
    sleeper = subprocess.Popen(["sleep", "600"])
    svc.cleanups.append(sleeper.kill)
    svc.notes["sleeper"] = sleeper
    stale = f"pid={sleeper.pid}\npgid={sleeper.pid}\nstart_time=1\nlog_id=1:1\n"
    svc.log_dir.mkdir(parents=True, exist_ok=True)
    svc.pid_file.write_text(stale)
    svc.notes["stop"] = svc.stop()
    svc.pid_file.write_text(stale)
    start = [str(ROOT / "start_service.sh")]
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(start, env=svc.env, stdout=pipe, stderr=pipe, text=True) for _ in range(2)]
    svc.notes["outs"] = [p.communicate(timeout=400) for p in procs]
    svc.notes["codes"] = [p.returncode for p in procs]


def on_a_unix_socket(svc: Service) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="cap-", dir="/tmp"))  # a socket path is < 108 bytes
    svc.cleanups.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
    svc.env["UNIX_SOCKET"] = str(sock_dir / "api.sock")
    svc.start()


KEY = "several-servers-key"
UNKEYED = (b"GET /v1/models", b"GET /metrics", b"GET /version",
           b"POST /v1/chat/completions")  # the POST declares a 1 GB body and sends none


def holders(svc: Service, wanted: Callable[[Any], bool]) -> list[int]:
    """The service's processes that hold a TCP socket `wanted` picks (psutil's connections)."""
    found = []
    for pid in svc.leftovers():
        with contextlib.suppress(psutil.Error):
            if any(wanted(c) for c in psutil.Process(pid).net_connections(kind="tcp")):
                found.append(pid)
    return found


def listeners(svc: Service) -> list[int]:
    """The processes that hold the service's listening socket, the manager that made it included."""
    return holders(svc, lambda c: c.status == psutil.CONN_LISTEN and c.laddr.port == svc.port)


def accepted_by(svc: Service, sock: socket.socket) -> int | None:
    """The process that accepted `sock`'s connection (None: none yet, or it left)."""
    port = sock.getsockname()[1]
    found = holders(svc, lambda c: bool(c.raddr) and c.laddr.port == svc.port and c.raddr.port == port)
    return found[0] if found else None


def status_line(sock: socket.socket, request_line: bytes, headers: bytes = b"") -> bytes:
    length = b"Content-Length: 1000000000\r\n" if request_line.startswith(b"POST") else b""
    sock.sendall(request_line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + length + headers + b"\r\n")
    with sock:
        return sock.recv(200).split(b"\r\n", 1)[0]


def several_api_servers(svc: Service) -> None:
    """What test_several_api_servers_... asserts on, done ahead: a start with two API servers and
    a key; each API server alone in turn: requests without the key and with it, a caption; status;
    kill -9 of one API server; what is left; status; stop."""
    notes = svc.notes
    svc.start()
    servers = notes["api_servers"] = [pid for pid in listeners(svc) if pid != svc.pid]
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    notes["answers"] = {}
    for pid in servers:
        # The API servers share one listening socket: which of them accepts a connection is the
        # kernel's choice, and one may take them all. With the others stopped, only `pid` can.
        with svc.paused([other for other in servers if other != pid]):
            held = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
            unkeyed = [status_line(socket.create_connection(("127.0.0.1", svc.port), timeout=10), line)
                       for line in UNKEYED]
            deadline = time.monotonic() + 10
            while accepted_by(svc, held) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            notes["answers"][pid] = {
                "accepted_by": accepted_by(svc, held),
                "unkeyed": unkeyed,
                "keyed": status_line(held, b"GET /v1/models", auth),
                "caption": svc.caption(SAMPLE.read_bytes()).status_code,
            }
    notes["status"] = svc.status()
    os.kill(servers[-1], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while svc.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    notes["left_after_kill"] = svc.leftovers()
    notes["status_after_kill"] = svc.status()
    notes["stop"] = svc.stop()
    notes["pid_file_left"] = svc.pid_file.exists()
    notes["port_free"] = port_is_free(svc.port)


# Each test's own server, started ahead beside other tests (tests/service.py Starts): the tests stop
# them. Where a start is what a test proves, its steps run ahead too and the test asserts on what
# they noted: the crash story (it ends stopped), two starts at once, the socket's start line, the
# story of two API servers (it ends stopped).
crash_story = server_fixture("crash_story", start=a_crash_of_the_api_server, holds=False)
raced = server_fixture("raced", start=two_starts_over_a_stale_pid_file)
on_socket = server_fixture("on_socket", start=on_a_unix_socket)
several = server_fixture("several", start=several_api_servers, holds=False, API_SERVER_COUNT="2", API_KEY=KEY)


# One story, two starts: what an operator does on a good day, then after a crash of the API server.
def test_start_caption_kill9_of_the_api_server_stop_cleans_orphans_restart_stop_leaves_nothing(
        crash_story: Service) -> None:
    notes = crash_story.notes  # a_crash_of_the_api_server ran the steps
    assert notes["health"] == 200
    assert notes["caption"]["object"] == "chat.completion"
    assert notes["status"] == 0
    assert notes["leader"] and len(notes["processes"]) >= 2, "expected the API server and its engine"
    assert notes["orphans"], "vLLM's engine should outlive a kill -9 of its API server"
    status = notes["status_after_kill"]
    assert status.returncode == 1
    assert "orphaned process(es)" in status.stdout
    stop = notes["stop_after_kill"]
    assert stop.returncode == 0, stop.stderr
    assert "orphaned process(es) of the service" in stop.stderr
    assert notes["left_after_kill"] == []

    stop = notes["stop"]
    assert stop.returncode == 0, stop.stderr
    assert notes["status_after_stop"] == 3
    assert notes["left"] == []
    assert not notes["pid_file_left"]
    assert notes["port_free"]


def test_several_api_servers_each_ask_for_the_key_caption_and_one_killed_takes_the_service_down_whole(
        several: Service) -> None:
    """API_SERVER_COUNT=2 (the shipped count is 4): every API server process checks the key on
    every route, captions go through, and a kill -9 of one brings vLLM's manager down with all
    of its processes: status says dead, stop clears the PID file, nothing is left."""
    notes = several.notes  # several_api_servers ran the steps
    servers = notes["api_servers"]
    assert len(servers) == 2 and several.pid not in servers, (several.pid, servers)
    for pid in servers:  # each alone in turn
        answers = notes["answers"][pid]
        assert answers["accepted_by"] == pid, answers
        assert answers["unkeyed"] == [b"HTTP/1.1 401 Unauthorized"] * 4, answers
        assert answers["keyed"] == b"HTTP/1.1 200 OK" and answers["caption"] == 200, answers
    status = notes["status"]
    assert status.returncode == 0 and "health:   ok" in status.stdout, status.stdout
    assert notes["left_after_kill"] == [], "vLLM left processes behind when one API server died"
    status = notes["status_after_kill"]
    assert status.returncode == 1 and status.stdout.startswith("dead: "), status.stdout
    assert notes["stop"].returncode == 0 and "stale PID file" in notes["stop"].stderr, notes["stop"].stderr
    assert not notes["pid_file_left"] and notes["port_free"]


def test_a_bare_request_gets_the_server_side_sampling_defaults(server: Service) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {
            "data": base64.b64encode(SAMPLE.read_bytes()).decode(), "format": "wav"}}]}]}
    r = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # MAX_TOKENS (64 in the test env) caps a request that names no max_tokens.
    assert 0 < usage["completion_tokens"] <= 64
    log = (server.log_dir / "service.log").read_text()
    assert "'temperature': 0.6, 'top_k': 20, 'top_p': 0.95, 'max_tokens': 64" in log


def test_two_starts_at_once_over_a_stale_pid_file_give_one_server_and_never_signal_its_pid(
        raced: Service) -> None:
    svc = raced  # two_starts_over_a_stale_pid_file ran its steps
    sleeper, stop, outs = svc.notes["sleeper"], svc.notes["stop"], svc.notes["outs"]
    assert stop.returncode == 0 and "stale PID file" in stop.stderr
    assert svc.notes["codes"] == [0, 0], outs
    errs = "".join(e for _, e in outs)
    assert errs.count("ready:") == 1 and errs.count("already running") == 1, errs
    assert errs.count("removing stale PID file") == 1, errs
    log = (svc.log_dir / "service.log").read_text()
    assert log.count("=== ") == 1, "vLLM was launched twice"
    svc.pid = int(svc.read_pid_file()["pid"])
    curl_caption(svc)
    assert svc.stop().returncode == 0
    assert sleeper.poll() is None, "the unrelated sleep was signalled"


def test_status_reports_request_counters_from_metrics(server: Service) -> None:
    r = script("status_service.sh", server.env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "health:   ok" in r.stdout
    assert re.search(r"^requests: \d+ running, \d+ waiting$", r.stdout, re.M), r.stdout


def test_unix_socket_service_warm_up_through_the_socket_and_the_pid_file_is_the_record(
        on_socket: Service) -> None:
    """The socket mode on the real server (issue #20): tools/warm_up.py captions through the socket
    (uvicorn and the request guard behind it); status and stop find the service from its PID file
    under other settings, a bad unrelated value included; a second start for TCP says what runs."""
    svc = on_socket
    sock = Path(svc.env["UNIX_SOCKET"])
    start = svc.last_start
    assert start is not None
    assert f"ready: unix:{sock} (pid {svc.pid}," in start.stderr, start.stderr
    assert port_is_free(svc.port)
    warm = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "tools" / "warm_up.py"),
         "--unix-socket", str(sock), "--base-url", "http://localhost", "--requests", "2",
         "--seconds", "2", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "warm_up: 2 concurrent request(s) of 2 s audio, 4 tokens" in warm.stdout
    assert warm.stdout.count(", 0 failed") == 2, warm.stdout

    other = {k: v for k, v in svc.env.items() if k != "UNIX_SOCKET"} | {"TEMPERATURE": "abc"}
    status = script("status_service.sh", other, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"url:      unix:{sock}\n" in status.stdout and "health:   ok\n" in status.stdout
    second = script("start_service.sh", other | {"TEMPERATURE": "0.5"})
    assert second.returncode == 1
    assert second.stderr == (
        f"start_service: already running with other settings (pid {svc.pid}, unix:{sock}, model "
        f"{svc.model}): UNIX_SOCKET is {sock} there, empty here; run ./stop_service.sh first to "
        "start with these\n")
    stop = script("stop_service.sh", other)
    assert stop.returncode == 0, stop.stderr
    assert f"stopping pid {svc.pid} (unix:{sock}; draining up to " in stop.stderr
    assert svc.leftovers() == []
    assert script("status_service.sh", other, timeout=60).returncode == 3
