"""Request guard: an ASGI middleware that start_service.sh loads into vLLM's API server.

On a shared host 127.0.0.1 is open to every local account, so the API key is the boundary
between colleagues; vLLM's own `--api-key` guards /v1 only, reads whole bodies, and serves many
routes the kit never documents (one runs chat completions with no key). Everything arriving at
the API server passes here first, cheapest check first, and nothing vLLM does starts before:

1. Host: loopback names and addresses (any port: an SSH tunnel picks the local port) and the
   names in CAPTIONER_ALLOWED_HOSTS; any other Host header gets 421 (DNS rebinding).
2. More than MAX_HEADER_COUNT headers: 431. (Header *bytes* are capped by the HTTP parser:
   http_limits.py's GuardedH11Protocol.)
3. Origin: a request that a browser sent from another origin (an Origin header that is not
   this Host's) is 403, so no other web page can use the API (or read its answers, whatever
   CORS headers vLLM would add) through a browser on the tunnel's end.
4. The key (VLLM_API_KEY, when set) on every route but /health and the caption page, from the
   Authorization header, compared in constant time, before one byte of the body is read: 401.
5. Routes: only ROUTES reach vLLM (CAPTIONER_EXTRA_ROUTES opens more, `all` every one); the
   caption page (GET / and /page/*, from <kit>/web) is answered here and never reaches vLLM;
   any other path is 404, a known path with another method 405.
   Headers that vLLM reads as request settings (X-Vllm-Priority, X-data-parallel-rank,
   X-Session-ID) are 400, and an X-Request-Id is held to the request_id field's rule
   (request_policy.header_problem): vLLM puts it in its log lines.
6. Bodies: over CAPTIONER_MAX_REQUEST_BYTES is 413, from the Content-Length or while streaming
   (the body is never read whole before that decision).
7. /v1/chat/completions: JSON nested deeper than MAX_JSON_DEPTH is 400 (not a 500 and a
   traceback); then request_policy.py: one user message holding exactly one audio part of
   one of two exact shapes, and only the fields a caption needs, each with vLLM's own types and
   ranges, all decided before vLLM sees the media. An http(s) audio_url is refused at once (no DNS)
   when CAPTIONER_ALLOWED_MEDIA_DOMAINS is empty; else the guard fetches it itself
   (media_fetch.py) and hands vLLM the bytes inline, and any failure is one uniform error.
8. vLLM's 500 "cannot schedule new futures after shutdown" (a request that arrives while it
   drains) becomes 503 + Retry-After, which clients retry (errors.py).

Client mistakes cost one access-log line each (uvicorn's), never a traceback, and that line holds
no query string and at most MAX_LOGGED_TARGET escaped characters of the path (access_log.py).
Errors use vLLM's JSON shape. Loaded with `--middleware captioner_server.request_guard.RequestGuard`
and PYTHONPATH=<kit>.

Beside it: request_policy.py (what a caption request may be), media_fetch.py (the fetch of an
allowed audio URL), audio_api.py (the OpenAI audio API's upload route, captioned through the chat
path), caption_page.py (the page at /), http_limits.py (the HTTP parser's header cap and deadline;
importing this module imports it, which selects it), settings.py (the environment it reads),
errors.py (its error answers, and vLLM's mapped), asgi.py (ASGI's types, a body read as it streams).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

from captioner_server import http_limits  # noqa: F401  (importing it selects the guarded HTTP parser)
from captioner_server.access_log import bounded_log
from captioner_server.asgi import (
    ASGIApp,
    BodyTooLarge,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    body_chunks,
    body_then,
)
from captioner_server.caption_page import WEB_DIR, Page
from captioner_server.errors import (
    Refusal,
    answer_raised,
    bad_request,
    error_response,
    shutdown_aware,
)
from captioner_server.media_fetch import FetchFailed, fetch_audio
from captioner_server.request_policy import Limits, audio_only_problem, header_problem, remote_audio_urls
from captioner_server.settings import guard_settings


class Route(NamedTuple):
    methods: frozenset[str]
    public: bool  # answered without the API key


# The OpenAI audio API (a multipart upload): audio_api.py answers it, through the chat path.
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/captions")
# What the kit documents; nothing else reaches vLLM. (The caption page is not here: the guard
# answers it itself, see Page below.)
ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route(frozenset({"POST"}), False),
    **{path: Route(frozenset({"POST"}), False) for path in AUDIO_PATHS},
    "/v1/models": Route(frozenset({"GET"}), False),
    "/health": Route(frozenset({"GET"}), True),
    "/metrics": Route(frozenset({"GET"}), False),
    "/version": Route(frozenset({"GET"}), False),
}
# The caption page and its assets: public (a browser fetches them before it has a key; they hold
# no data), GET and HEAD only.
PAGE_ROUTE = Route(frozenset({"GET", "HEAD"}), True)

CHAT_PATH = "/v1/chat/completions"
MAX_JSON_DEPTH = 32  # a caption request is 6 deep
MAX_HEADER_COUNT = 100
FETCH_SECONDS = 10.0  # a remote clip's whole fetch, and the time every failed fetch takes

NO_REMOTE_MEDIA = (
    "this server fetches no URL (ALLOWED_MEDIA_DOMAINS is empty): send the audio inline as a "
    "data: URL or input_audio (test_client.py does)"
)
UNREADABLE_BODY = ("the request does not have the shape of a caption request: send one user message "
                   "whose content is one audio part (test_client.py's requests show the shape)")
UNAUTHORIZED = "missing or wrong API key: send the header 'Authorization: Bearer <API_KEY>'"
CROSS_ORIGIN = ("cross-origin request refused: this API answers only its own page (open "
                "http://127.0.0.1:<port>/ through the tunnel) and clients that send no Origin")

# --- pure checks (unit-tested without a server) ---------------------------------------------


def host_name(host: str) -> str:
    """The name of a Host header value, without its port: `[::1]:8003` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: bytes | None, extra: Iterable[str] = ()) -> bool:
    """Loopback names and addresses, or a name the operator listed; any port."""
    if not host:
        return False
    try:
        name = host_name(host.decode("ascii"))
    except UnicodeDecodeError:
        return False
    return is_loopback_name(name) or name in set(extra)


