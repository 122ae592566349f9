"""The client's transport against stub servers: urllib3's `Retry` (CaptionRetry) does every retry
and pause, and a failed request becomes the client's error by its exception's type
(`api.transport_error`). The real server's side is in test_client_server.py and test_bad_input.py;
more paths through the command line are in test_client_cli.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import urllib3.exceptions
import urllib3.util.retry
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from captioner.api import CaptionClient, describe_failure, retry_pauses, transport_error
from captioner.cli import main
from captioner.errors import ExitCode, ServerConnectionError, ServerTimeoutError
from tests.service import free_port
from tests.test_client_support import IdleClosingServer, StubServer, folder_of, tone, write_wav

pytestmark = pytest.mark.usefixtures("client_env_cleared")

BUSY = (503, {"error": {"message": "busy"}})


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "clip.wav", tone(1))


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses urllib3's Retry takes, recorded instead of slept."""
    taken: list[float] = []
    monkeypatch.setattr(urllib3.util.retry, "time", SimpleNamespace(sleep=taken.append, time=time.time))
    return taken


@pytest.mark.parametrize("retries", [0, 1, 4])
def test_retries_n_sends_a_503_n_more_times_with_urllib3s_pauses(
    clip: Path, pauses: list[float], capsys: pytest.CaptureFixture[str], retries: int
) -> None:
    with StubServer(replies=[BUSY] * 10) as stub:
        code = main([str(clip), "--base-url", stub.base_url, "--retries", str(retries)])
    assert code == ExitCode.HTTP_5XX and len(stub.requests) == retries + 1
    assert pauses == [p for p in retry_pauses(retries) if p > 0]  # urllib3 skips a pause of 0
    assert "HTTP 503: busy" in capsys.readouterr().err


def test_retry_after_is_the_pause_a_server_asks_for(clip: Path, pauses: list[float]) -> None:
    with StubServer(replies=[(503, {"error": {"message": "draining"}}, {"Retry-After": "7"})]) as stub:
        assert main([str(clip), "--base-url", stub.base_url, "--retries", "1"]) == ExitCode.OK
    assert len(stub.requests) == 2 and pauses == [7.0]  # the backoff alone would not pause at all


def test_retry_after_is_slept_for_real(clip: Path) -> None:
    with StubServer(replies=[(503, {"error": {"message": "draining"}}, {"Retry-After": "1"})]) as stub:
        started = time.monotonic()
        caption = CaptionClient(stub.base_url, retries=1).caption("data:audio/wav;base64,AAAA", "m")
    assert caption.text == "a stub caption" and len(stub.requests) == 2
    assert 1.0 <= time.monotonic() - started < 5


