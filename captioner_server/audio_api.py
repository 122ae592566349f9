"""The OpenAI audio API on the service's own port: POST /v1/audio/transcriptions, and the same at
/v1/audio/captions (our name for it), so that `curl -F file=@clip.wav`, the OpenAI SDK's
`client.audio.transcriptions.create(...)` and Whisper clients caption with no code.

The request guard (request_guard.py) hands these paths here after its Host, Origin, key,
route and declared-size checks. The body is a multipart form, parsed as it streams in and held in
memory only (python_multipart's parser, fed chunk by chunk: nothing is spooled to disk), capped by
MAX_REQUEST_BYTES (413 as soon as it passes): `file` (any container the client decodes) and,
optionally, `model` (any name: the served model answers), `response_format` (json, text, srt,
vtt, verbose_json), `temperature` (0-2) and `stream` (server-sent `transcript.text.delta` events, then
`transcript.text.done`, as OpenAI's API sends them). Any other part is a 400 naming it.

The audio is cut with the client's own rule (captioner/audio.py's prepare: windows of at most 30 s,
or MAX_AUDIO_SECONDS where lower, cut at quiet moments; audio over MAX_AUDIO_SECONDS is a 413,
found before it is decoded whole), decoded in a thread so the event loop goes on serving. Each
window is captioned through vLLM's chat path as a client's request would be: payload.chat_request's
body for its WAV, the guard's checks (request_policy.py), then vLLM's app with a synthetic
POST /v1/chat/completions. Not vLLM's own /v1/audio/transcriptions: for Qwen3-Omni it adds a
"Transcribe this audio" text prompt, and the Captioner takes audio alone. The windows run in
parallel; the answer is made from a Record built as the client builds one, by
captioner/formats.py's writers (text, srt, vtt) or in OpenAI's shapes (json, verbose_json).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from captioner.audio import SAFE_FORMATS, AudioTooLong, PreparedAudio, prepare, window_seconds
from captioner.errors import InputError
from captioner.formats import render
from captioner.payload import chat_request, data_url
from captioner.records import Record, Segment, join_captions
from captioner_server.asgi import (
    PRIVATE,
    BodyTooLarge,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    body_chunks,
    body_then,
)
from captioner_server.errors import (
    SHUTTING_DOWN,
    SHUTTING_DOWN_MARKERS,
    Refusal,
    bad_request,
    error_response,
    one_line,
    shutdown_aware,
)
from captioner_server.request_guard import CHAT_PATH, RequestGuard
from captioner_server.request_policy import MAX_TEXT_FIELD, Limits, escape, field_problem, shown

FIELDS = ("file", "model", "response_format", "temperature", "stream")
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAM_FORMATS = ("json", "text")  # a stream is text events; subtitles and segments need the whole
CONTENT_TYPES = {"text": b"text/plain; charset=utf-8", "srt": b"application/x-subrip; charset=utf-8",
                 "vtt": b"text/vtt; charset=utf-8"}
IDENTITY_ENCODINGS = (b"", b"binary", b"8bit", b"7bit")
# OpenAI's verbose_json names the language (its SDK's type requires one); the Captioner says none.
LANGUAGE = "unknown"
WINDOWS_AT_ONCE = 16  # one upload's windows in flight at once: each holds its WAV and base64 copy
MAX_ERROR_BODY = 65536  # of an error answer from vLLM: its messages are short, but not always

NOT_A_FORM = ("send the audio as a multipart/form-data form whose file field holds it "
              "(curl -F file=@clip.wav URL/v1/audio/transcriptions)")
NO_FILE = "the form holds no file: send the audio as its file field (curl -F file=@clip.wav)"


def bad_form(exc: Exception) -> Refusal:
    return bad_request(f"malformed multipart form: {escape(str(exc))[:200]}")


# --- the form ---------------------------------------------------------------------------------


@dataclass
class Form:
    """What an upload held: the one file's bytes and the text fields."""

    file: bytes | None = None
    fields: dict[str, str] = field(default_factory=dict)


