"""ASGI's types, as the guard's modules use them, and a request body read as it streams in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# On what the guard answers itself (captions, errors): kept by no cache, read as the type it says.
PRIVATE = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def body_chunks(receive: Receive, max_bytes: int | None) -> AsyncIterator[bytes]:
    """A request body's chunks as they arrive: BodyTooLarge(size) once past `max_bytes` (the body
    is never read whole before that), ClientGone if the client leaves first."""
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise BodyTooLarge(str(size))
        yield chunk
        if not message.get("more_body", False):
            return


def body_then(body: bytes, then: Receive) -> Receive:
    """A receive that hands the app `body` whole, once, then whatever `then` receives (for an app
    called with a body already read)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
