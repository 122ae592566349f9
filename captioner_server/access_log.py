"""What uvicorn's access log may hold of a request. Client mistakes cost one access-log line each
(uvicorn's, written from the request's scope as the response starts), never a traceback, and that
line holds no query string and at most MAX_LOGGED_TARGET escaped characters of the path."""

from __future__ import annotations

from captioner_server.asgi import Message, Scope, Send
from captioner_server.request_policy import escape

MAX_LOGGED_TARGET = 200  # characters of a request's path (and method) in the access log


def bounded_log(scope: Scope, send: Send) -> Send:
    """A `send` that, as the response starts (when uvicorn writes the access-log line from the
    scope), leaves in the scope only what may be logged: no query string (a key sent as
    ?api_key= never reaches the log), the path and method escaped and cut to MAX_LOGGED_TARGET
    characters (a 65 KB path costs ~200 bytes of log, not 65 KB)."""
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            scope["query_string"] = b""
            for key in ("path", "method"):
                value = scope.get(key)
                if isinstance(value, str) and (len(value) > MAX_LOGGED_TARGET or escape(value) != value):
                    cut = escape(value[:MAX_LOGGED_TARGET])[:MAX_LOGGED_TARGET]
                    scope[key] = cut + ("..." if len(value) > MAX_LOGGED_TARGET else "")
        await send(message)

    return wrapped