class FormReader:
    """Parses a multipart/form-data body as it streams in: the file held in memory, each text
    field at most MAX_TEXT_FIELD bytes, and a Refusal (400) at the first part the route does not
    take, before the rest of the body is read."""

    def __init__(self, content_type: bytes | None) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise bad_request(NOT_A_FORM)
        try:
            self.parser = MultipartParser(boundary, callbacks={
                "on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end})  # fmt: skip
        except (FormParserError, ValueError) as exc:
            raise bad_form(exc) from None
        self.form = Form()
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header, self._value = bytearray(), bytearray()
        self._name = ""
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise bad_form(exc) from None

    def finish(self) -> Form:
        if not self.ended:
            raise bad_request("malformed multipart form: it ends before its closing boundary")
        if self.form.file is None:
            raise bad_request(NO_FILE)
        return self.form

    def _part_begin(self) -> None:
        self._headers, self._name = {}, ""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header).strip().lower()] = bytes(self._value).strip()
        self._header, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("latin-1")
        if kind != b"form-data" or not name:
            raise bad_request("a part of the form has no name (Content-Disposition: form-data; name=...)")
        if name not in FIELDS:
            raise bad_request(f"the form field {shown(name)} is not accepted: this route takes "
                              f"{', '.join(FIELDS)}")
        is_file = b"filename" in options
        if name == "file":
            if not is_file:
                raise bad_request("the form field file must be a file upload (curl -F file=@clip.wav), "
                                  "not text")
            if self.form.file is not None:
                raise bad_request("the form holds two files: send one file per request")
        elif is_file:
            raise bad_request(f"the form field {name} must be text, not a file")
        elif name in self.form.fields:
            raise bad_request(f"the form field {name} is given twice")
        encoding = self._headers.get(b"content-transfer-encoding", b"").lower()
        if encoding not in IDENTITY_ENCODINGS:
            raise bad_request(f"the form field {name} is sent as {shown(encoding.decode('latin-1'))}: "
                              "send it as binary")
        self._name, self._chunks, self._size = name, [], 0

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._name != "file" and self._size > MAX_TEXT_FIELD:
            raise bad_request(f"the form field {self._name} is longer than {MAX_TEXT_FIELD} bytes")
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        value, self._chunks = b"".join(self._chunks), []
        if self._name == "file":
            self.form.file = value
            return
        try:
            self.form.fields[self._name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"the form field {self._name} is not UTF-8 text") from None

    def _end(self) -> None:
        self.ended = True


async def read_form(
    scope: Scope, receive: Receive, max_bytes: int | None, too_large: Callable[[int], str]
) -> Form:
    """The form, read as it streams in: 413 once the body passes `max_bytes` (never read whole
    first), 400 at the first part the route does not take."""
    reader = FormReader(dict(scope.get("headers") or []).get(b"content-type"))
    try:
        async for chunk in body_chunks(receive, max_bytes):
            reader.feed(chunk)
    except BodyTooLarge as exc:
        raise Refusal(413, "RequestEntityTooLarge", too_large(int(str(exc)))) from None
    return reader.finish()


@dataclass(frozen=True)
class Options:
    """What the form asks for, checked."""

    response_format: str = "json"
    stream: bool = False
    model: str | None = None  # the served name (whatever the form named), or None: vLLM's default
    temperature: float | None = None


def options_for(fields: dict[str, str], limits: Limits) -> Options:
    """The form's text fields, checked: response_format and stream here, model and temperature by
    request_policy's rules for a chat request (the served name; a number in [0, 2])."""
    fmt = fields.get("response_format", "json")
    if fmt not in RESPONSE_FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {shown(fmt)}")
    stream = fields.get("stream", "false").strip().lower()
    if stream not in ("true", "false"):
        raise bad_request(f"the form field stream must be true or false, not {shown(fields['stream'])}")
    if stream == "true" and fmt not in STREAM_FORMATS:
        raise bad_request(f"stream=true sends text events: response_format {fmt} needs stream=false")
    # `model` is any name: Whisper clients send their own ("whisper-1"), and this route has one
    # model to offer, so it is checked as text (bounded, printable) and the served one answers.
    chat: dict[str, Any] = {"model": fields.get("model", "-")}
    if "temperature" in fields:
        chat["temperature"] = _number(fields["temperature"])
    problem = field_problem(chat, Limits(vocab_size=limits.vocab_size))
    if problem:
        raise bad_request(problem)
    return Options(fmt, stream == "true", limits.served_model, chat.get("temperature"))


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # request_policy's rule names what it must be


