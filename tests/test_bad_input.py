"""Bad input against the real server: each is answered with a clear one-line 4xx (the request
guard turns vLLM's 500 for audio it cannot decode into a 400), and the next good request still
succeeds.

The rows of docs/RELIABILITY.md "Bad input" are these cases; the client's side of each (what
test_client.py prints) is the second half of this file.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from typing import Any

import pytest
import requests

from captioner.api import CaptionClient
from captioner.errors import ExitCode, ServerHTTPError
from captioner.payload import audio_part, chat_request, data_url
from captioner_server.errors import DECODE_HINT
from captioner_server.request_policy import AUDIO_ONLY
from tests.service import ROOT, SAMPLE, Service

pytestmark = pytest.mark.server

GOOD = base64.b64encode(SAMPLE.read_bytes()).decode()
CORRUPT_WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200))


def part(audio: bytes) -> dict[str, Any]:
    return audio_part(data_url(audio))


def good(**extra: Any) -> dict[str, Any]:
    """The kit's request for the sample clip (payload.chat_request)."""
    return chat_request(data_url(SAMPLE.read_bytes()), "MODEL", **{"max_tokens": 8} | extra)


def body(content: Any, **extra: Any) -> dict[str, Any]:
    """The kit's request (payload.chat_request) with its user message holding `content`."""
    b = chat_request("", "MODEL", **{"max_tokens": 8} | extra)
    b["messages"][0]["content"] = content
    return b


FIELD = "the request field"
# vLLM reads audio with libsndfile alone (start_service.sh); the guard adds what to send instead.
NOT_RECOGNISED = ("could not decode the audio: Error opening <_io.BytesIO object>: Format not recognised. "
                  f"{DECODE_HINT}")
