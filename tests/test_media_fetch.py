"""captioner_server/media_fetch.py: the guard's own fetch of an allowed audio URL, against http.server threads
on 127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback on Linux). No vLLM.

A host not allowed is refused at once and specifically; every later failure (private address,
closed port, redirect, HTTP error, too large, stalled, TLS) is the one FETCH_FAILED, no sooner
than uniform_seconds; the name is resolved once and the connection goes to that address.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from captioner_server import media_fetch
from captioner_server.media_fetch import DEFAULT_TYPE, FETCH_FAILED, FetchFailed, fetch_audio

UNIFORM = 0.5  # uniform_seconds in these tests
TIMEOUT = 1.0
MAX_BYTES = 1000
AUDIO = b"RIFF" + bytes(range(256)) * 2  # 516 bytes: under MAX_BYTES
BIG = b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append((self.path, self.headers.get("Host", "")))
        try:
            self.answer()
        except OSError:
            pass  # the client hung up first (a body over the cap)

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/audio.wav":
            self.send(200, AUDIO, {"Content-Type": "Audio/WAV; rate=16000"})
        elif path == "/untyped":
            self.send(200, AUDIO)
        elif path == "/odd-type":
            self.send(200, AUDIO, {"Content-Type": "audio/wav,AAAA"})  # would end a data: URL's type
        elif path == "/redirect":
            self.send(302, b"", {"Location": self.server.redirect_to})
        elif path == "/missing":
            self.send(404, b"not here")
        elif path == "/big":
            self.send(200, BIG, {"Content-Type": "audio/wav"})
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"1f4\r\n" + b"x" * 500 + b"\r\n")  # 0x1f4 = 500
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/big-unframed":  # no length: the body ends when the connection does
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BIG)
            self.close_connection = True
        elif path == "/gzip":
            self.send(200, AUDIO, {"Content-Encoding": "gzip"})
        elif path == "/empty":
            self.send(200, b"")
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "600")
            self.end_headers()
            self.wfile.write(AUDIO[:100])
            self.close_connection = True
        elif path == "/stall":  # headers, then nothing until the test ends
            self.send_response(200)
            self.send_header("Content-Length", "600")
            self.end_headers()
            self.wfile.flush()
            self.server.release.wait(5)
        else:
            self.send(404, b"")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), Handler)
        self.host = host
        self.hits: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.redirect_to = ""
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a failed TLS handshake is what some tests want

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "", scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"


def serving(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def web() -> Iterator[Server]:
    yield from serving(Server("127.0.0.1"))


@pytest.fixture
def web2() -> Iterator[Server]:
    yield from serving(Server("127.0.0.2"))


def fetch(url: str, allowed: list[str], **options: Any) -> tuple[tuple[bytes, str] | FetchFailed, float]:
    """fetch_audio's result or FetchFailed, and the seconds it took."""
    options = {"max_bytes": MAX_BYTES, "timeout": TIMEOUT, "uniform_seconds": UNIFORM, **options}
    began = time.monotonic()
    try:
        result: tuple[bytes, str] | FetchFailed = asyncio.run(fetch_audio(url, allowed, **options))
    except FetchFailed as exc:
        result = exc
    return result, time.monotonic() - began


def assert_uniform_failure(result: object, seconds: float, why: str = "") -> FetchFailed:
    assert isinstance(result, FetchFailed), result
    assert str(result) == FETCH_FAILED
    assert seconds >= UNIFORM, seconds
    assert why in result.detail, result.detail
    return result


def resolver(*answers: Sequence[str]) -> tuple[Any, list[tuple[str, int]]]:
    """A resolver that gives `answers` in turn (the last one from then on), and its calls."""
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> Sequence[str]:
        calls.append((host, port))
        return answers[min(len(calls), len(answers)) - 1]

    return resolve, calls


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- success ------------------------------------------------------------------------------------


def test_an_allowed_address_is_fetched_fast_with_its_type(web: Server) -> None:
    result, seconds = fetch(web.url("/audio.wav?take=2"), ["127.0.0.1"])
    assert result == (AUDIO, "audio/wav")  # lower-cased, parameters dropped
    assert seconds < UNIFORM
    assert web.hits == [("/audio.wav?take=2", f"127.0.0.1:{web.port}")]


@pytest.mark.parametrize("path", ["/untyped", "/odd-type"])
def test_a_missing_or_malformed_type_is_octet_stream(web: Server, path: str) -> None:
    result, _ = fetch(web.url(path), ["127.0.0.1"])
    assert result == (AUDIO, DEFAULT_TYPE) and DEFAULT_TYPE == "application/octet-stream"


