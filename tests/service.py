"""Start and stop the real service (start_service.sh → `vllm serve`, CPU build, tiny model) for tests.

Used by the pytest fixtures in conftest.py and by the lifecycle tests that need servers of their
own. Everything goes through the operator's scripts, so the tests prove those scripts too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from captioner.payload import WAV_MIME, chat_request, data_url

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-captioner"
SAMPLE = ROOT / "samples" / "sample.wav"
START_TIMEOUT = 300
# The environment as the run began: a server started beside a test (Starts) must not take up what
# that test's monkeypatch.setenv put there for the client (MAX_AUDIO_SECONDS=12.5 once did).
ENVIRON = dict(os.environ)


def sample_folder(folder: Path, count: int) -> Path:
    """`folder` (made here) holding `count` copies of the sample clip: 00.wav, 01.wav, ..."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:02d}.wav").write_bytes(SAMPLE.read_bytes())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(log_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    """The environment the scripts run under: CPU, tiny model, a private port and log folder.

    config.env is replaced by an empty file so a developer's own settings never leak in."""
    empty = log_dir / "empty.env"
    log_dir.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    env = {k: v for k, v in ENVIRON.items() if not k.startswith(("VLLM_", "CAPTIONER_"))}
    env.update(
        CAPTIONER_CONFIG=str(empty),
        DEVICE="cpu",
        MODEL_PATH=str(TINY_MODEL),
        SERVED_MODEL_NAME="tiny-captioner",
        PORT=str(port),
        LOG_DIR=str(log_dir),
        MAX_MODEL_LEN="4096",
        MAX_TOKENS="64",
        MAX_NUM_SEQS="8",
        API_SERVER_COUNT="1",  # the shipped 4 is for a GPU's load; a test that needs several says so
        START_TIMEOUT=str(START_TIMEOUT),
        STOP_TIMEOUT="20",
        SHUTDOWN_DRAIN="1",  # vLLM waits it out even with nothing in flight, its worker spinning
        VLLM_CACHE_ROOT=str(ROOT / ".cache" / "vllm-test"),
    )
    env.update(overrides)
    return env


def script(
    name: str, env: dict[str, str], timeout: float = START_TIMEOUT + 60
) -> subprocess.CompletedProcess[str]:
    """Run one of the kit's scripts. Interrupted (Ctrl-C, SIGTERM), it gets SIGTERM, not the
    SIGKILL subprocess.run would send, so start_service.sh can stop what it was starting."""
    with subprocess.Popen([str(ROOT / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()
            proc.communicate(timeout=60)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process of session `sid`: what a server left behind."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d.name))
    return out


@dataclass
class Service:
    """A real service started through start_service.sh. `.base_url`, `.model`, `.api_key`, `.env`."""

    log_dir: Path
    port: int = field(default_factory=free_port)
    overrides: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    # What start_service.sh said the last time; what a planned start of a test's own saw (Plan).
    last_start: subprocess.CompletedProcess[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # What force_cleanup undoes besides the service: a folder outside log_dir (a UNIX socket's path
    # must stay short), a process a planned start left for its test.
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = service_env(self.log_dir, self.port, **self.overrides)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = self.env["SERVED_MODEL_NAME"]
        self.api_key: str | None = self.env.get("API_KEY") or None

    @property
    def pid_file(self) -> Path:
        return Path(self.env.get("PID_FILE") or self.log_dir / "service.pid")

    def read_pid_file(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.pid_file.read_text().splitlines() if "=" in line)

    def start(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = self.last_start = script("start_service.sh", self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"start_service.sh failed ({r.returncode}):\n{r.stderr}\n{self.log_tail()}")
        if r.returncode == 0:
            self.pid = int(self.read_pid_file()["pid"])
        return r

    def stop(self) -> subprocess.CompletedProcess[str]:
        return script("stop_service.sh", self.env)

    def status(self) -> subprocess.CompletedProcess[str]:
        return script("status_service.sh", self.env, timeout=60)

    def log_tail(self, n: int = 40) -> str:
        log = self.log_dir / "service.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def caption(self, audio: bytes, mime: str = WAV_MIME, **extra: Any) -> requests.Response:
        body = chat_request(data_url(audio, mime), self.model, **{"max_tokens": 8} | extra)
        return requests.post(f"{self.base_url}/v1/chat/completions", json=body,
                             headers=self.headers(), timeout=120)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.base_url} not healthy after {timeout}s")

    @contextlib.contextmanager
    def paused(self, pids: list[int] | None = None) -> Iterator[None]:
        """Every process of the service (or those of `pids`) stopped (SIGSTOP) inside the block,
        continued after it: connections are still accepted by the kernel, but nothing is answered."""
        pids = self.leftovers() if pids is None else pids
        assert pids, "the service is not running"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def leftovers(self) -> list[int]:
        return session_pids(self.pid) if self.pid else []

    def force_cleanup(self) -> None:
        """Last resort after a failed test: SIGKILL whatever is left of this service's session."""
        if self.pid is None and self.pid_file.exists():
            self.pid = int(self.read_pid_file().get("pid", "0")) or None
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid_file.unlink(missing_ok=True)
        for undo in self.cleanups:
            undo()


# The servers fixtures take from Starts (conftest's `starts`), by the fixture's name. The module
# whose fixture takes one plans it at import, so a run knows all it will need before its first test.
@dataclass
class Plan:
    overrides: dict[str, str]
    # What starting it means: start_service.sh by default. A test whose subject is a start, or a
    # story of restarts that mostly waits, gives its steps instead: they run ahead like a start,
    # note what each gave in `notes`, and the test asserts on the notes.
    start: Callable[[Service], object]
    # Whether a server stays up once `start` returns (a story that ends with a stop holds none).
    holds: bool = True


PLANNED: dict[str, Plan] = {}


def plan(name: str, start: Callable[[Service], object] = Service.start, holds: bool = True,
         **overrides: str) -> str:
    PLANNED[name] = Plan(overrides, start, holds)
    return name


def alive_limit() -> int:
    """How many planned servers may stand started at once: each holds ~2.1 GB (API server, engine,
    worker), and 70% of what the machine has free is theirs."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return max(2, min(6, int(line.split()[1]) * 7 // 10 // 2_200_000))
    return 2


class Starts:
    """Each planned server the run needs, handed out once. From the run's first test on, a thread
    starts them in the order the run will first need them (`order`), PARALLEL at a time, beside
    the tests: a start is mostly one process importing vLLM on one core (on two cores, two at once
    take 43 s, one alone 40 s), a story mostly waits on restarts and retries, and the unit tier
    mostly waits on subprocesses and stub servers, so a server is ready before its test comes. At
    most `alive_max` stand started and not yet handed back (memory); a server a test asks for is
    started at once whatever the limits. A test marked `quiet` (it asserts how long something
    takes) runs with no start beside it. What nobody took is stopped at the end."""

    PARALLEL = 3

    def __init__(self, mktemp: Callable[[str], Path], order: list[str], alive: int | None = None) -> None:
        self.mktemp, self.order = mktemp, order
        self.alive_max = alive or alive_limit()
        self.cond = threading.Condition()
        self.launched: set[str] = set()
        self.services: dict[str, Service] = {}  # launched and not yet taken: close() stops them
        self.done: set[str] = set()  # ready or failed
        self.failed: dict[str, BaseException] = {}
        self.starting = self.alive = self.quiet = 0
        self.closed = False
        threading.Thread(target=self._launch_in_order, name="starts", daemon=True).start()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """With self.cond held: until `ready()`; a signal (Ctrl-C, SIGTERM) still gets through."""
        while not ready():
            self.cond.wait(1)

    def _room(self) -> bool:
        return self.starting < self.PARALLEL and self.alive < self.alive_max and not self.quiet

    def _launch_in_order(self) -> None:
        for name in self.order:
            with self.cond:
                self._wait(lambda: self.closed or self._room())
                if self.closed:
                    return
                if name not in self.launched:  # else a test asked for it first
                    self._launch(name)

    def _launch(self, name: str) -> None:
        """With self.cond held: start `name` in a thread of its own."""
        svc = Service(self.mktemp(f"{name}-logs"), overrides=PLANNED[name].overrides)
        self.launched.add(name)
        self.services[name] = svc
        self.starting += 1
        self.alive += 1
        threading.Thread(target=self._start, args=(name, svc), name=f"start {name}", daemon=True).start()

    def _start(self, name: str, svc: Service) -> None:
        error: BaseException | None = None
        try:
            PLANNED[name].start(svc)
        except BaseException as exc:  # raised to the test that takes it
            error = exc
            svc.stop()
            svc.force_cleanup()
        with self.cond:
            self.starting -= 1
            if error is not None:
                self.failed[name] = error
                del self.services[name]
            if error is not None or not PLANNED[name].holds:
                self.alive -= 1
            self.done.add(name)
            self.cond.notify_all()

    def take(self, name: str) -> Service:
        with self.cond:
            if name not in self.launched:
                self._launch(name)  # needed now: not held back by the limits
            self._wait(lambda: name in self.done)
            if name in self.failed:
                raise self.failed.pop(name)
            return self.services.pop(name)

    def handed_back(self, name: str) -> None:
        """`name`, taken, is stopped: room for the next."""
        with self.cond:
            if PLANNED[name].holds:
                self.alive -= 1
            self.cond.notify_all()

    @contextlib.contextmanager
    def quieted(self) -> Iterator[None]:
        """No start runs inside the block: those under way finish first, the next wait."""
        with self.cond:
            self.quiet += 1
            self._wait(lambda: self.starting == 0)
        try:
            yield
        finally:
            with self.cond:
                self.quiet -= 1
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            self._wait(lambda: self.starting == 0)  # each start ends by START_TIMEOUT
            left = list(self.services.values())
        for svc in left:
            svc.stop()
            svc.force_cleanup()


def taken(starts: Starts, name: str):  # type: ignore[no-untyped-def]
    """Fixture body: the started server `name`, stopped afterwards and never left behind."""
    svc = starts.take(name)
    try:
        yield svc
    finally:
        svc.stop()
        svc.force_cleanup()
        starts.handed_back(name)


def server_fixture(name: str, scope: str = "function", start: Callable[[Service], object] = Service.start,
                   holds: bool = True, **overrides: str) -> Any:
    """Plans the server `name` (`plan`) and returns the fixture of that name that hands it to a
    test (`taken`): `name = server_fixture("name", ...)` at a test module's top level."""
    plan(name, start, holds, **overrides)

    def fixture(starts: Starts) -> Iterator[Service]:
        yield from taken(starts, name)

    fixture.__doc__ = f"The planned server {name!r}."
    return pytest.fixture(scope=scope, name=name)(fixture)
