"""The request guard against bodies, upgrades and headers a client should not be able to use
(an audit's findings), through its real ASGI entry point around a fake vLLM, without a server:
each is one 400 line (or a closed WebSocket) that vLLM never sees, never a 500 and a traceback."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from captioner.payload import chat_request, data_url, wav_bytes
from captioner_server import request_guard
from captioner_server.request_guard import RequestGuard
from captioner_server.request_policy import Limits, escape
from tests.asgi import Drive

CLIP = wav_bytes(b"\x00\x01" * 1600)
KEY = "k-1"
AUTH = (b"authorization", f"Bearer {KEY}".encode())
CLOSED = {"type": "websocket.close", "code": 1008}  # before accept: the server answers 403


class FakeVllm:
    """An upstream that records what reached it and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})


def call(guard: RequestGuard, path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
         kind: str = "http", method: str = "POST") -> list[dict[str, Any]]:
    """What the guard sends for one request (or WebSocket upgrade)."""
    scope: dict[str, Any] = {"type": kind, "path": path, "query_string": b"api_key=SECRET",
                             "headers": [AUTH, *(headers or [])]}
    if kind == "http":
        scope["method"] = method
    return Drive(guard, scope, [body]).sent


def refusal(sent: list[dict[str, Any]]) -> tuple[int, str]:
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert isinstance(message, str) and escape(message) == message and len(message) < 300, message
    return sent[0]["status"], message


def guard_with(upstream: FakeVllm, limits: Limits | None = None) -> RequestGuard:
    return RequestGuard(upstream, max_bytes=1_000_000, api_key=KEY,  # type: ignore[arg-type]
                        limits=limits or Limits(max_tokens=16384))


def caption(**fields: Any) -> dict[str, Any]:
    return {**chat_request(data_url(CLIP), "captioner"), **fields}


def with_part(part: Any, after_audio: bool = False) -> bytes:
    body = caption()
    body["messages"][0]["content"] = [*body["messages"][0]["content"][: int(after_audio)], part]
    return json.dumps(body).encode()


# --- 1. malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "named"), [
    (json.dumps(caption())[:-1].encode() + b', "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    (json.dumps(caption())[:-1].encode() + b', "top_p": -1' + b"0" * 400 + b"}", "top_p"),
    (with_part({"type": []}), "holds no audio part"),
    (with_part({"type": []}, after_audio=True), "a part of type []"),
    (with_part({"type": {"a": 1}, "audio_url": {"url": "x"}}, after_audio=True), "a part of type {"),
], ids=["400-digit temperature", "400-digit negative top_p", "list type alone", "list type after audio",
        "object type after audio"])
def test_a_huge_integer_or_a_part_type_that_is_no_string_is_a_one_line_400(
        body: bytes, named: str, caplog: pytest.LogCaptureFixture) -> None:
    upstream = FakeVllm()
    with caplog.at_level(logging.DEBUG):
        sent = call(guard_with(upstream), "/v1/chat/completions", body)
    status, message = refusal(sent)
    assert status == 400 and named in message, message
    assert upstream.scopes == [] and not [r for r in caplog.records if r.exc_info]


def test_any_other_failure_of_the_body_check_is_a_one_line_400_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unforeseen(parsed: Any, limits: Limits) -> str | None:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(request_guard, "audio_only_problem", unforeseen)
    upstream = FakeVllm()
    with caplog.at_level(logging.DEBUG):
        sent = call(guard_with(upstream), "/v1/chat/completions", json.dumps(caption()).encode())
    assert refusal(sent) == (400, request_guard.UNREADABLE_BODY)
    assert upstream.scopes == [] and not [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in caplog.records if r.name == "request_guard"] == [
        "request_guard: the request policy failed on a body (TypeError): refused with 400"]


# --- 2. WebSocket upgrades ----------------------------------------------------------------------


def test_a_websocket_to_the_page_is_closed_and_one_to_the_api_still_needs_the_key() -> None:
    upstream = FakeVllm()
    guard = guard_with(upstream)
    assert "/" in guard.page.files  # the page is served here (web/ and the client are installed)
    for path in ("/", "/page/app.js", "/page/config.json"):
        assert call(guard, path, kind="websocket") == [CLOSED], path
    assert upstream.scopes == []
    guard.api_key = KEY + "-other"  # the test's Authorization is now wrong
    assert call(guard, "/v1/chat/completions", kind="websocket") == [CLOSED]
    assert upstream.scopes == []
    assert call(guard, "/", method="GET")[0]["status"] == 200  # the page itself, over HTTP, as before


# --- 3. headers vLLM reads ----------------------------------------------------------------------


@pytest.mark.parametrize(("header", "value"), [
    (b"x-vllm-priority", b"-100"), (b"X-Vllm-Priority", b"0"), (b"x-data-parallel-rank", b"7"),
    (b"X-Data-Parallel-Rank", b"0"), (b"x-session-id", b"someone-elses"),
    (b"x-request-id", b"a\nforged log line"), (b"X-Request-Id", b"\x1b]0;title\x07"),
    (b"x-request-id", b""),
])
def test_a_header_vllm_would_act_on_is_refused_by_name_before_vllm_sees_it(
        header: bytes, value: bytes) -> None:
    upstream = FakeVllm()
    body = json.dumps(caption()).encode()
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
        sent = call(guard_with(upstream), path, body, [(header, value)], method=method)
        status, message = refusal(sent)
        assert status == 400 and header.decode().lower() in message, message
    assert upstream.scopes == []


def test_a_request_id_header_of_the_request_id_fields_shape_still_reaches_vllm() -> None:
    upstream = FakeVllm()
    sent = call(guard_with(upstream), "/v1/chat/completions", json.dumps(caption()).encode(),
                [(b"x-request-id", b"job-1:clip_2.wav"), (b"x-trace", b"anything")])
    assert sent[0]["status"] == 200
    assert (b"x-request-id", b"job-1:clip_2.wav") in upstream.scopes[0]["headers"]


# --- 4. min_tokens against the server's MAX_TOKENS ------------------------------------------------


def test_min_tokens_is_bounded_by_the_servers_max_tokens_even_when_the_client_asks_for_more() -> None:
    upstream = FakeVllm()
    guard = guard_with(upstream, Limits(max_tokens=16384))
    long_min = json.dumps(caption(max_tokens=30000, min_tokens=20000)).encode()
    sent = call(guard, "/v1/chat/completions", long_min)
    status, message = refusal(sent)
    assert status == 400 and "min_tokens must be at most 16384" in message and "MAX_TOKENS" in message
    assert upstream.scopes == []
    sent = call(guard, "/v1/chat/completions", json.dumps(caption(max_tokens=100, min_tokens=200)).encode())
    assert "min_tokens must be at most 100" in refusal(sent)[1]  # the client's own, lower, limit
    assert call(guard, "/v1/chat/completions",
                json.dumps(caption(max_tokens=30000, min_tokens=16384)).encode())[0]["status"] == 200
