"""Caption many inputs: concurrency, several servers, bounded memory.

Two thread pools. A few reader threads (`audio.DECODE_WORKERS`: at most 4, whatever the
core count, and never more than the concurrency) read, probe and (when longer than a
window) decode one input at a time and queue its windows; `concurrency` request threads
send them, so no more than `concurrency` requests are in flight however inputs split into
windows, and a long file's windows are captioned in parallel. Readers take a request
slot before reading an input or queueing a window, so nothing is read further ahead
than requests are in flight, and no thread waits for an input's captions: the last
window to come back completes the record. Requests go to the least-busy live server
(servers.py). Records reach the caller in the main thread, one at a time, as inputs
finish; output.py keeps them (resume, input order). A streamed caption (`on_text`, --stream)
takes the same path with one request thread, so its windows go out, and their text
arrives, one after another in order.

Memory: a queued window of a long input holds no audio (audio.py spools the decoded
samples to a temporary file); its request thread makes the WAV and the request body, once,
as bytes (a few threads at a time), and drops the window's audio: a request in flight
holds its body and nothing else, so memory is about `concurrency` bodies (1.3 MB for 30 s),
never more than BODY_BUDGET of them, plus the readers' decodes, however many or long the
inputs.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from captioner.api import Caption, Usage
from captioner.audio import DECODE_WORKERS, Window, prepare
from captioner.errors import (
    CaptionerError,
    ExitCode,
    exit_code_for,
    is_fatal,
)
from captioner.inputs import InputItem, open_media
from captioner.payload import chat_request_bytes
from captioner.records import Record, Segment, join_captions
from captioner.servers import ServerPool


def plural(count: int, word: str) -> str:
    """`1 file`, `2 files`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass
class BatchOptions:
    model: str
    segment_seconds: float = 30.0
    max_tokens: int | None = None
    concurrency: int = 8
    server_fetch: bool = False
    # A long input's progress: called with its number of windows once it is split, then
    # once per window captioned (from worker threads).
    on_windows: Callable[[int], None] | None = None
    on_window_done: Callable[[], None] | None = None
    # Stream the captions (--stream): called with each piece of text as it arrives, and with
    # " " between one window's caption and the next. One request at a time, so in order.
    on_text: Callable[[str], None] | None = None


@dataclass
class Summary:
    files: int = 0  # inputs named (after resolving folders)
    skipped: int = 0  # already in the output file (resume)
    done: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    aborted: CaptionerError | None = None  # a fatal error stopped the batch
    failure_codes: list[ExitCode] = field(default_factory=list)

    @property
    def speed(self) -> float:
        """Audio seconds captioned per wall-clock second."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def not_run(self) -> int:
        return self.files - self.skipped - self.done - self.failed

    def add(self, record: Record) -> None:
        if record.ok:
            self.done += 1
            self.audio_seconds += record.duration or 0.0
        else:
            self.failed += 1
            self.failure_codes.append(record.exit_code)

    def exit_code(self) -> ExitCode:
        """A fatal error's code; else one input's own code; else FAILURES if any failed."""
        if self.aborted is not None:
            return exit_code_for(self.aborted)
        if not self.failure_codes:
            return ExitCode.OK
        if self.files == 1:
            return self.failure_codes[0]
        return ExitCode.FAILURES

    def line(self) -> str:
        text = (
            f"{plural(self.files, 'file')}: {self.done} captioned, {self.failed} failed"
            + (f", {self.skipped} skipped (already in output)" if self.skipped else "")
            + (f", {self.not_run} not run" if self.not_run > 0 else "")
            + f"; {self.audio_seconds:.1f} s of audio in {self.wall_seconds:.1f} s"
            + f" ({self.speed:.2f} audio-seconds per second)"
        )
        return text


# Window bodies made at once (WAV, base64, JSON: a few MB while it runs): a few, however many
# request threads have a window to send.
_ENCODERS = threading.BoundedSemaphore(DECODE_WORKERS)
BODY_BUDGET = 160 << 20  # bytes of request bodies held at once: 128 windows of 30 s (1.22 MiB each)


class _Budget:
    """Bytes of request bodies in memory at once, across every request thread: a body is made
    only when it fits (or when none is held: one larger than the budget goes alone), and its
    bytes come back when its request ends. Memory then stays bounded at any --concurrency: past
    the budget, requests wait to be made instead of holding their bodies."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + size > self.limit:
                self._cond.wait()
            self.used += size
        try:
            yield
        finally:
            with self._cond:
                self.used -= size
                self._cond.notify_all()


_BODIES = _Budget(BODY_BUDGET)


def _call(pool: ServerPool, body: bytes, options: BatchOptions) -> Caption:
    """Send one request body, built once: the same bytes on every retry and every server."""
    if options.on_text is not None:
        stream = options.on_text
        return pool.call(lambda c: c.caption_stream_body(body, options.model, stream))
    return pool.call(lambda c: c.caption_body(body, options.model))