def test_a_server_that_answered_once_is_retried_without_the_not_answering_line(
    clip: Path, pauses: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    # /v1/models answers, the caption gets 503s: the start-up line is for a server that never answered.
    with StubServer(replies=[BUSY] * 10) as stub:
        assert main([str(clip), "--base-url", stub.base_url, "--retries", "3"]) == ExitCode.HTTP_5XX
    assert len(stub.requests) == 4
    assert "not answering" not in capsys.readouterr().err


# What requests raises for each failure: its exception around urllib3's around the socket's.
URL = "http://gpu-host:8003"
CONNECT = "Failed to establish a new connection"


def _no_connection(reason: Exception) -> requests.RequestException:
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/v1/models", reason))  # type: ignore[arg-type]


def _socket_error(error: OSError) -> requests.RequestException:
    cause = NewConnectionError(None, f"{CONNECT}: {error}")  # type: ignore[arg-type]
    cause.__cause__ = error  # urllib3: raise NewConnectionError(...) from e
    return _no_connection(cause)


def _refused() -> requests.RequestException:
    return _socket_error(ConnectionRefusedError(111, "Connection refused"))


def _unreachable() -> requests.RequestException:
    return _socket_error(OSError(101, "Network is unreachable"))


def _unknown_host() -> requests.RequestException:
    gaierror = socket.gaierror(-2, "Name or service not known")
    return _no_connection(NameResolutionError("gpu-host", None, gaierror))  # type: ignore[arg-type]


def _connect_timeout() -> requests.RequestException:
    cause = ConnectTimeoutError(None, "Connection to gpu-host timed out. (connect timeout=10)")
    return requests.exceptions.ConnectTimeout(MaxRetryError(None, "/v1/models", cause))  # type: ignore[arg-type]


def _read_timeout() -> requests.RequestException:
    return requests.exceptions.ReadTimeout(ReadTimeoutError(None, "/", "Read timed out."))  # type: ignore[arg-type]


def _stream_read_timeout() -> requests.RequestException:  # what requests' iter_content raises
    return requests.exceptions.ConnectionError(ReadTimeoutError(None, "/", "Read timed out."))  # type: ignore[arg-type]


def _dropped() -> requests.RequestException:
    return _no_connection(ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset")))


def _cut_mid_answer() -> requests.RequestException:
    broken = ProtocolError("Connection broken: IncompleteRead(10 bytes read)")
    return requests.exceptions.ChunkedEncodingError(broken)


@pytest.mark.parametrize(
    ("make", "kind", "says"),
    [
        (_refused, ServerConnectionError, f"cannot connect to {URL}: connection refused. Is the service"),
        (_unreachable, ServerConnectionError, f"cannot connect to {URL}: network is unreachable. Is"),
        (_unknown_host, ServerConnectionError, f"cannot connect to {URL}: host name not found. Is"),
        (_connect_timeout, ServerConnectionError, f"cannot connect to {URL}: no connection within 10 s. Is"),
        (_read_timeout, ServerTimeoutError, f"{URL}: no answer within 300 s (read timeout;"),
        (_stream_read_timeout, ServerTimeoutError, f"{URL}: no answer within 300 s (read timeout;"),
        (_dropped, ServerConnectionError, f"{URL}: the server closed the connection mid-request"),
        (_cut_mid_answer, ServerConnectionError, f"{URL}: the server closed the connection mid-request"),
    ],
    ids=["refused", "unreachable", "unknown-host", "connect-timeout", "read-timeout", "stream-read-timeout",
         "dropped", "cut-mid-answer"],
)  # fmt: skip
def test_each_transport_failure_maps_to_its_error_by_type(
    make: Callable[[], requests.RequestException], kind: type[Exception], says: str
) -> None:
    error = transport_error(make(), URL, (10.0, 300.0))
    assert type(error) is kind and str(error).startswith(says), str(error)


# --- every retry's pause is one line on stderr (issue #20, item 3) ---------------------------------


def our_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("captioner: ")]


def test_a_closed_port_says_each_retry_with_its_pause_then_exits_4(
    clip: Path, pauses: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    assert main([str(clip), "--base-url", closed]) == ExitCode.CONNECTION  # the default: 7 retries
    lines = our_lines(capsys.readouterr().err)
    whens = ["now", "in 1 s", "in 2 s", "in 4 s", "in 8 s", "in 16 s", "in 30 s"]
    assert lines[:7] == [f"captioner: warning: {closed}: connection refused; retry {n} of 7 {when}"
                         for n, when in enumerate(whens, 1)]  # fmt: skip
    assert len(lines) == 8 and lines[7].startswith(f"captioner: error: cannot connect to {closed}: ")
    assert pauses == [1, 2, 4, 8, 16, 30]  # what the lines said (urllib3 skips the pause of 0)


def test_a_retry_after_pause_is_said_as_the_servers(
    clip: Path, pauses: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with StubServer(replies=[(503, {"error": {"message": "draining"}}, {"Retry-After": "7"})]) as stub:
        assert main([str(clip), "--base-url", stub.base_url, "--retries", "2"]) == ExitCode.OK
    assert our_lines(capsys.readouterr().err) == [
        f"captioner: warning: {stub.base_url}: HTTP 503; retry 1 of 2 in 7 s (Retry-After)"
    ]
    assert pauses == [7.0]


def test_many_requests_failing_at_once_on_one_server_say_each_retry_once(
    tmp_path: Path, pauses: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 8)
    busy = (503, {"error": {"message": "busy"}})
    with StubServer(replies=[busy] * 8, delay=0.2) as stub:
        code = main([str(folder), "--base-url", stub.base_url, "--retries", "3", "-c", "8", "-f", "jsonl"])
    assert code == ExitCode.OK and len(stub.requests) == 16
    said = our_lines(capsys.readouterr().err)[:-1]  # eight requests got a 503 at about the same time
    assert said[0] == f"captioner: warning: {stub.base_url}: HTTP 503; retry 1 of 3 now"
    assert len(said) == len(set(said)) <= 2


# --- a download that fails says why in words (issue #20, item 5) -----------------------------------


def test_a_download_from_a_closed_port_says_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/clip.wav"
    with StubServer() as stub:
        assert main([url, "--base-url", stub.base_url]) == ExitCode.INPUT
    said = capsys.readouterr().err
    assert said == f"captioner: error: {url}: download failed: cannot connect: connection refused\n"
    assert stub.requests == []


def test_a_download_the_server_drops_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with IdleClosingServer() as media, StubServer() as stub:  # its first answer is a JSON body...
        url = f"{media.base_url}/clip.wav"
        dropping = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=lambda: [dropping.accept()[0].close() for _ in range(3)], daemon=True).start()
        dropped = f"http://127.0.0.1:{dropping.getsockname()[1]}/clip.wav"
        assert main([dropped, "--base-url", stub.base_url]) == ExitCode.INPUT
        dropping.close()
        assert main([url, "--base-url", stub.base_url]) == ExitCode.INPUT  # ...not audio
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"captioner: error: {dropped}: download failed: the server closed the connection without an answer"
    )
    assert err[1].startswith(f"captioner: error: {url}: cannot decode audio")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_refused, "cannot connect: connection refused"),
        (_unknown_host, "cannot connect: host name not found"),
        (_connect_timeout, "cannot connect: no connection within 10 s"),
        (_read_timeout, "no answer within 120 s"),
        (_dropped, "the server closed the connection without an answer"),
        (_cut_mid_answer, "the connection was closed in the middle of the answer"),
        (lambda: requests.exceptions.SSLError(urllib3.exceptions.SSLError(
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate")),
         "TLS error: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"),
        (lambda: requests.exceptions.TooManyRedirects("Exceeded 30 redirects."), "too many redirects"),
    ],
    ids=["refused", "unknown-host", "connect-timeout", "read-timeout", "dropped", "cut", "tls", "redirects"],
)  # fmt: skip
def test_each_download_failure_is_said_in_words(
    make: Callable[[], requests.RequestException], says: str
) -> None:
    assert describe_failure(make(), (10.0, 120.0)) == says
