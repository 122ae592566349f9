"""HTTP calls to one caption server (vLLM's OpenAI-compatible API).

Retries are urllib3's `Retry`: connection failures and 502/503/504 (a restarting
server or a proxy in front of one) are retried with exponential backoff, or after
the pause a Retry-After header asks for. A read timeout is not: the server is still
working on the caption, and a retry would double its load.

The default, 7 retries with backoff 0, 1, 2, 4, 8, 16, 30 s (factor 0.5, each pause
capped at 30 s), waits about a minute in all: long enough to ride through a restart
of the server on the tiny CPU model (~30 s); a GPU server loading the 30B model
takes minutes, so set --retries higher there, or rerun the batch (it resumes).

A connection the server closed or reset before any byte of an answer is retried by
the same `Retry` (`CaptionRetry`), counted like a refused connection, with the same
backoff: urllib3 files it under "read" errors together with read timeouts, and a
read timeout must not be resent (slow captions would be sent twice). A caption
request has no side effects, so resending one the server may have started costs at
most some work. An answer cut off after it began is not resent.

Each retry's pause is announced by one line on stderr (a warning of the "captioner" logger):
the server, what failed, and the next try ("retry 2 of 7 in 1 s"). Identical lines within a
second (many requests failing at once on one server) are said once.

One case is resent even with --retries 0, at once: a *reused* keep-alive connection
that the server closed while it sat idle in the pool (vLLM closes the connection
after some errors, e.g. its 500 for undecodable audio, a moment after answering).
Nothing reached the server on it, so this is not a retry but the pool's own
bookkeeping, as in browsers and Go's net/http. Each stale pooled connection is
resent over once; a fresh connection never is, so it cannot loop.

All of that is the one `CaptionRetry`; nothing here loops or sleeps on its own. A failed
request's exception is turned into the client's error by its type, in `transport_error`.

A request's body is built once, as the bytes sent (payload.chat_request_bytes), and the same
bytes go out on every retry and to every server a request fails over to.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.retry import RequestHistory, Retry

from captioner.errors import (
    CaptionerError,
    ServerConnectionError,
    ServerHTTPError,
    ServerTimeoutError,
)
from captioner.options import BACKOFF_MAX, DEFAULT_BACKOFF, DEFAULT_BASE_URL, DEFAULT_RETRIES, RETRY_STATUSES
from captioner.payload import chat_request_bytes

log = logging.getLogger("captioner")

__all__ = ["RETRY_STATUSES", "CaptionClient"]  # RETRY_STATUSES: the caption page reads it here
# vLLM's messages for the client mistakes it answers with HTTP 500 (docs/RELIABILITY.md,
# "Bad input"): audio its decoders cannot read, whatever the codec — libsndfile's
# LibsndfileError ("Error opening <...>: ...", or "Error : flac decoder lost sync." for a
# truncated FLAC), FFmpeg's "Invalid data found ...", torchcodec/PyAV's "Invalid or
# corrupted audio data" — and local files.
BAD_INPUT_500 = re.compile(
    r"^Error( opening [^:]*)? ?: |Failed to decode|Invalid data found|"
    r"Invalid or corrupted audio|No audio found|decoder lost sync|psf_fseek|"
    r"Cannot load local files|allowed-local-media-path|file://",
    re.IGNORECASE,
)
JSON = {"Content-Type": "application/json"}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        if not isinstance(data, dict):
            return cls()
        return cls(
            int(data.get("prompt_tokens") or 0),
            int(data.get("completion_tokens") or 0),
            int(data.get("total_tokens") or 0),
        )


@dataclass
class Caption:
    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    latency: float = 0.0


# Whether the connection the current thread's request went out on came from the pool
# already used (a kept-alive connection) rather than freshly opened. A request runs in
# one thread from `_get_conn` to `Retry.increment`, so a thread-local carries it.
_connection = threading.local()


def _mark_reuse(conn: Any) -> Any:
    # A pooled connection that was never connected, or that urllib3 found dropped and
    # closed in `_get_conn`, has no socket: it will be a fresh connection.
    _connection.reused = getattr(conn, "sock", None) is not None
    return conn


class _ReuseTrackingHTTPPool(HTTPConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        return _mark_reuse(super()._get_conn(timeout))


class _ReuseTrackingHTTPSPool(HTTPSConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        return _mark_reuse(super()._get_conn(timeout))


# Told a retry is coming: (what failed, this retry's number, how many in all, the pause,
# whether the server's Retry-After set the pause).
RetryHook = Callable[[str, int, int, float, bool], None]


class CaptionRetry(Retry):
    """urllib3's `Retry`, plus: a request the server dropped before answering is retried
    like a refused connection, one dropped on a stale kept-alive connection is resent at
    once without counting (see the module docstring), and `on_retry`, when set, is told of
    each retry before its pause."""

    def __init__(self, *args: Any, on_retry: RetryHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_retry = on_retry
        self._pause = True

    def new(self, **kw: Any) -> CaptionRetry:
        retry = super().new(**kw)
        retry.on_retry = self.on_retry
        return retry

    def _is_connection_error(self, err: Exception) -> bool:
        return super()._is_connection_error(err) or dropped_before_answer(err)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> CaptionRetry:
        if error is not None and getattr(_connection, "reused", False) and dropped_before_answer(error):
            _connection.reused = False
            log.debug("%s: kept-alive connection was closed by the server; resending", url)
            resend = self.new()
            resend._pause = False
            return resend
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response: Any = None) -> None:
        if not self._pause:
            return
        if self.on_retry is not None and self.history:
            # The pause urllib3's own sleep() is about to take: Retry-After if the answer has one
            # (a 0 counts as none, as there), else the backoff.
            asked = response is not None and self.respect_retry_after_header
            retry_after = self.get_retry_after(response) if asked else None
            pause = retry_after or self.get_backoff_time()
            number = len(self.history)
            left = self.total if isinstance(self.total, int) and not isinstance(self.total, bool) else 0
            self.on_retry(retry_reason(self.history[-1]), number, number + left, pause, bool(retry_after))
        super().sleep(response)

    def pauses(self) -> list[float]:
        """The pause before each retry this policy has left, as urllib3 computes it
        (a server's Retry-After aside): [0, 1, 2, 4, 8, 16, 30] for the default."""
        left = self.total if isinstance(self.total, int) and not isinstance(self.total, bool) else 0
        history, pauses = self.history, []
        for _ in range(left):
            history += (RequestHistory("GET", None, None, None, None),)
            pauses.append(self.new(history=history).get_backoff_time())
        return pauses


def retry_reason(attempt: RequestHistory) -> str:
    """`connection refused`, `HTTP 503`: why a request is being retried, in words."""
    if attempt.status:
        return f"HTTP {attempt.status}"
    if attempt.error is not None:
        causes = list(_causes(attempt.error))
        if any(isinstance(c, ProtocolError) for c in causes):
            return "the connection was dropped before an answer"
        return _connect_failure(causes, None)
    return "no answer"


def caption_retry(
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    on_retry: RetryHook | None = None,
) -> CaptionRetry:
    """The client's retry policy: refused or dropped connections and 502/503/504, each
    retried `retries` times in all with exponential backoff; never a read timeout."""
    return CaptionRetry(
        total=retries,
        connect=retries,
        read=False,  # False, not 0: re-raise the read error itself, not MaxRetryError
        status=retries,
        other=0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # POST too: a 503 or refused connection ran nothing
        backoff_factor=backoff,
        backoff_max=BACKOFF_MAX,
        raise_on_status=False,
        on_retry=on_retry,
    )


class CaptionAdapter(HTTPAdapter):
    """requests' adapter on connection pools that know a reused connection from a new one."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _ReuseTrackingHTTPPool,
            "https": _ReuseTrackingHTTPSPool,
        }


def normalize_base_url(url: str) -> str:
    """The server's root URL: trailing slashes and an OpenAI-style `/v1` dropped."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    return url


class CaptionClient:
    """One server: a pooled, retrying `requests.Session` plus the calls we make.

    Every retry's pause is announced with one warning line (`_retrying`): a run that starts
    while the server is down or restarting waits for it, and says so as it goes.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        pool_size: int = 8,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout = (connect_timeout, read_timeout)
        self.retries = retries
        self._said: dict[str, float] = {}  # retry line -> when it was said
        self._said_lock = threading.Lock()
        self.closed = False
        retry = caption_retry(retries, backoff, self._retrying)
        self.session = requests.Session()
        adapter = CaptionAdapter(max_retries=retry, pool_maxsize=max(pool_size, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        """The run is over: a request still under way (the batch stopped) retries no more."""
        self.closed = True
        self.session.close()

    def _retrying(self, reason: str, number: int, total: int, pause: float, asked: bool) -> None:
        if self.closed:  # raised through urllib3 and requests as it is: the request ends here
            raise ServerConnectionError(f"{self.base_url}: {reason} (not retried: the run is over)")
        when = "now" if pause <= 0 else f"in {pause:g} s" + (" (Retry-After)" if asked else "")
        line = f"{self.base_url}: {reason}; retry {number} of {total} {when}"
        now = time.monotonic()
        with self._said_lock:
            if now - self._said.get(line, -1e9) < 1.0:
                return
            self._said = {k: t for k, t in self._said.items() if now - t < 1.0}
            self._said[line] = now
        log.warning("%s", line)

    def list_models(self) -> list[str]:
        """The served models."""
        data = self._json(self._request("GET", "/v1/models"))
        return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]

    def caption(self, audio_url: str, model: str, max_tokens: int | None = None) -> Caption:
        """Caption the audio at `audio_url` (a `data:` URL, or one the server may fetch)."""
        return self.caption_body(chat_request_bytes(audio_url, model, max_tokens), model)

    def caption_body(self, body: bytes, model: str) -> Caption:
        """Send a chat request built as bytes (payload.chat_request_bytes); `model` stands in
        for the answer's when it names none."""
        started = time.monotonic()
        data = self._json(self._request("POST", "/v1/chat/completions", data=body, headers=JSON))
        try:
            text = data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CaptionerError(f"{self.base_url}: unexpected answer: {data!r:.200}") from exc
        return Caption(
            text,
            str(data.get("model") or model),
            Usage.from_json(data.get("usage")),
            time.monotonic() - started,
        )

    def caption_stream_body(self, body: bytes, model: str, on_text: Callable[[str], None]) -> Caption:
        """Stream a caption (SSE) of a request built as bytes (with `stream=True`), calling
        `on_text` with each piece as it arrives."""
        started = time.monotonic()
        response = self._request("POST", "/v1/chat/completions", data=body, headers=JSON, stream=True)
        pieces: list[str] = []
        usage = Usage()
        answered_model = model
        with response:
            for event in self._sse_events(response):
                if "error" in event:
                    raise _http_error(500, event)
                answered_model = str(event.get("model") or answered_model)
                if event.get("usage"):
                    usage = Usage.from_json(event["usage"])
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        pieces.append(piece)
                        on_text(piece)
        return Caption("".join(pieces), answered_model, usage, time.monotonic() - started)

    def _sse_events(self, response: requests.Response) -> Iterator[dict[str, Any]]:
        try:
            # chunk_size=None: hand over each chunk as it arrives (the default, 512, would
            # hold pieces back until half a kilobyte has gathered).
            for raw in response.iter_lines(chunk_size=None):
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                yield json.loads(payload)
        except requests.RequestException as exc:
            raise transport_error(exc, self.base_url, self.timeout) from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise transport_error(exc, self.base_url, self.timeout) from exc
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            response.close()
            raise _http_error(response.status_code, body, self.base_url)
        return response

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise CaptionerError(f"{self.base_url}: answer is not JSON") from exc
        if not isinstance(data, dict):
            raise CaptionerError(f"{self.base_url}: unexpected answer: {data!r:.200}")
        return data


def retry_pauses(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> list[float]:
    """The pause before each of `retries` retries, as urllib3 computes them."""
    return caption_retry(retries, backoff).pauses()


def retry_wait(retries: int, backoff: float = DEFAULT_BACKOFF) -> float:
    """All the pauses of `retries` retries: 61 s for the default 7."""
    return sum(retry_pauses(retries, backoff))


def transport_error(
    exc: requests.RequestException, base_url: str, timeout: tuple[float, float]
) -> CaptionerError:
    """The client's error for a request that got no answer, or only part of one: the one
    place that tells them apart, by the types of the exception and its causes (requests
    wraps urllib3's errors, which wrap the socket's)."""
    causes = list(_causes(exc))
    if any(isinstance(c, (ReadTimeoutError, requests.exceptions.ReadTimeout)) for c in causes):
        # Streamed answers too: requests reports their read timeout as a ConnectionError.
        return ServerTimeoutError(
            f"{base_url}: no answer within {timeout[1]:g} s "
            "(read timeout; raise it with --timeout, or check the server's load)"
        )
    if any(isinstance(c, ProtocolError) for c in causes):  # dropped before or during the answer
        return ServerConnectionError(
            f"{base_url}: the server closed the connection mid-request "
            "(restarted or crashed?); check ./status_service.sh and its log"
        )
    port = urlsplit(base_url).port or 8003
    return ServerConnectionError(
        f"cannot connect to {base_url}: {_connect_failure(causes, timeout[0])}. Is the service "
        f"running? Check with ./status_service.sh on its host; from another machine open a tunnel "
        f"first: ssh -N -L {port}:127.0.0.1:{port} host"
    )


def describe_failure(exc: requests.RequestException, timeout: tuple[float, float]) -> str:
    """What went wrong with a request that got no whole answer, in words (`connection refused`,
    `no answer within 120 s`, `TLS error: certificate verify failed ...`), for messages about
    hosts other than the caption server (a download)."""
    causes = list(_causes(exc))
    if any(isinstance(c, (ReadTimeoutError, requests.exceptions.ReadTimeout)) for c in causes):
        return f"no answer within {timeout[1]:g} s"
    if any(isinstance(c, (SSLError, requests.exceptions.SSLError)) for c in causes):
        return f"TLS error: {_deepest_words(causes)}"
    if any(isinstance(c, requests.exceptions.TooManyRedirects) for c in causes):
        return "too many redirects"
    if any(isinstance(c, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema))
           for c in causes):  # fmt: skip
        return "not a URL that can be fetched"
    if any(isinstance(c, ProtocolError) and dropped_before_answer(c) for c in causes):
        return "the server closed the connection without an answer"
    if any(isinstance(c, ProtocolError) for c in causes):
        return "the connection was closed in the middle of the answer"
    return f"cannot connect: {_connect_failure(causes, timeout[0])}"


def _connect_failure(causes: list[BaseException], connect_timeout: float | None) -> str:
    """`connection refused`, `host name not found`, ...: why no connection was made."""
    for cause in causes:
        if isinstance(cause, (NameResolutionError, socket.gaierror)):
            return "host name not found"
        if isinstance(cause, ConnectTimeoutError) and not isinstance(cause, NewConnectionError):
            if connect_timeout is None:
                return "no connection in time"
            return f"no connection within {connect_timeout:g} s"
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:  # ConnectionRefusedError, ENETUNREACH ...
            return cause.strerror[0].lower() + cause.strerror[1:]
    return _deepest_words(causes)


def _deepest_words(causes: list[BaseException]) -> str:
    """The innermost cause's own message, on one line, without urllib3's object reprs."""
    for cause in reversed(causes):
        text = re.sub(r"<[^>]*>:? ?", "", str(cause)).strip(" :")
        if text:
            return re.sub(r"\s+", " ", text)[:200]
    return "the request failed"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: requests' argument, urllib3's `reason`, `raise ... from`
    (not the exceptions merely being handled: an earlier attempt's error is one of those)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (*current.args, getattr(current, "reason", None), current.__cause__)
        todo.extend(x for x in linked if isinstance(x, BaseException))


def dropped_before_answer(error: BaseException) -> bool:
    """True for urllib3's error for a request the server dropped (closed, reset) before
    any byte of an answer: ProtocolError('Connection aborted.', cause). A read timeout is
    a ReadTimeoutError and an answer cut off midway a ProtocolError of another cause
    (IncompleteRead, InvalidChunkLength): neither matches."""
    if not isinstance(error, ProtocolError) or len(error.args) < 2:
        return False
    # RemoteDisconnected ("closed connection without response") is a ConnectionResetError.
    return isinstance(error.args[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))


def _http_error(status: int, body: Any, base_url: str = "") -> ServerHTTPError:
    """A `ServerHTTPError` quoting the server's own message, on one line."""
    message: Any = body
    if isinstance(body, dict):
        message = body.get("error", body.get("message", body.get("detail", body)))
        if isinstance(message, dict):
            message = message.get("message", message)
    text = re.sub(r"\s+", " ", str(message)).strip()[:500] or "(no message)"
    where = f"{base_url}: " if base_url else ""
    hint = ""
    if status in (401, 403):
        hint = " (wrong or missing API key? set --api-key or CAPTIONER_API_KEY)"
    bad_input = status == 500 and BAD_INPUT_500.search(text) is not None
    if bad_input:
        kind = "server could not use the input"
    elif status >= 500:
        kind = "server error"
    else:
        kind = "server refused the request"
    return ServerHTTPError(status, f"{where}{kind}: HTTP {status}: {text}{hint}", bad_input)
