"""Fetch an audio URL the operator allows, for the request guard (request_guard.py), so that
vLLM is handed the bytes inline and never fetches anything itself.

When vLLM fetched allowed URLs, the guard could only check the name and resolve it once: vLLM then
resolved it again (a DNS-rebinding window), followed redirects, and its timing told a closed port
(0.01 s) from a listening one (10.8 s). Here the one fetch is ours:

- The URL is http or https with a host and optional port, and no user name or password; a host
  not in the allow-list is refused at once, before any network I/O. These refusals are
  configuration or shape errors, specific and immediate.
- The name is resolved once. Only global addresses are kept, unless the operator listed the
  address itself or `localhost` (then loopback and private addresses are meant). The first address
  kept is the one connected to; https verifies the certificate against the name (SNI = the name),
  and the Host header is the name.
- Only a 2xx answer is a success: a redirect (any 3xx) is a failure, not followed. The body is
  capped at max_bytes (Content-Length first, then while it streams); the whole fetch (resolve,
  connect, TLS, headers, body) at `timeout` seconds.
- Every failure after the allow-list check raises FetchFailed(FETCH_FAILED), one message, and
  no sooner than `uniform_seconds` after the fetch began, so neither the answer nor its timing
  tells a closed port from a slow server or a private address. Keep uniform_seconds >= timeout
  (the defaults are equal): a fetch that times out takes `timeout`.

Standard library plus h11 (the HTTP/1.1 parser uvicorn, and so vLLM's API server, already loads;
the guard imports it too): a response is parsed with the header size capped, chunked and
read-until-close bodies included, by the parser the server itself trusts.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

import h11

# The same text as errors.MEDIA_FETCH_FAILED (the guard's errors import it from here).
FETCH_FAILED = "could not fetch or decode the audio at the URL"
# The type returned when the response names none, or one that is not a plain type/subtype.
DEFAULT_TYPE = "application/octet-stream"
MAX_RESPONSE_HEAD_BYTES = 65536  # status line and headers
READ_CHUNK = 65536
USER_AGENT = "qwen3-captioner-service"
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_HOST_CHARS = 253

# (name, port) -> addresses, as getaddrinfo gives them: the resolver tests inject.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
# NAT64's well-known prefix: the last 32 bits are the IPv4 address the translator connects to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchFailed(Exception):
    """str(exc) is what the client may be told. `detail` says what went wrong, for the server's
    log only: after the allow-list check it tells what is at the address."""

    def __init__(self, message: str = FETCH_FAILED, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class _Failure(Exception):
    """A failure after the allow-list check; its text becomes FetchFailed.detail only."""


class Target(NamedTuple):
    scheme: str
    host: str  # lower-case name or literal address, no brackets
    port: int
    path: str  # the request target: path and query
    host_header: str


def parse_url(url: str, allowed: Iterable[str]) -> Target:
    """The URL's parts, or FetchFailed with a specific message (no network I/O)."""
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise FetchFailed("malformed audio URL: it holds a space, a control or a non-ASCII character")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").lower()
    except ValueError:
        raise FetchFailed("malformed audio URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise FetchFailed("the audio URL must be http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise FetchFailed("the audio URL holds a user name or password: the server sends none")
    if not host or len(host) > MAX_HOST_CHARS or port == 0:
        raise FetchFailed("malformed audio URL: no host, or no valid port")
    if host not in {name.lower() for name in allowed}:
        raise FetchFailed(f"the audio URL's host is not in ALLOWED_MEDIA_DOMAINS ({host})")
    port = port or DEFAULT_PORTS[scheme]
    name = f"[{host}]" if ":" in host else host
    host_header = name if port == DEFAULT_PORTS[scheme] else f"{name}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, path, host_header)


def is_literal_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_public(address: str) -> bool:
    """A global address, whose embedded IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo), if any,
    is global too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(v4 is None or v4.is_global for v4 in embedded)
    return True


def pick_address(host: str, addresses: Sequence[str], allowed: Iterable[str]) -> str:
    """The first address to connect to: any, when the operator listed the address itself or
    `localhost`; otherwise the first public one."""
    named = host in {name.lower() for name in allowed} and (host == "localhost" or is_literal_address(host))
    for address in addresses:
        try:
            if named or is_public(address):
                return address
        except ValueError:
            continue
    raise _Failure(f"{host} resolves to no public address ({', '.join(addresses) or 'none'})")


async def resolve_host(host: str, port: int) -> list[str]:
    """getaddrinfo's addresses for a TCP connection, in its order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's CAs, hostname checked (tests replace this to trust their own CA)."""
    return ssl.create_default_context()


async def open_stream(
    address: str, port: int, tls: ssl.SSLContext | None, server_hostname: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to exactly `address` (a literal: no resolving here)."""
    return await asyncio.open_connection(
        address, port, ssl=tls, server_hostname=server_hostname if tls else None,
        flags=socket.AI_NUMERICHOST, limit=READ_CHUNK,
    )


def media_type(value: bytes | None) -> str:
    """A Content-Type's type/subtype, lower-cased and without parameters; DEFAULT_TYPE when absent
    or not of that shape (the caller may put it in a data: URL)."""
    if value is None:
        return DEFAULT_TYPE
    kind = value.split(b";", 1)[0].strip().decode("latin-1").lower()
    return kind if _MEDIA_TYPE.fullmatch(kind) else DEFAULT_TYPE


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target, max_bytes: int
) -> tuple[bytes, str]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
    request = h11.Request(method="GET", target=target.path, headers=[
        ("Host", target.host_header), ("User-Agent", USER_AGENT), ("Accept", "audio/*, */*;q=0.1"),
        ("Accept-Encoding", "identity"), ("Connection", "close"),
    ])  # fmt: skip
    writer.write((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    await writer.drain()
    content_type = DEFAULT_TYPE
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_CHUNK))  # b"" at EOF
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                raise _Failure(f"HTTP {event.status_code} (only 2xx is fetched; no redirect is followed)")
            headers = {name: value for name, value in event.headers}
            length = headers.get(b"content-length")
            if length is not None and int(length) > max_bytes:
                raise _Failure(f"Content-Length {int(length)} is over {max_bytes} bytes")
            encoding = headers.get(b"content-encoding", b"identity").strip().lower()
            if encoding not in (b"", b"identity"):
                raise _Failure(f"Content-Encoding {encoding.decode('latin-1')[:40]} (asked for identity)")
            content_type = media_type(headers.get(b"content-type"))
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise _Failure(f"body over {max_bytes} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed before the response ended
            raise _Failure(f"connection closed early ({type(event).__name__})")
    if not size:
        raise _Failure("empty body")
    return b"".join(chunks), content_type


async def _fetch(
    target: Target, allowed: Sequence[str], max_bytes: int, resolve: Resolver
) -> tuple[bytes, str]:
    if is_literal_address(target.host):
        addresses: Sequence[str] = [target.host]
    else:
        addresses = await resolve(target.host, target.port)  # once: what is checked is what is used
    address = pick_address(target.host, addresses, allowed)
    tls = tls_context() if target.scheme == "https" else None
    reader, writer = await open_stream(address, target.port, tls, target.host)
    try:
        return await _exchange(reader, writer, target, max_bytes)
    finally:
        writer.transport.abort()  # one request per connection; nothing more to say to it


def bounded(text: str, limit: int = 400) -> str:
    """Fit for a log line: control and non-ASCII characters escaped, at most `limit` characters."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if " " <= c < "\x7f" else f"\\x{ord(c):02x}" for c in escaped)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


async def fetch_audio(
    url: str, allowed: list[str], *, max_bytes: int, timeout: float = 10.0,
    uniform_seconds: float = 10.0, resolve: Resolver | None = None,
) -> tuple[bytes, str]:
    """(body bytes, content type) of an http(s) URL whose host is in `allowed` (lower-case names
    or literal IPs). The content type is the response's Content-Type type/subtype, lower-cased,
    parameters dropped, DEFAULT_TYPE when absent or malformed; any type is returned (audio/*,
    application/octet-stream, text/html ...): the caller decides what it accepts.

    Raises FetchFailed: at once, with a specific message, for a malformed URL, another scheme,
    a user name or password, or a host not in `allowed`; for everything after that, with
    FETCH_FAILED and no sooner than uniform_seconds after the call began (`detail` says why).
    `resolve(name, port)` returns the name's addresses (default: getaddrinfo); it is called at
    most once, and not for a literal address."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    target = parse_url(url, allowed)
    try:
        return await asyncio.wait_for(_fetch(target, allowed, max_bytes, resolve or resolve_host), timeout)
    except asyncio.TimeoutError:
        detail = f"no complete answer within {timeout:g} s"
    except _Failure as exc:
        detail = str(exc)
    except Exception as exc:  # refused, unreachable, DNS, TLS, HTTP parse: all one answer
        detail = f"{type(exc).__name__}: {exc}"
    await asyncio.sleep(max(0.0, began + uniform_seconds - loop.time()))
    raise FetchFailed(FETCH_FAILED, bounded(f"{target.scheme}://{target.host_header}: {detail}"))

