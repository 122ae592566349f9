"""The HTTP parser of vLLM's API server: uvicorn's h11 with a header cap and a deadline for
unfinished requests. Importing this module makes uvicorn's "auto" HTTP implementation
GuardedH11Protocol (the request guard imports it): vLLM 0.32 has no option to pick uvicorn's
parser, and "auto" means httptools, which has no header size limit (one client sending a 100 MB
header line stalled /health for 20 s) and, like h11 in uvicorn, no timeout for a connection that
never finishes its request."""

from __future__ import annotations

import asyncio
import os

import h11
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol

from captioner_server.settings import request_timeout

# Largest request head (request line + headers) h11 buffers; uvicorn answers 400 past it.
# start_service.sh passes the same number as --h11-max-incomplete-event-size (its MAX_HEADER_BYTES;
# tests/test_security.py checks that they match).
MAX_HEADER_BYTES = 65536

REQUEST_TIMEOUT = request_timeout(os.environ)


MIN_BODY_BYTES = 65536  # a body must bring at least this much every REQUEST_TIMEOUT s


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol (header bytes capped by --h11-max-incomplete-event-size) that
    also closes a connection whose request is unfinished: no complete header REQUEST_TIMEOUT s
    after its first byte (or after the connection opened), or a body that brings less than
    MIN_BODY_BYTES in REQUEST_TIMEOUT s (silent, or trickling) while the app waits for it.
    uvicorn's keep-alive timeout covers only the wait *between* requests."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guard_body_bytes = 0
        super().connection_made(transport)  # type: ignore[arg-type]
        self._guard_arm()

    def data_received(self, data: bytes) -> None:
        in_body = self.conn.their_state is h11.SEND_BODY
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if in_body:
                self._guard_body_bytes += len(data)
            else:  # the headers just completed: the body's first period starts now
                self._guard_body_bytes = 0
                self._guard_arm()
        elif state is h11.IDLE:
            if self._guard_timer is None:
                self._guard_arm()  # header deadline: from the first byte, not restarted
        else:
            self._guard_disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._guard_disarm()
        super().on_response_complete()

    def _guard_arm(self) -> None:
        self._guard_disarm()
        self._guard_timer = self.loop.call_later(REQUEST_TIMEOUT, self._guard_expired)

    def _guard_disarm(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _guard_expired(self) -> None:
        self._guard_timer = None
        if self.transport.is_closing():
            return
        brought, self._guard_body_bytes = self._guard_body_bytes, 0
        if self.flow.read_paused or (self.conn.their_state is h11.SEND_BODY and brought >= MIN_BODY_BYTES):
            self._guard_arm()  # the app is slow to read, or the body is coming: next period
            return
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.logger.warning("request_guard: closed a connection from %s: request unfinished after %g s",
                                self.client, REQUEST_TIMEOUT)
            self.transport.close()


uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedH11Protocol"