def same_origin(origin: bytes | None, host: bytes | None) -> bool:
    """True when there is no Origin header (not a browser's cross-origin request) or it names the
    Host the request came to: `http://127.0.0.1:8003` for `127.0.0.1:8003`. `null` is foreign."""
    if origin is None:
        return True
    try:
        scheme, _, rest = origin.decode("ascii").strip().lower().partition("://")
        return scheme in ("http", "https") and bool(host) and rest == (host or b"").decode("ascii").lower()
    except UnicodeDecodeError:
        return False


def key_matches(authorization: bytes | None, key: str) -> bool:
    """Constant-time comparison of the Authorization header with `Bearer <key>`."""
    return hmac.compare_digest(authorization or b"", f"Bearer {key}".encode())


def route_for(path: str, method: str, extra: Iterable[str] = ()) -> Route | None:
    """The documented route for a path, an operator-opened one, or None."""
    route = ROUTES.get(path)
    if route is not None:
        return route
    opened = set(extra)
    if "all" in opened or path in opened:
        return Route(frozenset({method}), False)
    return None


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item)
    return depth


def policy_problem(parsed: Any, limits: Limits) -> str | None:
    """request_policy.py's answer; a body shape it did not foresee is the client's mistake too: one
    400 line, never a 500 with a traceback (whose log line would hold the URL's query string)."""
    try:
        return audio_only_problem(parsed, limits)
    except Exception as exc:  # any failure of a pure check on the client's JSON
        logging.getLogger("request_guard").warning("request_guard: the request policy failed on a body "
                                                   "(%s): refused with 400", type(exc).__name__)
        return UNREADABLE_BODY


# --- ASGI -----------------------------------------------------------------------------------

