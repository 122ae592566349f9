"""Request guard: an ASGI middleware that start_service.sh loads into vLLM's API server.

vLLM 0.32 has no request body limit (uvicorn's h11 `max_incomplete_event_size` bounds headers
only: a body arrives as a stream of Data events), and it captions a chat request that carries no
audio at all (the model then answers a text prompt it was never trained on). This guard:

- refuses a POST body over CAPTIONER_MAX_REQUEST_BYTES with 413, before reading it when the
  Content-Length says so, else as soon as the streamed body passes the limit;
- refuses a /v1/chat/completions request whose messages hold no audio part with 400;
- turns the 500 "cannot schedule new futures after shutdown" that vLLM answers to requests arriving
  while it drains (SIGTERM, SHUTDOWN_DRAIN) into 503 + Retry-After, which clients retry: a restart
  under a running batch then costs the batch a wait, not failed inputs.

Errors use vLLM's own JSON shape, so clients (and the OpenAI SDK) read them like vLLM's.
Loaded with `--middleware request_guard.RequestGuard` and PYTHONPATH=<kit>/lib.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
AUDIO_PART_TYPES = frozenset({"audio_url", "input_audio"})
NO_AUDIO = (
    "this server captions audio: the request holds no audio part (send one audio_url or "
    "input_audio part; the Captioner takes no text prompt)"
)


# vLLM 0.32's words when a request reaches it after shutdown began (its media thread pool is closed).
SHUTTING_DOWN_MARKERS = (b"cannot schedule new futures after shutdown",)
SHUTTING_DOWN = "the server is shutting down (stop or restart in progress); retry in a few seconds"


class BodyTooLarge(Exception):
    pass


def has_audio_part(body: Any) -> bool:
    """True when some message's content list holds an audio part (or the body is not a chat
    request we understand: vLLM's own validation answers that one)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return True
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in AUDIO_PART_TYPES:
                    return True
    return False


async def error_response(
    send: Send, status: int, kind: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"), *(extra or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


def shutdown_aware(send: Send) -> Send:
    """A `send` that holds back a 500 until its body shows whether it is vLLM shutting down."""
    held: list[Message] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 500:
            held.append(message)
            return
        if not held:
            await send(message)
            return
        held.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            body = b"".join(m.get("body", b"") for m in held[1:])
            if any(marker in body for marker in SHUTTING_DOWN_MARKERS):
                await error_response(send, 503, "ServiceUnavailable", SHUTTING_DOWN, [(b"retry-after", b"5")])
            else:
                for m in held:
                    await send(m)
            held.clear()

    return wrapped


class RequestGuard:
    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        if max_bytes is None:
            max_bytes = int(os.environ.get("CAPTIONER_MAX_REQUEST_BYTES") or 0)
        self.max_bytes = max_bytes if max_bytes > 0 else None

    def too_large(self, size: int) -> str:
        return (
            f"request body of {size}+ bytes is over the server's limit of {self.max_bytes} bytes "
            "(MAX_REQUEST_BYTES); send shorter audio, or split it (test_client.py sends 30 s windows)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if self.max_bytes is not None and declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await error_response(send, 413, "RequestEntityTooLarge", self.too_large(int(declared)))
                return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge as exc:
            await error_response(send, 413, "RequestEntityTooLarge", self.too_large(int(str(exc))))
            return
        if scope.get("path") == CHAT_PATH:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # vLLM answers malformed JSON itself
            if not has_audio_part(parsed):
                await error_response(send, 400, "BadRequestError", NO_AUDIO)
                return

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, shutdown_aware(tracked))
        except Exception as exc:
            # vLLM's handler for uncaught exceptions sits outside this middleware (Starlette's
            # ServerErrorMiddleware): a shutdown error reaches us raised, not as a 500.
            if started or not any(m.decode() in str(exc) for m in SHUTTING_DOWN_MARKERS):
                raise
            await error_response(send, 503, "ServiceUnavailable", SHUTTING_DOWN, [(b"retry-after", b"5")])

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away; the app sees an empty body and its own disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_bytes is not None and size > self.max_bytes:
                raise BodyTooLarge(str(size))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