def _call_url(pool: ServerPool, url: str, options: BatchOptions) -> Caption:
    """--server-fetch: the server downloads `url` itself."""
    body = chat_request_bytes(url, options.model, options.max_tokens, stream=options.on_text is not None)
    return _call(pool, body, options)


class _Handout:
    """A window handed to a request thread once: taken, nothing else holds it (the thread
    pool's work item keeps its arguments until the request is done)."""

    def __init__(self, window: Window) -> None:
        self._window: Window | None = window

    def take(self) -> Window:
        window, self._window = self._window, None
        assert window is not None, "a window is sent once"
        return window


def _call_window(pool: ServerPool, window: _Handout, options: BatchOptions, first: bool = True) -> Caption:
    # The WAV and the body are made here, when the request goes out, not for all of a long
    # file's windows at once; the window's audio is dropped once the body holds it.
    stream = options.on_text is not None
    if options.on_text is not None and not first:
        options.on_text(" ")  # between a streamed window's caption and the next, as join_captions
    taken = window.take()
    with _BODIES.hold(-(-taken.size // 3) * 4 + 1024):  # base64 and the JSON around it
        with _ENCODERS:
            body = chat_request_bytes(
                taken.data, options.model, options.max_tokens, stream=stream, mime=taken.mime
            )
        del taken
        return _call(pool, body, options)


def new_record(item: InputItem, options: BatchOptions) -> Record:
    """An input's record before it is captioned: how it is shown, and its identity."""
    return Record(source=item.source, path=item.path, sha256=item.sha256, model=options.model)


def _fill(record: Record, duration: float, spans: list[tuple[float, float]], captions: list[Caption]) -> None:
    record.duration = duration
    record.segments = [Segment(a, b, c.text.strip()) for (a, b), c in zip(spans, captions, strict=True)]
    record.caption = join_captions(record.segments)
    record.model = captions[0].model
    usage = Usage()
    for c in captions:
        usage.add(c.usage)
    record.usage = vars(usage)


def _fail(record: Record, item: InputItem, exc: BaseException) -> None:
    message = (
        str(exc)
        if isinstance(exc, CaptionerError)
        else (f"{item.name}: unexpected {type(exc).__name__}: {exc}")
    )
    # The same words in the record as on stderr: the input first, once.
    if item.kind != "stdin" and not message.startswith(item.source):
        message = f"{item.source}: {message}"
    record.error = message
    record.exception = exc
    record.exit_code = exit_code_for(exc)
    record.segments, record.caption, record.usage, record.duration = [], "", None, None


class _Stopped(Exception):
    """The batch stopped (fatal error, Ctrl-C) while an input waited for a request slot."""


class _Slots:
    """Windows in memory at once (encoded, queued or in flight): `concurrency` plus a
    little read-ahead. An input takes a slot before it is read, and one per further
    window before that window is encoded; a slot comes back when its request ends."""

    def __init__(self, count: int, stop: threading.Event) -> None:
        self._free = threading.Semaphore(count)
        self._stop = stop

    def take(self) -> None:
        while not self._free.acquire(timeout=0.2):
            if self._stop.is_set():
                raise _Stopped
        if self._stop.is_set():
            self._free.release()
            raise _Stopped

    def give(self) -> None:
        self._free.release()


class _Collect:
    """One input whose windows are out: gathers their captions as they come back and
    hands the finished record over (from whichever thread completes it)."""

    def __init__(
        self,
        record: Record,
        item: InputItem,
        started: float,
        finish: Callable[[Record], None],
        duration: float | None,
        spans: list[tuple[float, float]],
        options: BatchOptions,
    ) -> None:
        self.record, self.item, self.started, self.finish = record, item, started, finish
        self.duration, self.spans, self.options = duration, spans, options
        self.captions: dict[int, Caption] = {}
        self.error: BaseException | None = None
        self.futures: list[Future[Caption]] = []
        self.sent: int | None = None  # set once every window that will go out has gone
        self.ended = 0
        self.lock = threading.Lock()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def add(self, future: Future[Caption]) -> None:
        with self.lock:
            self.futures.append(future)

    def window_done(self, index: int, slots: _Slots, future: Future[Caption]) -> None:
        slots.give()
        cancel: list[Future[Caption]] = []
        with self.lock:
            self.ended += 1
            if not future.cancelled():
                error = future.exception()
                if error is None:
                    self.captions[index] = future.result()
                    if self.options.on_window_done is not None and len(self.spans) > 1:
                        self.options.on_window_done()
                elif self.error is None:
                    self.error = error
                    cancel = list(self.futures)  # the other windows are not worth sending
            complete = self.sent is not None and self.ended == self.sent
        for f in cancel:
            f.cancel()
        if complete:
            self._complete()

    def all_sent(self, count: int) -> None:
        with self.lock:
            self.sent = count
            complete = self.ended == count
        if complete:
            self._complete()

    def _complete(self) -> None:
        record = self.record
        if self.error is not None or len(self.captions) != len(self.spans):
            _fail(record, self.item, self.error or _Stopped("not all windows were captioned"))
        elif self.duration is None:  # --server-fetch: one caption, no timings
            caption = self.captions[0]
            record.caption, record.model = caption.text.strip(), caption.model
            record.usage = vars(caption.usage)
        else:
            _fill(record, self.duration, self.spans, [self.captions[i] for i in range(len(self.spans))])
        record.latency = time.monotonic() - self.started
        self.finish(record)


def _start_item(
    item: InputItem,
    options: BatchOptions,
    pool: ServerPool,
    request_pool: Executor,
    slots: _Slots,
    finish: Callable[[Record], None],
    downloads: requests.Session,
) -> None:
    """Read, probe or decode one input and send its windows; never waits for captions.

    Reads only when a request slot is free, so inputs are read no further ahead than
    requests are in flight; a long input's windows are queued one at a time, each when
    a slot frees (its WAV is made by the request thread that sends it).
    """
    started = time.monotonic()
    record = new_record(item, options)
    held = False
    try:
        slots.take()
        held = True
        if item.kind == "url" and options.server_fetch:
            collect = _Collect(record, item, started, finish, None, [(0.0, 0.0)], options)
            future = request_pool.submit(_call_url, pool, item.source, options)
            held = False
            collect.add(future)
            future.add_done_callback(functools.partial(collect.window_done, 0, slots))
            collect.all_sent(1)
            return
        with open_media(item, downloads) as media:
            prepared = prepare(media, item.name, options.segment_seconds)
        collect = _Collect(record, item, started, finish, prepared.duration, prepared.spans, options)
        if options.on_windows is not None and prepared.count > 1:
            options.on_windows(prepared.count)
        sent = 0
        try:
            for index in range(prepared.count):
                if not held:
                    slots.take()
                    held = True
                if collect.failed:
                    break
                window = _Handout(prepared.window(index))
                future = request_pool.submit(_call_window, pool, window, options, index == 0)
                held = False
                sent += 1
                collect.add(future)
                future.add_done_callback(functools.partial(collect.window_done, index, slots))
        finally:
            prepared.release()
            collect.all_sent(sent)
    except _Stopped:
        return
    except Exception as exc:  # one input's failure must not end the batch
        _fail(record, item, exc)
        record.latency = time.monotonic() - started
        finish(record)
    finally:
        if held:
            slots.give()


def run_batch(
    items: Sequence[InputItem],
    options: BatchOptions,
    pool: ServerPool,
    on_record: Callable[[Record], None],
    skip: Iterable[str] = (),
) -> Summary:
    """Caption `items` (except those whose key is in `skip`), handing each record to `on_record`.

    A few reader threads (`_start_item`) read, probe or decode inputs and queue their
    windows; `concurrency` request threads send them. Memory and threads are bounded
    by the concurrency, not by the number or length of the inputs. Records reach
    `on_record` in this thread as inputs finish.

    Stops early on a fatal error (server unreachable, key refused): the summary's
    `aborted` says why. KeyboardInterrupt propagates after pending work is cancelled.
    """
    done = set(skip)
    todo = [i for i in items if i.key not in done]
    summary = Summary(files=len(items), skipped=len(items) - len(todo))
    started = time.monotonic()
    concurrency = 1 if options.on_text is not None else max(1, options.concurrency)
    # Readers: a few keep the requests fed (probing a short input takes milliseconds); each
    # holds a decode's working memory, so few whatever the core count or the concurrency.
    readers = max(1, min(len(todo), DECODE_WORKERS, concurrency))
    stop = threading.Event()
    slots = _Slots(concurrency + readers, stop)
    finished: queue.Queue[Record] = queue.Queue()
    item_pool = ThreadPoolExecutor(readers, "captioner-item")
    request_pool = ThreadPoolExecutor(concurrency, "captioner-request")
    downloads = requests.Session()
    try:
        for item in todo:
            item_pool.submit(_start_item, item, options, pool, request_pool, slots, finished.put, downloads)
        for _ in todo:
            record = finished.get()
            summary.add(record)
            on_record(record)
            if record.exception is not None and is_fatal(record.exception):
                assert isinstance(record.exception, CaptionerError)
                summary.aborted = record.exception
                break
    finally:
        stop.set()
        summary.wall_seconds = time.monotonic() - started
        # Don't wait for requests in flight: after an abort or Ctrl-C they are moot.
        item_pool.shutdown(wait=False, cancel_futures=True)
        request_pool.shutdown(wait=False, cancel_futures=True)
    return summary