class RequestGuard:
    def __init__(self, app: ASGIApp, max_bytes: int | None = None, api_key: str | None = None,
                 extra_routes: str | None = None, allowed_hosts: str | None = None,
                 media_domains: str | None = None, limits: Limits | None = None) -> None:
        self.app = app
        # The environment's settings (settings.py), where no argument gives one.
        given = guard_settings(os.environ, max_bytes, api_key, extra_routes, allowed_hosts, media_domains,
                               limits)
        self.max_bytes, self.api_key, self.limits = given.max_bytes, given.api_key, given.limits
        self.extra_routes, self.allowed_hosts = given.extra_routes, given.allowed_hosts
        self.media_domains, self.max_fetch_bytes = given.media_domains, given.max_fetch_bytes
        self.page = Page.load(WEB_DIR, key_required=bool(self.api_key))

    def too_large(self, size: int) -> str:
        return (
            f"request body of {size}+ bytes is over the server's limit of {self.max_bytes} bytes "
            "(MAX_REQUEST_BYTES); send shorter audio, or split it (test_client.py sends 30 s windows)"
        )

    def check_head(self, scope: Scope) -> Route:
        """Everything decided from the request line and headers, before any body is read."""
        headers = scope.get("headers") or []
        if len(headers) > MAX_HEADER_COUNT:
            raise Refusal(431, "RequestHeaderFieldsTooLarge",
                          f"{len(headers)} headers: the server takes at most {MAX_HEADER_COUNT}")
        by_name = dict(headers)
        if not host_allowed(by_name.get(b"host"), self.allowed_hosts):
            raise Refusal(421, "MisdirectedRequest",
                          "Host header not served here: use 127.0.0.1 or localhost, or add the name "
                          "to ALLOWED_HOSTS")
        if not same_origin(by_name.get(b"origin"), by_name.get(b"host")):
            raise Refusal(403, "Forbidden", CROSS_ORIGIN)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        route = PAGE_ROUTE if path in self.page.files else route_for(path, method, self.extra_routes)
        if (route is None or not route.public) and self.api_key:
            if not key_matches(by_name.get(b"authorization"), self.api_key):
                raise Refusal(401, "Unauthorized", UNAUTHORIZED)
        if route is None:
            raise Refusal(404, "NotFoundError", f"no route {path} here (this server captions audio: "
                          f"POST {CHAT_PATH})")
        if method not in route.methods:
            raise Refusal(405, "MethodNotAllowed", f"{path} takes {', '.join(sorted(route.methods))}")
        problem = header_problem(headers)
        if problem:
            raise bad_request(problem)
        declared = by_name.get(b"content-length")
        if self.max_bytes is not None and declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                raise Refusal(413, "RequestEntityTooLarge", self.too_large(int(declared)))
        return route

    async def check_chat(self, body: bytes) -> tuple[bytes, bool]:
        """A chat request's checks: the body vLLM gets (remote audio fetched and inlined), and
        whether anything was fetched."""
        try:
            parsed = json.loads(body)
        except RecursionError:
            raise bad_request(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError:
            return body, False  # vLLM answers malformed JSON itself (400)
        if json_depth(parsed) > MAX_JSON_DEPTH:
            raise bad_request(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        problem = policy_problem(parsed, self.limits)
        if problem:
            raise bad_request(problem)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("messages"), list):
            return body, False
        if not remote_audio_urls(parsed):
            return body, False
        return await self.inline_remote_audio(parsed), True

    async def inline_remote_audio(self, parsed: dict[str, Any]) -> bytes:
        """Fetch each http(s) audio URL (media_fetch.py: resolved once, the address checked
        and pinned, no redirects, size and time capped, one error after a uniform time) and put
        the bytes in the request as a data: URL: vLLM never fetches anything."""
        if not self.media_domains:
            raise bad_request(NO_REMOTE_MEDIA)
        for part in parsed["messages"][0]["content"]:
            url = part.get("audio_url", {}).get("url", "") if part.get("type") == "audio_url" else ""
            if url.split(":", 1)[0].strip().lower() not in ("http", "https"):
                continue
            try:
                data, _ = await fetch_audio(url, self.media_domains, max_bytes=self.max_fetch_bytes,
                                            timeout=FETCH_SECONDS, uniform_seconds=FETCH_SECONDS)
            except FetchFailed as exc:
                if exc.detail:
                    logging.getLogger("request_guard").warning("request_guard: audio fetch failed: %s",
                                                               exc.detail)
                raise bad_request(str(exc)) from None
            # vLLM detects the container from the bytes; the type here only makes a valid data: URL.
            part["audio_url"]["url"] = "data:audio/wav;base64," + base64.b64encode(data).decode("ascii")
        return json.dumps(parsed).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        send = bounded_log(scope, send)
        try:
            route = self.check_head(scope)
        except Refusal as r:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await error_response(send, r.status, r.kind, r.message)
            return
        if route is PAGE_ROUTE:
            await self.page.serve(scope, send)
            return
        if scope.get("path") in AUDIO_PATHS:
            # Imported here, not above: it imports this module (and the client's decoder).
            from captioner_server import audio_api

            await audio_api.serve(self, scope, receive, send)
            return
        if scope["type"] == "websocket" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge as exc:
            await error_response(send, 413, "RequestEntityTooLarge", self.too_large(int(str(exc))))
            return
        except ClientGone:
            return
        fetched = False
        if scope.get("path") == CHAT_PATH:
            try:
                body, fetched = await self.check_chat(body)
            except Refusal as r:
                await error_response(send, r.status, r.kind, r.message)
                return

        replay = body_then(body, receive)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, shutdown_aware(tracked, hide_errors=fetched))
        except Exception as exc:
            # vLLM's handler for uncaught exceptions sits outside this middleware (Starlette's
            # ServerErrorMiddleware): a shutdown error, or a fetch that failed, reaches us raised.
            if started or not await answer_raised(send, exc, fetched):
                raise

    async def _read_body(self, receive: Receive) -> bytes:
        return b"".join([chunk async for chunk in body_chunks(receive, self.max_bytes)])
