"""Several servers (repeated --base-url): least-busy routing and failover.

Each request goes to the live server with the fewest requests in flight (ties: the
one sent the fewest so far). A server whose request fails to connect, is dropped
before an answer, gets no answer within the read timeout, or is answered with a server
error (a 5xx other than vLLM's for unusable input, after the retries of
`options.RETRY_STATUSES`) or 429 leaves the rotation
with a warning, and the request goes to another server at once. It is probed again
after `PROBE_AFTER` seconds (doubling, at most `PROBE_MAX`): one request is let through,
and if it succeeds the server is back. When every server is out, a request waits for
the next probe, for as long as the retries of one server would wait (`--retries`), and
a line says so; only then does it fail, with the last server's error.

A server can start out *pending* (`pending()`): out of the rotation until its start-up
check answers (`confirm`) or fails (`mark_down`), so a server that accepts connections
and never answers gets no request while the others work.

For one host behind several GPUs, or a fleet, use vLLM's router instead
(deploy/router.sh): health checks and load-aware routing for every client at once.
This is for ad-hoc setups such as a few SSH tunnels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from captioner.errors import (
    CaptionerError,
    ServerConnectionError,
    ServerHTTPError,
    ServerTimeoutError,
    UsageError,
)
from captioner.options import RETRY_STATUSES

log = logging.getLogger("captioner")

PROBE_AFTER = 5.0  # seconds out of the rotation before the first probe
PROBE_MAX = 60.0

T = TypeVar("T")


def is_server_down(exc: BaseException) -> bool:
    """Errors that say the server (not the input) is the problem: try another one. A read
    timeout is one: a server that does not answer in time is treated like one that refuses. So
    are a 5xx that is not vLLM's word for unusable input, and a 429: a server failing fast would
    otherwise, having the fewest requests in flight, draw most of them."""
    if isinstance(exc, (ServerConnectionError, ServerTimeoutError)):
        return True
    if not isinstance(exc, ServerHTTPError):
        return False
    return exc.status in RETRY_STATUSES or exc.status == 429 or (exc.status >= 500 and not exc.bad_input)


def short_reason(exc: CaptionerError) -> str:
    """`connection refused`, `HTTP 503: ...`: the gist of why a server failed, for one line."""
    text = str(exc)
    if isinstance(exc, ServerHTTPError):
        return text[text.find("HTTP ") :][:120] if "HTTP " in text else text[:120]
    if ": " in text and text.startswith("cannot connect to "):
        return text.split(": ", 1)[1].split(". ", 1)[0]
    if isinstance(exc, ServerTimeoutError) and ": " in text:
        return text.split(": ", 1)[1].split(" (", 1)[0][:120]  # "no answer within 300 s"
    return text.split("; ", 1)[0][:120]


@dataclass
class _Server:
    client: Any  # CaptionClient (or a stand-in with `base_url`)
    in_flight: int = 0
    sent: int = 0
    down_until: float = 0.0  # monotonic time of the next probe; 0: in the rotation
    pause: float = field(default_factory=lambda: PROBE_AFTER)
    probing: bool = False
    pending: bool = False  # its start-up check has not answered yet

    @property
    def live(self) -> bool:
        return self.down_until == 0.0


class ServerPool:
    """The servers of a batch; `call(fn)` runs `fn(client)` on the best one, failing over."""

    def __init__(self, clients: Sequence[Any], wait: float = 60.0) -> None:
        if not clients:
            raise ValueError("at least one client")
        self.servers = [_Server(c) for c in clients]
        self.wait = wait  # how long a request waits while every server is out
        self._lock = threading.Condition()
        self._said_all_out = False
        self.closed = False

    def close(self) -> None:
        """The run is over: requests still waiting for a server give up, and say nothing."""
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def pending(self, client: Any) -> None:
        """Keep `client`'s server out of the rotation until `confirm` or `mark_down`: its
        start-up check is under way."""
        with self._lock:
            for server in self.servers:
                if server.client is client:
                    server.pending = server.probing = True
                    server.down_until = float("inf")

    def confirm(self, client: Any) -> None:
        """`client`'s server answered its start-up check: into the rotation."""
        with self._lock:
            for server in self.servers:
                if server.client is client and server.pending:
                    server.pending = server.probing = False
                    server.down_until = 0.0
                    self._said_all_out = False
            self._lock.notify_all()

    def retire(self, client: Any, reason: str) -> None:
        """Leave `client`'s server out for the rest of the run (it refused, or serves another
        model: probing it again would not help), with a warning."""
        with self._lock:
            for server in self.servers:
                if server.client is client:
                    server.pending = False
                    server.probing = True  # never due for a probe
                    server.down_until = float("inf")
                    others = sum(1 for s in self.servers if s.live or s.pending)  # pending: being checked
                    log.warning(
                        "%s is left out (%s); %d of %d servers in use",
                        server.client.base_url, reason, others, len(self.servers),
                    )  # fmt: skip
            self._lock.notify_all()

    def mark_down(self, client: Any, reason: str) -> None:
        with self._lock:
            for server in self.servers:
                if server.client is client:
                    if server.pending:
                        server.pending = server.probing = False
                        server.down_until = 0.0
                    self._take_out(server, reason)
            self._lock.notify_all()

    def call(self, fn: Callable[[Any], T]) -> T:
        if len(self.servers) == 1:
            return fn(self.servers[0].client)
        tried: set[int] = set()
        deadline: float | None = None
        last: CaptionerError | None = None
        while True:
            server = self._acquire(tried, deadline)
            if server is None:  # every server out for longer than the retries wait, or closed
                raise last or ServerConnectionError("no server: the run is over")
            try:
                result = fn(server.client)
            except CaptionerError as exc:
                if not is_server_down(exc):
                    self._release(server, ok=True)  # the input's problem, not the server's
                    raise
                last = exc
                self._release(server, ok=False, reason=short_reason(exc))
                tried.add(id(server))
                if deadline is None and all(id(s) in tried or not s.live for s in self.servers):
                    deadline = time.monotonic() + self.wait
                continue
            except BaseException:
                self._release(server, ok=True)
                raise
            self._release(server, ok=True)
            return result

    def _acquire(self, tried: set[int], deadline: float | None) -> _Server | None:
        with self._lock:
            while True:
                if self.closed:
                    return None
                now = time.monotonic()
                live = [s for s in self.servers if s.live and id(s) not in tried]
                if not live:
                    live = [s for s in self.servers if s.live]  # tried, but back or still up
                due = [s for s in self.servers if not s.live and not s.probing and s.down_until <= now]
                if due:
                    server = min(due, key=lambda s: s.down_until)
                    server.probing = True
                elif live:
                    server = min(live, key=lambda s: (s.in_flight, s.sent))
                else:
                    if deadline is not None and now >= deadline:
                        return None
                    waiting = [s.down_until for s in self.servers if not s.probing]
                    until = min(waiting) if waiting else now + 1.0
                    self._say_all_out(now, until, deadline)
                    if deadline is not None:
                        until = min(until, deadline)
                    self._lock.wait(max(0.05, until - now))
                    continue
                server.in_flight += 1
                server.sent += 1
                return server

    def _say_all_out(self, now: float, until: float, deadline: float | None) -> None:
        """One line when requests start waiting because every server is out (not again until
        one is back)."""
        if self._said_all_out or self.closed:
            return
        self._said_all_out = True
        due = [s for s in self.servers if not s.probing and s.down_until == until]
        probe = "probing"
        if due:
            probe = f"next probe of {due[0].client.base_url} in {max(0.0, until - now):.0f} s"
        limit = f"; giving up in {max(0.0, deadline - now):.0f} s" if deadline is not None else ""
        log.warning("every server is out of the rotation; waiting (%s%s)", probe, limit)

    def _release(self, server: _Server, ok: bool, reason: str = "") -> None:
        with self._lock:
            server.in_flight -= 1
            if ok:
                if not server.live:
                    log.warning("%s answers again: back in the rotation", server.client.base_url)
                    self._said_all_out = False
                server.down_until, server.pause, server.probing = 0.0, PROBE_AFTER, False
            elif server.probing:
                server.probing = False
                server.pause = min(PROBE_MAX, server.pause * 2)
                server.down_until = time.monotonic() + server.pause
            elif server.live:
                self._take_out(server, reason)
            self._lock.notify_all()

    def _take_out(self, server: _Server, reason: str) -> None:
        if not server.live or self.closed:
            return
        server.down_until = time.monotonic() + server.pause
        others = sum(1 for s in self.servers if s.live or s.pending)  # pending: being checked
        log.warning(
            "%s left the rotation (%s); probing it again in %g s; %d of %d servers in use",
            server.client.base_url, reason, server.pause, others, len(self.servers),
        )  # fmt: skip


