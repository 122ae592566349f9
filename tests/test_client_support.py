"""Helpers shared by the caption client's tests (no tests here).

`StubServer` is a few lines of OpenAI-compatible HTTP for tests that need a server's
behaviour on demand (a 503 then a 200, a streamed answer) and must not wait for
vLLM; the real server is exercised by the tests marked `server`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import numpy as np

from captioner.audio import to_pcm16
from captioner.payload import SAMPLE_RATE, wav_bytes

SR = SAMPLE_RATE
SRT_TIME = r"\d{2}:\d{2}:\d{2},\d{3}"
VTT_TIME = r"\d{2}:\d{2}:\d{2}\.\d{3}"


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    path.write_bytes(wav_bytes(to_pcm16(samples).tobytes(), rate))
    return path


def speech_wav(path: Path, text: str = "A short test sentence for the captioner.") -> Path:
    """A few seconds of espeak-ng speech at 16 kHz mono."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(path)], check=True)
    raw.unlink()
    return path


def convert(src: Path, dst: Path) -> Path:
    """Re-encode with ffmpeg; the format follows dst's extension."""
    assert shutil.which("ffmpeg"), "ffmpeg is needed for the mixed-format tests"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), str(dst)],
        check=True,
    )
    return dst


def parse_srt(text: str) -> list[tuple[str, str, str]]:
    """Strict-enough SRT parse: numbered cues, `a --> b` times, non-empty text."""
    cues = []
    blocks = [b for b in text.strip("\n").split("\n\n") if b]
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(number), f"cue {number} numbered {lines[0]!r}"
        match = re.fullmatch(rf"({SRT_TIME}) --> ({SRT_TIME})", lines[1])
        assert match, f"bad SRT timing line {lines[1]!r}"
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:]), block
        cues.append((match.group(1), match.group(2), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[str, str, str]]:
    assert text.startswith("WEBVTT\n\n"), "a WebVTT file starts with WEBVTT and a blank line"
    cues = []
    for block in [b for b in text[len("WEBVTT\n\n") :].strip("\n").split("\n\n") if b]:
        lines = block.split("\n")
        match = re.fullmatch(rf"({VTT_TIME}) --> ({VTT_TIME})", lines[0])
        assert match, f"bad VTT timing line {lines[0]!r}"
        assert len(lines) >= 2 and all(line.strip() for line in lines[1:]), block
        assert all("-->" not in line for line in lines[1:])
        cues.append((match.group(1), match.group(2), "\n".join(lines[1:])))
    return cues


@dataclass
class StubServer:
    """An OpenAI-compatible stand-in on 127.0.0.1 whose answers a test scripts.

    `replies` is consumed per chat request: (status, body) pairs, or (status, body, headers);
    when empty, every request gets a 200 with `caption`. `api_key` makes it demand a Bearer key. `drops`
    is consumed first: "close" or "reset" ends the connection without a byte of an
    answer (FIN, or RST), as a server that restarts or drains under a request does.
    """

    caption: str = "a stub caption"
    replies: list[tuple[Any, ...]] = field(default_factory=list)
    api_key: str | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0  # pause between streamed pieces
    requests: list[dict[str, Any]] = field(default_factory=list)
    on_request: Callable[[dict[str, Any]], None] | None = None
    drops: list[str] = field(default_factory=list)

    def __enter__(self) -> Self:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    self._send(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorized():
                    self._send(200, {"object": "list", "data": [{"id": "stub-model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                if not self._authorized():
                    return
                stub.requests.append(body)
                if stub.on_request:
                    stub.on_request(body)
                if stub.drops:
                    self._drop(stub.drops.pop(0))
                    return
                if stub.delay:
                    threading.Event().wait(stub.delay)
                if stub.replies:
                    self._send(*stub.replies.pop(0))
                elif body.get("stream"):
                    self._stream()
                else:
                    self._send(200, completion(stub.caption))

            def _drop(self, how: str) -> None:
                self.close_connection = True
                if how == "reset":  # linger 0: close() sends RST, the client sees ECONNRESET
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))  # fmt: skip
                    self.connection.close()

            def _stream(self) -> None:
                # Chunked, like vLLM: each event is one HTTP chunk.
                self.protocol_version = "HTTP/1.1"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                words = stub.caption.split(" ")
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    chunk = {"model": "stub-model", "choices": [{"delta": {"content": piece}}]}
                    self._chunk(f"data: {json.dumps(chunk)}\n\n")
                    if stub.chunk_delay:
                        threading.Event().wait(stub.chunk_delay)
                usage = {"model": "stub-model", "choices": [], "usage": usage_of(len(words))}
                self._chunk(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n")
                self._chunk("")

            def _chunk(self, text: str) -> None:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def usage_of(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": completion_tokens,
            "total_tokens": 10 + completion_tokens}  # fmt: skip


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": "stub-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": usage_of(len(text.split())),
    }


class RawServer:
    """A listening loopback socket whose accepted connections go to `_serve` in a thread each;
    `connections` counts them, and every one still open is closed on exit."""

    def __init__(self, backlog: int = 16) -> None:
        self.connections = 0
        self._open: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(backlog)
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        for conn in self._open:
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class IdleClosingServer(RawServer):
    """A raw HTTP/1.1 server that keeps connections alive, answers the first request on
    each, and resets (RST, no byte of an answer) any later request on the same
    connection: what a client sees when it reuses a kept-alive connection that the
    server has just closed. `requests` counts the requests that arrived, `connections`
    the connections accepted."""

    def __init__(self, caption: str = "fresh answer") -> None:
        super().__init__()
        self.caption = caption
        self.requests = 0

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        served = 0
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                byte = reader.read(1)
                if not byte:
                    conn.close()
                    return
                head += byte
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength" in head else 0
            reader.read(length)
            self.requests += 1
            if served:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            served += 1
            data = json.dumps(completion(self.caption)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


class HungServer(RawServer):
    """Accepts connections, reads what comes, and never answers: a server whose process is
    frozen, or a proxy whose backend is gone. `connections` counts those accepted; all are
    closed on exit."""

    def __init__(self) -> None:
        super().__init__(backlog=64)

    def _serve(self, conn: socket.socket) -> None:
        pass  # read nothing back, answer nothing: the connection stays open until exit


def folder_of(tmp_path: Path, count: int, name: str = "in") -> Path:
    """A folder of `count` half-second clips, each a different tone, named 00.wav, 01.wav, ..."""
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        write_wav(folder / f"{i:02d}.wav", tone(0.5, 200 + 40 * i))
    return folder