# --- the audio ---------------------------------------------------------------------------------


async def decode_upload(data: bytes, limits: Limits) -> PreparedAudio:
    """The upload cut into windows by the client's rule, in a thread (decoding is CPU work)."""
    limit = limits.max_audio_seconds
    try:
        return await asyncio.to_thread(
            prepare, data, "file", window_seconds(limit), limit_seconds=limit, formats=SAFE_FORMATS
        )
    except AudioTooLong as exc:
        length = f"{'' if exc.exact else 'more than '}{exc.seconds:.1f} s"
        raise Refusal(413, "RequestEntityTooLarge",
                      f"the audio is {length} long: this server takes at most {exc.limit:g} s "
                      "(MAX_AUDIO_SECONDS); send a shorter clip (test_client.py sends any length, a window "
                      "at a time)") from None
    except InputError as exc:
        raise bad_request(escape(str(exc))) from None


def window_body(prepared: PreparedAudio, index: int, options: Options) -> bytes:
    """A client's chat request for one window (payload.chat_request), streamed back."""
    window = prepared.window(index)
    extra: dict[str, Any] = {} if options.temperature is None else {"temperature": options.temperature}
    body = chat_request(data_url(window.data, window.mime), options.model or "", stream=True, **extra)
    if options.model is None:
        del body["model"]
    return json.dumps(body).encode()