# name: (request body, or raw bytes for the malformed-JSON rows; status; start of the message)
CASES: dict[str, tuple[Any, int, str]] = {
    "corrupt audio": (body([part(CORRUPT_WAV)]), 400,
                      "could not decode the audio: Error opening <_io.BytesIO object>: Error in WAV/W64/RF64 "
                      "file. Malformed 'fmt ' chunk."),
    "empty audio": (body([part(b"")]), 400, NOT_RECOGNISED),
    "non-audio bytes": (body([part(b"plain text, not audio " * 20)]), 400, NOT_RECOGNISED),
    "malformed base64": (body([audio_part("data:audio/wav;base64,!!!not-base64@@@")]), 400,
                         "Non-base64 digit found"),
    "truncated JSON": (b'{"model": "x", "messages": [', 400, "1 validation error:"),
    "not JSON": (b"not json", 400, "1 validation error:"),
    "two audio parts": (body([part(SAMPLE.read_bytes())] * 2), 400,
                        f"{AUDIO_ONLY}: exactly one audio part per request (this one holds 2)"),
    "text-only (string content)": (body("describe this"), 400, "this server captions audio"),
    "text-only (text part)": (body([{"type": "text", "text": "hi"}]), 400, "this server captions audio"),
    "no messages": (body([]) | {"messages": []}, 400, "this server captions audio"),
    "max_tokens beyond the context": (good(max_tokens=100000), 400,
                                      "max_tokens=100000 cannot be greater than max_model_len=4096."),
    # The request guard answers these before vLLM sees the audio (captioner_server/request_policy.py).
    "negative max_tokens": (good(max_tokens=-3), 400, f"{FIELD} max_tokens must be an integer from 1 to"),
    "negative temperature": (good(temperature=-1), 400, f"{FIELD} temperature must be a number in [0, 2]"),
    "huge temperature": (good(temperature=1e9), 400, f"{FIELD} temperature must be a number in [0, 2]"),
    "negative top_p": (good(top_p=-0.5), 400, f"{FIELD} top_p must be a number in (0, 1]"),
    "negative top_k": (good(top_k=-5), 400, f"{FIELD} top_k must be an integer from -1 to"),
    "unknown model": (good() | {"model": "no-such-model"}, 400, "unknown model: this server serves"),
    "huge n": (good(n=100000), 400, f"{FIELD} n must be an integer from 1 to 1"),
    "two captions (n 2)": (good(n=2), 400, f"{FIELD} n must be an integer from 1 to 1"),
    "unknown audio format": (body([{"type": "input_audio", "input_audio": {"data": GOOD, "format": "exe"}}]),
                             400, "7 validation errors"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_a_clear_error_and_the_next_good_request_succeeds(
        server: Service, name: str) -> None:
    payload, status, message = CASES[name]
    url = f"{server.base_url}/v1/chat/completions"
    if isinstance(payload, bytes):
        r = requests.post(url, data=payload, headers={"Content-Type": "application/json"}, timeout=120)
    else:
        if payload["model"] == "MODEL":
            payload = payload | {"model": server.model}
        r = requests.post(url, json=payload, timeout=120)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert str(error["message"]).startswith(message), error
    assert error["code"] == status
    good = server.caption(SAMPLE.read_bytes())
    assert good.status_code == 200, good.text


# --- what the client says ----------------------------------------------------------------------


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.pop("API_KEY", None)
    env["CAPTIONER_CONFIG"] = os.devnull
    return subprocess.run([sys.executable, str(ROOT / "test_client.py"), *args], capture_output=True,
                          text=True, encoding="latin-1", env=env, cwd=ROOT, timeout=300)


def test_client_max_tokens_beyond_the_context_exits_6_quoting_the_server(server: Service) -> None:
    r = run_client(str(SAMPLE), "--base-url", server.base_url, "--max-tokens", "100000")
    assert r.returncode == ExitCode.HTTP_4XX
    assert r.stderr == (f"captioner: error: {SAMPLE}: {server.base_url}: server refused the request: "
                        "HTTP 400: max_tokens=100000 cannot be greater than max_model_len=4096. Please "
                        "request fewer output tokens. (parameter=max_tokens, value=100000)\n")


def test_client_unknown_model_exits_6_with_the_server_naming_the_served_one(server: Service) -> None:
    # With --model the client asks nothing first (a hung server must not hold the start up): the
    # request guard refuses the name and says which model it serves.
    r = run_client(str(SAMPLE), "--base-url", server.base_url, "--model", "no-such-model")
    assert r.returncode == ExitCode.HTTP_4XX
    assert r.stderr.endswith(f"{server.base_url}: server refused the request: HTTP 400: unknown model: this "
                             f"server serves '{server.model}' (or leave model out)\n"), r.stderr


def test_client_says_plainly_what_was_wrong_when_the_server_cannot_decode_the_audio(server: Service) -> None:
    """The CLI decodes audio before sending (a corrupt file is exit 3 without a request: see
    test_client_server.py); a library caller that sends the bytes as they are gets a 400 (vLLM's
    500, turned by the guard)."""
    client = CaptionClient(server.base_url, retries=0)
    with pytest.raises(ServerHTTPError) as caught:
        client.caption(data_url(CORRUPT_WAV), server.model, max_tokens=8)
    assert caught.value.status == 400 and caught.value.exit_code == ExitCode.HTTP_4XX
    assert str(caught.value).endswith("HTTP 400: could not decode the audio: Error opening <_io.BytesIO "
                                      "object>: Error in WAV/W64/RF64 file. Malformed 'fmt ' chunk. "
                                      f"{DECODE_HINT}")
    assert client.caption(data_url(SAMPLE.read_bytes()), server.model, 8).model


def test_client_server_fetch_with_no_allowed_host_exits_6_saying_the_server_fetches_nothing(
        server: Service) -> None:
    r = run_client("http://127.0.0.1:9/x.wav", "--server-fetch", "--base-url", server.base_url)
    assert r.returncode == ExitCode.HTTP_4XX
    assert ("server refused the request: HTTP 400: this server fetches no URL (ALLOWED_MEDIA_DOMAINS "
            "is empty): send the audio inline") in r.stderr
