"""Shared fixtures: the real service on the tiny model, started through the operator's scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import PLANNED, ROOT, TINY_MODEL, Service, Starts, plan, taken


@pytest.fixture
def client_env_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads no setting of the developer's: no CAPTIONER_* or service variables, and not
    the kit's own config.env."""
    for name in ("CAPTIONER_BASE_URL", "CAPTIONER_API_KEY", "CAPTIONER_CONCURRENCY",
                 "API_KEY", "MAX_NUM_SEQS", "MAX_AUDIO_SECONDS", "PORT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAPTIONER_CONFIG", os.devnull)  # the schema's defaults only


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a CI time limit, `timeout`) must still run the fixtures' teardown, which stops the
    # servers the run started; by default it would end pytest on the spot and leave them running.
    signal.signal(signal.SIGTERM, _interrupt)


# The fixtures that start real servers (every planned one takes `starts`). A test that uses one is
# in the server tier whatever its module says, and a test outside that tier cannot start one (see
# below): `-m "not server"` is the unit tier, seconds long, without the model.
SERVER_FIXTURES = {"starts"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
    # The unit tier first: its minutes mostly wait on subprocesses and stub servers, and the planned
    # servers start beside them (Starts), ready when the server tier comes. The quiet tests last:
    # by then no start is left to wait for.
    items.sort(key=lambda item: (item.get_closest_marker("server") is not None,
                                 item.get_closest_marker("quiet") is not None))


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.get_closest_marker("server") for item in session.items) and not (
        TINY_MODEL / "config.json"
    ).exists():
        # The model is a build product (make model-tiny); build it once rather than fail.
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "tools" / "make_tiny_model.py"),
                        str(TINY_MODEL)], check=True)


@pytest.fixture(autouse=True)
def _servers_only_in_the_server_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("server") is None:
        start = Service.start

        def refuse(self: Service, check: bool = True) -> subprocess.CompletedProcess[str]:
            if threading.current_thread() is not threading.main_thread():
                return start(self, check)  # a planned start (Starts), beside this test
            raise AssertionError("this test starts a server: mark it pytest.mark.server")

        monkeypatch.setattr(Service, "start", refuse)


def planned_order(session: pytest.Session) -> list[str]:
    """The planned servers this run's tests take, in the order they first take them."""
    order: list[str] = []
    for item in session.items:
        order += [name for name in getattr(item, "fixturenames", ()) if name in PLANNED and name not in order]
    return order


# The run's Starts, for the quiet tests' hook below.
STARTS: list[Starts] = []


@pytest.fixture(scope="session")
def starts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starts]:
    """The planned servers, started ahead in the order this run's tests first take them."""
    made = Starts(tmp_path_factory.mktemp, planned_order(request.session))
    STARTS.append(made)
    try:
        yield made
    finally:
        STARTS.remove(made)
        made.close()


@pytest.fixture(scope="session", autouse=True)
def _start_ahead(request: pytest.FixtureRequest) -> None:
    """Servers start from the run's first test on, beside the tests that need none. (Asked for by
    name here, `starts` stays out of every test's fixture names: the tier marks below hold.) The
    decoy comes first where a test checks it: the steps planned ahead stop and kill services too."""
    items = request.session.items
    if any("decoy" in getattr(item, "fixturenames", ()) for item in items):
        request.getfixturevalue("decoy")
    if planned_order(request.session):
        request.getfixturevalue("starts")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test marked quiet asserts how long something takes: no server starts beside it."""
    if item.get_closest_marker("quiet") and STARTS:
        with STARTS[0].quieted():
            return (yield)
    return (yield)


@pytest.fixture(scope="session")
def server(starts: Starts) -> Iterator[Service]:
    """One real `vllm serve` for the whole run: tiny model, CPU, loopback, no API key."""
    yield from taken(starts, "server")


plan("server")


DECOY_CODE = """
import signal, sys, time
log = open(sys.argv[1], "a")
def note(sig, _):
    log.write(f"{sig}\\n"); log.flush()
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT):
    signal.signal(s, note)
open(sys.argv[2], "w").close()
while True:
    time.sleep(1)
"""


@pytest.fixture(scope="session")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process named like the video service's vLLM on port 8002, logging any signal it gets."""
    d = tmp_path_factory.mktemp("decoy")
    ready = d / "ready"
    proc = subprocess.Popen(
        ["bash", "-c", 'exec -a "python3 -m vllm.entrypoints.cli.main serve video-model --port 8002" '
         f'{sys.executable} -c "$0" "$1" "$2"', DECOY_CODE, str(d / "signals"), str(ready)])
    while not ready.exists():
        time.sleep(0.05)
    yield proc, d / "signals"
    proc.kill()
    proc.wait()


@pytest.fixture
def decoy_untouched(decoy: tuple[subprocess.Popen[bytes], Path]) -> Iterator[None]:
    """Use in a module (pytestmark usefixtures): after each test the decoy is alive, unsignalled."""
    yield
    proc, signals = decoy
    assert proc.poll() is None, "the decoy 8002 service died"
    assert not signals.exists() or signals.read_text() == "", f"decoy got signals: {signals.read_text()}"
