"""Drive an ASGI app (the guard) through one request without a server: the one helper the unit
tests of the guard, the page and the audio route share."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

HOST = (b"host", b"127.0.0.1:8003")


class Drive:
    """One request to `app`: `scope` as given (a host header first), the body in `chunks` (then a
    disconnect; with `stay`, a client that keeps waiting). `sent` is what the app sent, `read` how
    many body messages it took."""

    def __init__(self, app: Any, scope: dict[str, Any], chunks: Sequence[bytes] = (b"",),
                 stay: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.read = 0
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                 for i, c in enumerate(chunks)]

        async def receive() -> dict[str, Any]:
            if queue:
                self.read += 1
                return queue.pop(0)
            if stay:
                await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        scope = {**scope, "headers": [HOST, *scope.get("headers", [])]}
        asyncio.run(app(scope, receive, send))

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])
