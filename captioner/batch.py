"""Caption many inputs: concurrency, several servers, bounded memory.

Two thread pools. A few reader threads read, probe and (when longer than a window)
decode one input at a time and queue its windows; `concurrency` request threads send
them, so no more than `concurrency` requests are in flight however inputs split into
windows, and a long file's windows are captioned in parallel. Readers take a request
slot before reading an input or encoding a window, so nothing is read further ahead
than requests are in flight, and no thread waits for an input's captions: the last
window to come back completes the record. Requests go to the least-busy live server
(servers.py). Records reach the caller in the main thread, one at a time, as inputs
finish; output.py keeps them (resume, input order).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import requests

from captioner.api import Caption, Usage
from captioner.audio import Window, prepare
from captioner.errors import (
    CaptionerError,
    ExitCode,
    exit_code_for,
    is_fatal,
)
from captioner.inputs import InputItem, load_bytes
from captioner.output import RECORD_PREFIX, ResumeInfo, StateFile
from captioner.payload import data_url
from captioner.records import Record, Segment, join_captions
from captioner.servers import ServerPool

__all__ = ["RECORD_PREFIX", "JsonlWriter", "ResumeInfo", "load_finished"]


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


ClientRing = ServerPool  # the old name: requests go to the least-busy live server


def _call(
    ring: ClientRing,
    audio_url: str,
    options: BatchOptions,
    on_text: Callable[[str], None] | None = None,
) -> Caption:
    if on_text is not None:
        stream = on_text
        return ring.call(lambda c: c.caption_stream(audio_url, options.model, stream, options.max_tokens))
    return ring.call(lambda c: c.caption(audio_url, options.model, options.max_tokens))


def _call_window(
    ring: ClientRing,
    window: Window,
    options: BatchOptions,
    on_text: Callable[[str], None] | None = None,
) -> Caption:
    # The base64 copy is made here, per request, not for all of a long file's windows at once.
    return _call(ring, data_url(window.data, window.mime), options, on_text)


def process_item(
    item: InputItem,
    options: BatchOptions,
    ring: ClientRing,
    request_pool: Executor | None = None,
    on_text: Callable[[str], None] | None = None,
    stdin: BinaryIO | None = None,
    download_session: requests.Session | None = None,
) -> Record:
    """Caption one input. Never raises for the input's own problems: the record says.

    With `on_text` the windows are streamed one after another; otherwise they go
    through `request_pool` (in parallel) or, without one, in turn.
    """
    started = time.monotonic()
    record = Record(source=item.source, model=options.model)
    try:
        if item.kind == "url" and options.server_fetch:
            caption = _call(ring, item.source, options, on_text)
            record.caption = caption.text.strip()
            record.model = caption.model
            record.usage = vars(caption.usage)
        else:
            data = load_bytes(item, stdin, download_session)
            prepared = prepare(data, item.name, options.segment_seconds)
            del data
            if options.on_windows is not None and prepared.count > 1:
                options.on_windows(prepared.count)
            captions = _caption_windows(prepared.windows, options, ring, request_pool, on_text)
            _fill(record, prepared.duration, prepared.spans, captions)
    except Exception as exc:  # one input's failure must not end the batch
        _fail(record, item, exc)
    record.latency = time.monotonic() - started
    return record


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


def _caption_windows(
    windows: list[Window],
    options: BatchOptions,
    ring: ClientRing,
    request_pool: Executor | None,
    on_text: Callable[[str], None] | None,
) -> list[Caption]:
    if on_text is not None or request_pool is None:
        captions = []
        for i, window in enumerate(windows):
            if on_text is not None and i > 0:
                on_text(" ")
            captions.append(_call_window(ring, window, options, on_text))
            if options.on_window_done is not None:
                options.on_window_done()
        return captions
    futures: list[Future[Caption]] = [
        request_pool.submit(_call_window, ring, window, options) for window in windows
    ]
    if options.on_window_done is not None and len(windows) > 1:
        done = options.on_window_done
        for f in futures:
            f.add_done_callback(lambda f: done() if not f.cancelled() and f.exception() is None else None)
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()  # after a failure, windows not yet sent are not worth sending


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
    ring: ClientRing,
    request_pool: Executor,
    slots: _Slots,
    finish: Callable[[Record], None],
    stdin: BinaryIO | None,
    downloads: requests.Session,
) -> None:
    """Read, probe or decode one input and send its windows; never waits for captions.

    Reads only when a request slot is free, so inputs are read no further ahead than
    requests are in flight; a long input's windows are encoded one at a time, each when
    a slot frees, and its decoded audio is dropped once the last one is out.
    """
    started = time.monotonic()
    record = Record(source=item.source, model=options.model)
    held = False
    try:
        slots.take()
        held = True
        if item.kind == "url" and options.server_fetch:
            collect = _Collect(record, item, started, finish, None, [(0.0, 0.0)], options)
            future = request_pool.submit(_call, ring, item.source, options)
            held = False
            collect.add(future)
            future.add_done_callback(functools.partial(collect.window_done, 0, slots))
            collect.all_sent(1)
            return
        data = load_bytes(item, stdin, downloads)
        prepared = prepare(data, item.name, options.segment_seconds)
        del data
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
                future = request_pool.submit(_call_window, ring, prepared.window(index), options)
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
    ring: ClientRing,
    on_record: Callable[[Record], None],
    skip: Iterable[str] = (),
    stdin: BinaryIO | None = None,
) -> Summary:
    """Caption `items` (except sources in `skip`), handing each record to `on_record`.

    A few reader threads (`_start_item`) read, probe or decode inputs and queue their
    windows; `concurrency` request threads send them. Memory and threads are bounded
    by the concurrency, not by the number or length of the inputs. Records reach
    `on_record` in this thread as inputs finish.

    Stops early on a fatal error (server unreachable, key refused): the summary's
    `aborted` says why. KeyboardInterrupt propagates after pending work is cancelled.
    """
    done = set(skip)
    todo = [i for i in items if i.kind == "stdin" or i.source not in done]
    summary = Summary(files=len(items), skipped=len(items) - len(todo))
    started = time.monotonic()
    concurrency = max(1, options.concurrency)
    # Readers: enough to keep the requests fed (probing a short input takes milliseconds,
    # a download longer); full decodes are capped at the number of cores (audio.py).
    readers = min(max(len(todo), 1), max(4, 2 * (os.cpu_count() or 2)))
    stop = threading.Event()
    slots = _Slots(concurrency + readers, stop)
    finished: queue.Queue[Record] = queue.Queue()
    item_pool = ThreadPoolExecutor(readers, "captioner-item")
    request_pool = ThreadPoolExecutor(concurrency, "captioner-request")
    downloads = requests.Session()
    try:
        for item in todo:
            item_pool.submit(
                _start_item, item, options, ring, request_pool, slots, finished.put, stdin, downloads
            )
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


# --- resume -----------------------------------------------------------------------


def load_finished(path: Path) -> ResumeInfo:
    """Read an earlier run's JSONL output: which sources are done; repair the file.

    See `output.scan_records`. The file is locked while it is read and repaired.
    """
    if not path.exists():
        return ResumeInfo()
    state = StateFile(path)
    try:
        return state.load()
    finally:
        state.close()


JsonlWriter = StateFile  # appends records, each whole: one write, then fsync