def test_localhost_listed_may_resolve_to_loopback_and_is_the_host_header(web: Server) -> None:
    resolve, calls = resolver(["127.0.0.1"])
    result, _ = fetch(web.url("/audio.wav", host="LocalHost"), ["localhost"], resolve=resolve)
    assert result == (AUDIO, "audio/wav")
    assert calls == [("localhost", web.port)]
    assert web.hits == [("/audio.wav", f"localhost:{web.port}")]


def test_the_default_resolver_is_getaddrinfo() -> None:
    addresses = asyncio.run(media_fetch.resolve_host("localhost", 80))
    assert addresses and all(media_fetch.is_literal_address(a) for a in addresses)
    assert not any(media_fetch.is_public(a) for a in addresses)


# --- refused before any network I/O: specific and immediate ---------------------------------------


def test_a_host_not_allowed_is_refused_at_once_by_name(web2: Server) -> None:
    resolve, calls = resolver(["127.0.0.2"])
    result, seconds = fetch(web2.url("/audio.wav"), ["127.0.0.1", "media.example"], resolve=resolve)
    assert isinstance(result, FetchFailed)
    assert str(result) == "the audio URL's host is not in ALLOWED_MEDIA_DOMAINS (127.0.0.2)"
    assert seconds < UNIFORM / 2
    assert calls == [] and web2.hits == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:pw@127.0.0.1/a.wav", "user name or password"),
        ("http://user@127.0.0.1/a.wav", "user name or password"),
        ("ftp://127.0.0.1/a.wav", "must be http:// or https://"),
        ("http://127.0.0.1:99999/a.wav", "malformed audio URL"),
        ("http://127.0.0.1:0/a.wav", "malformed audio URL"),
        ("http:///a.wav", "malformed audio URL"),
        ("http://127.0.0.1/a b.wav", "malformed audio URL"),
        ("http://127.0.0.1/a\r\nX-Injected: 1", "malformed audio URL"),
        ("http://127.0.0.1/\u00e9.wav", "malformed audio URL"),
    ],
)
def test_malformed_urls_are_refused_at_once(url: str, message: str) -> None:
    result, seconds = fetch(url, ["127.0.0.1"])
    assert isinstance(result, FetchFailed) and message in str(result), result
    assert seconds < UNIFORM / 2


# --- every later failure: the same message, no sooner than uniform_seconds --------------------------


def test_a_name_that_resolves_to_loopback_is_refused_unless_the_address_is_listed(web: Server) -> None:
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "10.0.0.1", "169.254.169.254", "64:ff9b::7f00:1"):
        resolve, calls = resolver([address])
        result, seconds = fetch(web.url("/audio.wav", host="media.example"), ["media.example"],
                                resolve=resolve)
        assert_uniform_failure(result, seconds, "resolves to no public address")
        assert calls == [("media.example", web.port)]
    assert web.hits == []


def test_a_closed_port_fails_the_same_way_in_the_same_time() -> None:
    result, seconds = fetch(f"http://127.0.0.1:{closed_port()}/audio.wav", ["127.0.0.1"])
    assert_uniform_failure(result, seconds, "ConnectionRefusedError")
    assert seconds < UNIFORM + 0.5


def test_a_dns_failure_fails_the_same_way() -> None:
    async def no_such_name(host: str, port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result, seconds = fetch("https://media.example/a.wav", ["media.example"], resolve=no_such_name)
    assert_uniform_failure(result, seconds, "gaierror")


def test_a_redirect_is_a_failure_even_to_an_allowed_host(web: Server, web2: Server) -> None:
    web.redirect_to = web2.url("/audio.wav")
    result, seconds = fetch(web.url("/redirect"), ["127.0.0.1", "127.0.0.2"])
    assert_uniform_failure(result, seconds, "HTTP 302")
    assert web2.hits == []


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/missing", "HTTP 404"),
        ("/big", "Content-Length 5000 is over 1000 bytes"),
        ("/big-chunked", "body over 1000 bytes"),
        ("/big-unframed", "body over 1000 bytes"),
        ("/gzip", "Content-Encoding gzip"),
        ("/empty", "empty body"),
        ("/truncated", "RemoteProtocolError"),
    ],
)
def test_http_errors_and_oversized_bodies_fail_the_same_way(web: Server, path: str, why: str) -> None:
    result, seconds = fetch(web.url(path), ["127.0.0.1"])
    assert_uniform_failure(result, seconds, why)
    assert seconds < UNIFORM + 0.5


def test_a_server_that_stalls_after_its_headers_fails_at_the_timeout(web: Server) -> None:
    result, seconds = fetch(web.url("/stall"), ["127.0.0.1"])
    assert_uniform_failure(result, seconds, "no complete answer within 1 s")
    assert TIMEOUT <= seconds < TIMEOUT + 0.5