def chat_scope(scope: Scope, length: int) -> Scope:
    """A POST /v1/chat/completions from the upload's connection, with its Host and Authorization
    (vLLM checks the key itself as well when it has one) and nothing else of the upload's."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k in (b"host", b"authorization")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    chat = {**scope, "method": "POST", "path": CHAT_PATH, "raw_path": CHAT_PATH.encode(),
            "query_string": b"", "headers": headers}
    if isinstance(scope.get("state"), dict):
        chat["state"] = dict(scope["state"])  # per request, as the server makes it
    return chat


@dataclass
class Caption:
    text: str = ""
    usage: dict[str, int] = field(default_factory=dict)


class ChatReply:
    """vLLM's streamed answer to one window's request, read as it is sent: the text deltas (to
    `on_delta`), the usage, or the error as the guard answers it (shutdown_aware)."""

    def __init__(self, on_delta: Callable[[str], None] | None) -> None:
        self.on_delta = on_delta
        self.status = 0
        self.buffer = bytearray()
        self.caption = Caption()
        self.done = False
        self.error: Refusal | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message.get("status", 500))
            return
        if message["type"] != "http.response.body":
            return
        if self.status == 200:
            self.buffer += message.get("body", b"")
            self._events()
            return
        if len(self.buffer) <= MAX_ERROR_BODY:
            self.buffer += message.get("body", b"")
        if not message.get("more_body", False):
            self.error = refusal_from(self.status, bytes(self.buffer[:MAX_ERROR_BODY]))

    def _events(self) -> None:
        while (end := self.buffer.find(b"\n\n")) >= 0:
            event, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._data(line[5:].strip())

    def _data(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = {"error": {"message": "vLLM sent an event that is not JSON", "code": 500}}
        if not isinstance(chunk, dict) or not isinstance(chunk.get("error", {}), dict):
            chunk = {"error": {"message": "vLLM sent an event of another shape", "code": 500}}
        if "error" in chunk:
            code = chunk["error"].get("code")
            self.error = refusal_from(code if isinstance(code, int) and code >= 400 else 500,
                                      json.dumps(chunk).encode())
            return
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                self.caption.text += piece
                if self.on_delta is not None:
                    self.on_delta(piece)
        if chunk.get("usage"):
            self.caption.usage = {k: int(v) for k, v in chunk["usage"].items() if isinstance(v, int)}


def refusal_from(status: int, body: bytes) -> Refusal:
    """vLLM's (or the guard's) JSON error, as a Refusal to answer the upload with: its message as
    one bounded line (an error event inside a stream has not been through the guard's)."""
    try:
        error = json.loads(body)["error"]
        return Refusal(status, str(error.get("type") or "Error"), one_line(str(error["message"])))
    except (ValueError, KeyError, TypeError, AttributeError):
        return Refusal(status, "Error", f"the caption request failed with HTTP {status}")


class Windows:
    """The windows of one upload, captioned in parallel (at most WINDOWS_AT_ONCE at a time), each
    through the guard's chat checks and then vLLM's app, as a client's request would go. With
    `stream`, each window's text deltas go to its queue, then None when it ends."""

    def __init__(self, guard: RequestGuard, scope: Scope, prepared: PreparedAudio, options: Options,
                 gone: asyncio.Event) -> None:
        self.guard, self.scope, self.prepared, self.options, self.gone = guard, scope, prepared, options, gone
        self.slots = asyncio.Semaphore(WINDOWS_AT_ONCE)
        self.queues: list[asyncio.Queue[str | None]] = [asyncio.Queue() for _ in range(prepared.count)]
        self.tasks = [asyncio.create_task(self.caption(i)) for i in range(prepared.count)]

    async def caption(self, index: int) -> Caption:
        queue = self.queues[index]
        try:
            async with self.slots:
                body = await asyncio.to_thread(window_body, self.prepared, index, self.options)
                reply = ChatReply(queue.put_nowait if self.options.stream else None)
                try:
                    body, _ = await self.guard.check_chat(body)  # request_policy, as for a client
                    await self.call_vllm(body, reply)
                except Refusal as r:
                    reply.error = r
            if reply.error is not None:
                raise self.located(index, reply.error)
            if not reply.done:
                if self.gone.is_set():
                    raise ClientGone()
                early = Refusal(500, "InternalServerError", "the caption stream ended early")
                raise self.located(index, early)
            return reply.caption
        finally:
            queue.put_nowait(None)

    async def call_vllm(self, body: bytes, reply: ChatReply) -> None:
        async def gone() -> Message:
            await self.gone.wait()  # vLLM listens for the client leaving: this client's leaving
            return {"type": "http.disconnect"}

        receive = body_then(body, gone)

        try:
            await self.guard.app(chat_scope(self.scope, len(body)), receive, shutdown_aware(reply.send))
        except Exception as exc:  # raised past vLLM's handlers, as the guard sees it for a client
            if any(m.decode() in str(exc) for m in SHUTTING_DOWN_MARKERS):
                raise Refusal(503, "ServiceUnavailable", SHUTTING_DOWN) from None
            raise

    def located(self, index: int, r: Refusal) -> Refusal:
        """The error, saying which window when there are several."""
        if self.prepared.count == 1 or r.status == 503:
            return r
        start, end = self.prepared.spans[index]
        where = f"window {index + 1} of {self.prepared.count} ({start:.1f}-{end:.1f} s)"
        return Refusal(r.status, r.kind, f"{where}: {r.message}")

    def record(self, captions: list[Caption]) -> Record:
        """The upload's Record, built as the client builds one (captioner/batch.py)."""
        spans = self.prepared.spans
        segments = [Segment(a, b, c.text.strip()) for (a, b), c in zip(spans, captions, strict=True)]
        usage = {k: sum(c.usage.get(k, 0) for c in captions)
                 for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return Record(source="file", duration=self.prepared.duration, segments=segments,
                      caption=join_captions(segments), model=self.options.model, usage=usage)

    def cancel(self) -> None:
        for task in self.tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" line in the log


# --- the answers -------------------------------------------------------------------------------


def token_usage(usage: dict[str, int] | None) -> dict[str, Any]:
    """vLLM's usage in OpenAI's transcription shape."""
    usage = usage or {}
    return {"type": "tokens", "input_tokens": usage.get("prompt_tokens", 0),
            "output_tokens": usage.get("completion_tokens", 0), "total_tokens": usage.get("total_tokens", 0)}


def rendered(record: Record, fmt: str) -> tuple[bytes, bytes]:
    """(body, content type) of the answer in `fmt`: text, srt and vtt by captioner/formats.py's
    writers; json and verbose_json in OpenAI's shapes, their segments the record's windows."""
    if fmt in CONTENT_TYPES:
        return render([record], fmt, many=False).encode(), CONTENT_TYPES[fmt]
    payload: dict[str, Any] = {"text": record.caption, "usage": token_usage(record.usage)}
    if fmt == "verbose_json":
        duration = round(record.duration or 0.0, 3)
        segments = [s.to_json() for s in record.segments]
        payload = {"task": "transcribe", "language": LANGUAGE, "duration": duration, "text": record.caption,
                   "segments": [{"id": i, "start": s["start"], "end": s["end"], "text": s["caption"]}
                                for i, s in enumerate(segments)],
                   "usage": {"type": "duration", "seconds": duration}}
    return json.dumps(payload, ensure_ascii=False).encode(), b"application/json"


async def respond(send: Send, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *PRIVATE]})
    await send({"type": "http.response.body", "body": body})


