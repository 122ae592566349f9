"""Caption many inputs: concurrency, several servers, resumable JSONL output.

Two thread pools. Item workers read, probe and (when longer than a window) decode
and split one input each; every request to a server goes through the request pool,
so no more than `concurrency` requests are in flight however inputs split into
windows, and a long file's windows are captioned in parallel. Requests go
round-robin over the servers. Records reach the caller in the main thread, one at a
time, as inputs finish.

Resume: the JSONL output file is the state. A record is appended with one write
followed by fsync, so an interrupted run leaves whole records and at most one torn
last line; `load_finished` drops that line (and failed records, so they are retried)
by rewriting the file atomically, and the run skips every source already in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import requests

from captioner.api import Caption, Usage, audio_data_url
from captioner.audio import Window, prepare
from captioner.errors import (
    CaptionerError,
    ExitCode,
    exit_code_for,
    is_fatal,
)
from captioner.inputs import InputItem, load_bytes
from captioner.output import RECORD_PREFIX, ResumeInfo, StateFile
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
    return _call(ring, audio_data_url(window.data, window.mime), options, on_text)


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
            if options.on_windows is not None and len(prepared.windows) > 1:
                options.on_windows(len(prepared.windows))
            captions = _caption_windows(prepared.windows, options, ring, request_pool, on_text)
            record.duration = prepared.duration
            record.segments = [
                Segment(w.start, w.end, c.text.strip())
                for w, c in zip(prepared.windows, captions, strict=True)
            ]
            record.caption = join_captions(record.segments)
            record.model = captions[0].model
            usage = Usage()
            for c in captions:
                usage.add(c.usage)
            record.usage = vars(usage)
    except Exception as exc:  # noqa: BLE001 - one input's failure must not end the batch
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
        record.segments, record.caption, record.usage = [], "", None
    record.latency = time.monotonic() - started
    return record


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


def run_batch(
    items: Sequence[InputItem],
    options: BatchOptions,
    ring: ClientRing,
    on_record: Callable[[Record], None],
    skip: Iterable[str] = (),
    stdin: BinaryIO | None = None,
) -> Summary:
    """Caption `items` (except sources in `skip`), handing each record to `on_record`.

    Stops early on a fatal error (server unreachable, key refused): the summary's
    `aborted` says why. KeyboardInterrupt propagates after pending work is cancelled.
    """
    done = set(skip)
    todo = [i for i in items if i.kind == "stdin" or i.source not in done]
    summary = Summary(files=len(items), skipped=len(items) - len(todo))
    started = time.monotonic()
    concurrency = max(1, options.concurrency)
    # An item thread waits for its own captions, so `concurrency` threads are busy
    # waiting; as many again read and probe the next inputs, so a wave of requests that
    # finish together is replaced at once, not after one probe per free slot.
    item_pool = ThreadPoolExecutor(min(2 * concurrency, max(len(todo), 1)), "captioner-item")
    request_pool = ThreadPoolExecutor(concurrency, "captioner-request")
    downloads = requests.Session()
    try:
        futures = [
            item_pool.submit(process_item, item, options, ring, request_pool, None, stdin, downloads)
            for item in todo
        ]
        for future in as_completed(futures):
            record = future.result()
            summary.add(record)
            on_record(record)
            if record.exception is not None and is_fatal(record.exception):
                assert isinstance(record.exception, CaptionerError)
                summary.aborted = record.exception
                break
    finally:
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