def test_the_name_is_resolved_once_and_that_address_is_the_one_connected_to(
    web: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a public answer for the check and loopback for a second lookup. There is no
    second lookup: the connection goes to the public address (replaced here: nothing is sent)."""
    resolve, calls = resolver(["10.0.0.7", "93.184.215.14", "127.0.0.1"], ["127.0.0.1"])
    connected: list[tuple[str, int, str]] = []

    async def open_stream(address: str, port: int, tls: Any, server_hostname: str) -> Any:
        connected.append((address, port, server_hostname))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(media_fetch, "open_stream", open_stream)
    result, seconds = fetch(web.url("/audio.wav", host="media.example"), ["media.example"], resolve=resolve)
    assert_uniform_failure(result, seconds, "ConnectionRefusedError")
    assert len(calls) == 1
    assert connected == [("93.184.215.14", web.port, "media.example")]  # the first public address
    assert web.hits == []


def test_a_literal_address_is_not_resolved(web: Server) -> None:
    resolve, calls = resolver(["93.184.215.14"])
    result, _ = fetch(web.url("/audio.wav"), ["127.0.0.1"], resolve=resolve)
    assert result == (AUDIO, "audio/wav") and calls == []


# --- https: the certificate is checked against the name, on the pinned address ---------------------


def certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA, and a certificate and key it signed for `name`: (ca.pem, cert.pem, key.pem)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                           critical=False)
            .add_extension(x509.KeyUsage(
                digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
        )  # fmt: skip
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    pem = serialization.Encoding.PEM
    paths[0].write_bytes(build("test CA", ca_key, "test CA", ca_key, True).public_bytes(pem))
    paths[1].write_bytes(build(name, key, "test CA", ca_key, False).public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_web(tmp_path: Path) -> Iterator[tuple[Server, Path, list[str]]]:
    """An https server on 127.0.0.1 with a certificate for media.example; the SNI names it saw."""
    ca, cert, key = certificates(tmp_path, "media.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str] = []

    def seen(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name or "")

    context.sni_callback = seen
    for server in serving(Server("127.0.0.1", context)):
        yield server, ca, names


def trusting(monkeypatch: pytest.MonkeyPatch, ca: Path) -> None:
    monkeypatch.setattr(media_fetch, "tls_context", lambda: ssl.create_default_context(cafile=str(ca)))


def test_https_checks_the_certificate_against_the_name_on_the_pinned_address(
    tls_web: tuple[Server, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name resolves to loopback only as the test's trick: 93.184.215.14 is where it would go."""
    web, ca, names = tls_web
    trusting(monkeypatch, ca)
    resolve, _ = resolver(["127.0.0.1"])
    url = web.url("/audio.wav", host="media.example", scheme="https")
    monkeypatch.setattr(media_fetch, "is_public", lambda address: True)  # let loopback stand in
    result, seconds = fetch(url, ["media.example"], resolve=resolve)
    assert result == (AUDIO, "audio/wav") and seconds < UNIFORM
    assert names == ["media.example"]
    assert web.hits == [("/audio.wav", f"media.example:{web.port}")]


def test_https_with_a_certificate_for_another_name_fails(
    tls_web: tuple[Server, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    web, ca, _ = tls_web
    trusting(monkeypatch, ca)
    result, seconds = fetch(web.url("/audio.wav", scheme="https"), ["127.0.0.1"])  # cert: media.example
    assert_uniform_failure(result, seconds, "SSLCertVerificationError")
    assert web.hits == []


def test_https_with_an_untrusted_certificate_fails(
    tls_web: tuple[Server, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    web, _, _ = tls_web
    resolve, _ = resolver(["127.0.0.1"])
    monkeypatch.setattr(media_fetch, "is_public", lambda address: True)
    result, seconds = fetch(web.url("/audio.wav", host="media.example", scheme="https"), ["media.example"],
                            resolve=resolve)
    assert_uniform_failure(result, seconds, "certificate verify failed")
    assert web.hits == []


# --- helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [("93.184.215.14", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
     ("100.64.0.1", False), ("::1", False), ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False),
     ("64:ff9b::a00:1", False), ("64:ff9b::5db8:d70e", True), ("2002:a00:1::1", False),
     ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False)],
)  # fmt: skip
def test_public_means_global_with_any_embedded_ipv4_global_too(address: str, public: bool) -> None:
    assert media_fetch.is_public(address) is public


def test_the_detail_is_fit_for_a_log_line() -> None:
    assert media_fetch.bounded("a\nb\x1b\u00e9" + "x" * 500) .startswith("a\\x0ab\\x1b\\xe9xx")
    assert len(media_fetch.bounded("x" * 500)) == 400


def test_the_message_is_the_guards() -> None:
    from captioner_server.errors import MEDIA_FETCH_FAILED

    assert FETCH_FAILED == MEDIA_FETCH_FAILED