async def refuse(send: Send, r: Refusal) -> None:
    retry = [(b"retry-after", b"5")] if r.status == 503 else None
    await error_response(send, r.status, r.kind, r.message, retry)


class DeltaJoiner:
    """Each window's caption deltas as deltas of the joined caption (records.join_captions: each
    window's caption stripped, the non-empty ones joined by one space), so that the deltas add up
    to the done event's text exactly."""

    def __init__(self) -> None:
        self.emitted = False
        self.begun = False
        self.held = ""  # trailing whitespace: sent only if more text follows in this window

    def next_window(self) -> None:
        self.begun, self.held = False, ""

    def add(self, piece: str) -> str:
        if not self.begun:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.begun = True
            text = (" " if self.emitted else "") + piece
        else:
            text = self.held + piece
        core = text.rstrip()
        self.held = text[len(core):]
        self.emitted = self.emitted or bool(core)
        return core


def event(data: dict[str, Any]) -> Message:
    line = b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
    return {"type": "http.response.body", "body": line, "more_body": True}


async def stream(windows: Windows, send: Send) -> None:
    """Server-sent events, as OpenAI's API sends a transcription: `transcript.text.delta` events as
    the first window is captioned, then each next one in order (the later ones were captioned
    meanwhile), then `transcript.text.done` with the whole text. An error before the first event
    is an HTTP error; after it, an event {"error": ...} (the OpenAI SDK raises it)."""
    started = False
    joiner = DeltaJoiner()
    captions: list[Caption] = []

    async def start() -> None:
        nonlocal started
        if not started:
            started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), *PRIVATE]})

    for task, queue in zip(windows.tasks, windows.queues, strict=True):
        joiner.next_window()
        while (piece := await queue.get()) is not None:
            if delta := joiner.add(piece):
                await start()
                await send(event({"type": "transcript.text.delta", "delta": delta}))
        try:
            captions.append(await task)
        except Refusal as r:
            if not started:
                raise
            error = {"message": r.message, "type": r.kind, "param": None, "code": r.status}
            await send(event({"error": error}))
            await send({"type": "http.response.body", "body": b""})
            return
        await start()
    record = windows.record(captions)
    done = {"type": "transcript.text.done", "text": record.caption, "usage": token_usage(record.usage)}
    await send(event(done))
    await send({"type": "http.response.body", "body": b""})


async def serve(guard: RequestGuard, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one POST to an audio path (the guard has checked Host, Origin, key, route and any
    declared size)."""
    try:
        form = await read_form(scope, receive, guard.max_bytes, guard.too_large)
        options = options_for(form.fields, guard.limits)
        prepared = await decode_upload(form.file or b"", guard.limits)
    except ClientGone:
        return
    except Refusal as r:
        await refuse(send, r)
        return
    del form
    gone = asyncio.Event()

    async def watch() -> None:
        await receive()  # the body is read: what comes next is the client leaving
        gone.set()

    watcher = asyncio.create_task(watch())
    windows = Windows(guard, scope, prepared, options, gone)
    try:
        if options.stream:
            await stream(windows, send)
        else:
            record = windows.record(list(await asyncio.gather(*windows.tasks)))
            await respond(send, *rendered(record, options.response_format))
    except ClientGone:
        pass
    except Refusal as r:
        await refuse(send, r)
    finally:
        gone.set()  # to vLLM, each window's client has left: it stops what is still running
        watcher.cancel()
        windows.cancel()