def first_model(pool: ServerPool) -> str:
    """The model to ask for when --model is not given: the first model the servers list (GET
    /v1/models), which also checks that they answer and take the key.

    Several servers are asked at once and the first answer decides: a server that has not
    answered stays out of the rotation (`ServerPool.pending`) until it does, so one that
    accepts connections and never answers holds nothing up. One that cannot be reached leaves
    the rotation with a warning (probed later); one that refuses (a wrong key) or does not serve
    the model is left out for the run. Only when none answers is the check waited for, as long
    as the retries of one server would wait.
    """
    clients = [server.client for server in pool.servers]
    if len(clients) == 1:
        served: list[str] = clients[0].list_models()
        if not served:
            raise UsageError(f"{clients[0].base_url} serves no model")
        log.debug("model %s on %s", served[0], clients[0].base_url)
        return served[0]
    lock = threading.Lock()
    known = threading.Event()
    chosen: list[str] = []
    refusals: list[CaptionerError] = []
    left = [len(clients)]

    def failed(client: Any, exc: CaptionerError) -> None:
        with lock:
            if is_server_down(exc):
                pool.mark_down(client, short_reason(exc))
            else:
                pool.retire(client, short_reason(exc))
                refusals.append(exc)
            left[0] -= 1
            if not left[0]:
                known.set()

    def check(client: Any) -> None:
        try:
            served = client.list_models()
        except CaptionerError as exc:
            failed(client, exc)
            return
        except Exception as exc:  # whatever it is, the count must come down
            failed(client, CaptionerError(f"{client.base_url}: unexpected {type(exc).__name__}: {exc}"))
            return
        with lock:
            if not chosen and served:
                chosen.append(served[0])
                log.debug("model %s, first listed by %s", served[0], client.base_url)
            if chosen and chosen[0] in served:
                pool.confirm(client)
            else:
                what = ", ".join(served) or "no model"
                pool.retire(client, f"it serves {what}, not {chosen[0]}" if chosen else f"it serves {what}")
                if not chosen:
                    refusals.append(UsageError(f"{client.base_url} serves no model"))
            left[0] -= 1
            if chosen or not left[0]:
                known.set()

    for client in clients:
        pool.pending(client)
    for client in clients:  # daemons: a check still waiting on a hung server never holds the exit
        threading.Thread(target=check, args=(client,), name="captioner-check", daemon=True).start()
    known.wait()
    with lock:
        if chosen:
            return chosen[0]
        if refusals:
            raise refusals[0]
    # None answers: wait for one as for a single server (probes, as long as --retries would).
    served = pool.call(lambda c: c.list_models())
    if not served:
        raise UsageError("the server that answered serves no model")
    return str(served[0])
