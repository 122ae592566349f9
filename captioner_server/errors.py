"""The guard's error answers, in vLLM's JSON shape: its own refusals, and vLLM's errors as they pass
back through it: shutting down → 503 + Retry-After (clients retry), audio it cannot decode → 400,
anything about a URL the guard fetched → one uniform 400, any other message as one bounded line."""

from __future__ import annotations

import json
import re

from captioner_server.asgi import PRIVATE, Message, Send
from captioner_server.media_fetch import FETCH_FAILED
from captioner_server.request_policy import escape

MEDIA_FETCH_FAILED = FETCH_FAILED

# vLLM's words when a request reaches it after shutdown began (its media thread pool is closed),
# and for requests in flight when its engine process is gone (stopped under them, or crashed):
# /health answers 503 then too, and the request did nothing, so clients may resend it elsewhere.
SHUTTING_DOWN_MARKERS = (b"cannot schedule new futures after shutdown", b"EngineCore encountered an issue")
SHUTTING_DOWN = ("the server is shutting down or its engine stopped (stop, restart or crash); "
                 "retry in a few seconds")


# vLLM's 500s when the audio cannot be decoded (soundfile, PyAV, the model's processor): the
# client's mistake, so 400.
DECODE_MARKERS = ("Error opening", "decode", "Invalid or corrupted audio", "Failed to apply", "audio")
MAX_ERROR_CHARS = 300
DECODE_HINT = ("Send it as WAV, AIFF, FLAC, MP3 or Ogg (test_client.py and /v1/audio/transcriptions "
               "convert other audio).")


class Refusal(Exception):
    """A request the guard answers itself: status, vLLM's error type, message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def bad_request(message: str) -> Refusal:
    return Refusal(400, "BadRequestError", message)


def error_text(body: bytes) -> tuple[str | None, str]:
    """(message, type) of a JSON error body in vLLM's shape; (None, "") for any other body."""
    try:
        error = json.loads(body)["error"]
        message, kind = error["message"], error.get("type") or "Error"
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, ""
    return (message, str(kind)) if isinstance(message, str) else (None, "")


def one_line(message: str) -> str:
    """An error message as one bounded, printable line ("Failed to apply X on data={<array>}"
    loses its data, "<_io.BytesIO object at 0x7f...>" its address)."""
    line = message.split(" on data=", 1)[0].strip().splitlines()[0] if message.strip() else message
    line = escape(re.sub(r" at 0x[0-9a-fA-F]+>", ">", line))
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + "..."


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
                    (b"connection", b"close"), *PRIVATE, *(extra or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


async def shutting_down(send: Send) -> None:
    await error_response(send, 503, "ServiceUnavailable", SHUTTING_DOWN, [(b"retry-after", b"5")])


def shutdown_aware(send: Send, hide_errors: bool = False) -> Send:
    """A `send` that holds back an error until its body is known, then answers: vLLM shutting
    down → 503 + Retry-After; with hide_errors (the request made the guard fetch a URL, and
    errors would tell what is at the address) → MEDIA_FETCH_FAILED (400); vLLM failing to decode
    the audio (its 500) → 400; any other error message as one bounded line (vLLM's messages can
    hold a whole array dump)."""
    held: list[Message] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
            held.append(message)
            return
        if not held:
            await send(message)
            return
        held.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            body = b"".join(m.get("body", b"") for m in held[1:])
            status, (text, kind) = held[0].get("status", 500), error_text(body)
            if any(marker in body for marker in SHUTTING_DOWN_MARKERS):
                await shutting_down(send)
            elif hide_errors:
                await error_response(send, 400, "BadRequestError", MEDIA_FETCH_FAILED)
            elif status == 500 and text is not None and any(m in text for m in DECODE_MARKERS):
                await error_response(send, 400, "BadRequestError", decode_refusal(text))
            elif text is not None and one_line(text) != text:
                await error_response(send, status, kind, one_line(text))
            else:
                for m in held:
                    await send(m)
            held.clear()

    return wrapped


def decode_refusal(text: str) -> str:
    """The one line for audio vLLM could not decode: it reads with libsndfile alone
    (start_service.sh), so the line says which forms it takes and who converts the rest."""
    told = one_line(text)
    return f"could not decode the audio: {told}{'' if told.endswith('.') else '.'} {DECODE_HINT}"


async def answer_raised(send: Send, exc: Exception, fetched: bool) -> bool:
    """Answer an exception vLLM raised before its response started, as shutdown_aware answers the
    same error sent (vLLM's handler for uncaught exceptions sits outside the guard: Starlette's
    ServerErrorMiddleware): True when answered, False for one to raise on."""
    if any(m.decode() in str(exc) for m in SHUTTING_DOWN_MARKERS):
        await shutting_down(send)
    elif fetched:  # the exception's text would tell what is at the address; no traceback either
        await error_response(send, 400, "BadRequestError", MEDIA_FETCH_FAILED)
    elif any(m in str(exc) for m in DECODE_MARKERS):  # the client's audio: 400, no traceback
        await error_response(send, 400, "BadRequestError", decode_refusal(str(exc)))
    else:
        return False
    return True
