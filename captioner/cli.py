"""Command line: `python test_client.py [INPUT ...]`.

The only module that prints and picks exit codes; everything it calls raises domain
errors or returns records.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from captioner.api import CaptionClient, retry_wait
from captioner.batch import BatchOptions, plural, run_batch
from captioner.config import SAMPLE_CLIP
from captioner.errors import (
    CaptionerError,
    ExitCode,
    InputError,
    UsageError,
    exit_code_for,
)
from captioner.formats import SUBTITLE_FORMATS, escape_text
from captioner.inputs import InputItem, resolve_inputs
from captioner.options import DEFAULT_BACKOFF, PROMPT_REFUSED, build_parser
from captioner.output import Output
from captioner.records import Record
from captioner.servers import ServerPool, first_model
from captioner.settings import (
    choose_api_key,
    choose_base_urls,
    choose_concurrency,
    choose_format,
    choose_segment_seconds,
    load_settings,
)

log = logging.getLogger("captioner")

__all__ = ["build_parser", "main"]


class TqdmHandler(logging.Handler):
    """Log lines that don't tear through the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


class Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "captioner: "
        if record.levelno >= logging.ERROR:
            prefix += "error: "
        elif record.levelno >= logging.WARNING:
            prefix += "warning: "
        text = prefix + escape_text(record.getMessage())  # a server's words cannot drive the terminal
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text


def setup_logging(debug: bool) -> None:
    handler = TqdmHandler()
    handler.setFormatter(Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if debug:
        urllib3_log = logging.getLogger("urllib3")
        urllib3_log.handlers[:] = [handler]
        urllib3_log.setLevel(logging.DEBUG)


def exit_now_on_sigint() -> None:
    """From here on a Ctrl-C ends the process at once: exit 130, one line, no traceback.

    For the moments a KeyboardInterrupt cannot be handled cleanly: while modules import
    (test_client.py installs it first) and while an interrupted run cleans up.
    """

    def interrupted(signum: int, frame: Any) -> None:
        os.write(2, b"captioner: error: interrupted\n")
        os._exit(ExitCode.INTERRUPTED)

    signal.signal(signal.SIGINT, interrupted)


def return_freed_buffers_to_the_system() -> None:
    """Have glibc hand big freed blocks back to the system at once.

    glibc serves a block at or above its mmap threshold from a mapping of its own, returned on
    free; but it raises the threshold to the largest such block freed (up to 32 MiB), after
    which megabyte blocks come from per-thread arenas that keep them when freed. A batch's
    request threads each make and drop a 1.3 MB body per window: at 128 requests in flight that
    held ~90 MiB for nothing (40 x 7-minute WAVs: 309 MiB peak, 220 MiB with a fixed threshold).
    A fixed threshold (256 KiB) stops the raising. Elsewhere than glibc: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        args = build_parser().parse_args(argv)
        setup_logging(args.debug)
        return_freed_buffers_to_the_system()
        args.resume_command = resume_command(argv)
        return int(run(args))
    except KeyboardInterrupt as exc:
        if threading.current_thread() is threading.main_thread():
            exit_now_on_sigint()  # a second Ctrl-C while this one is handled
        if not log.handlers:
            setup_logging(debug)
        text = str(exc)
        log.error("interrupted%s", f": {text}" if text else "")
        if threading.active_count() > 1:
            # Worker threads may sit in a socket read for minutes and the interpreter
            # would join them before exiting. Every record written is already fsynced.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(ExitCode.INTERRUPTED)
        return ExitCode.INTERRUPTED
    except CaptionerError as exc:
        log.error("%s", exc, exc_info=debug)
        return exit_code_for(exc)
    except BrokenPipeError as exc:
        # stdout closed early (`| head -1`): the reader has what it wants, as with `seq 9 | head
        # -1`; no message. Point stdout at /dev/null so the interpreter's final flush does not
        # raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exit_code_for(exc)
    except Exception as exc:  # the one place unexpected errors end up
        log.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=debug)
        if not debug:
            log.error("rerun with --debug for the traceback")
        return exit_code_for(exc)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done, then raise it.

    A signal mask would not do: any worker thread may take the signal, and Python runs
    its handler in the main thread at once. So the handler itself is swapped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def resume_command(argv: Sequence[str]) -> str:
    """The command line that reruns this one (and so resumes it), for the last line."""
    # As typed (relative to the same folder the rerun starts in), else the kit's script.
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "test_client.py"
    python = sys.executable or "python"
    relative = os.path.relpath(python)
    if not relative.startswith(".."):
        python = relative  # .venv/bin/python rather than /home/.../.venv/bin/python
    return shlex.join([python, program, *hide_api_key(argv)])


def hide_api_key(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of --api-key replaced by a placeholder: the line is printed, and
    terminals, logs and screen shares keep what is printed."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            arg, hide_next = "<KEY>", False
        elif arg == "--api-key":
            hide_next = True
        elif arg.startswith("--api-key="):
            arg = "--api-key=<KEY>"
        shown.append(arg)
    return shown


def run(args: argparse.Namespace) -> ExitCode:
    if args.prompt is not None:
        raise UsageError(PROMPT_REFUSED)
    fmt = choose_format(args.format, args.output)
    settings = load_settings()
    base_urls = choose_base_urls(args.base_url, settings)
    if args.inputs:
        items = resolve_inputs(args.inputs)
    else:
        if not SAMPLE_CLIP.exists():
            raise InputError(f"no INPUT given and the sample clip {SAMPLE_CLIP} is missing")
        items = resolve_inputs([str(SAMPLE_CLIP)])
    check_combinations(args, fmt, items)
    concurrency = choose_concurrency(args.concurrency, settings, len(base_urls))
    segment_seconds = choose_segment_seconds(args.segment_seconds, settings)
    api_key = choose_api_key(args.api_key, settings)
    retries = int(args.retries)
    # Several servers: each retries once, then the pool fails over to another and
    # waits for a dead one only while every server is out (as long as --retries would).
    per_server = retries if len(base_urls) == 1 else min(retries, 1)
    clients = [
        CaptionClient(
            url,
            api_key,
            connect_timeout=args.connect_timeout,
            read_timeout=args.timeout,
            retries=per_server,
            backoff=DEFAULT_BACKOFF,
            pool_size=concurrency,
        )
        for url in base_urls
    ]
    pool = ServerPool(clients, wait=retry_wait(retries))
    # Checked and locked before the first request: a typo in --output costs nothing.
    output = Output(fmt, args.output, [i.key for i in items], sys.stdout)
    try:
        model = args.model if args.model is not None else first_model(pool)
        options = BatchOptions(
            model=model,
            segment_seconds=segment_seconds,
            max_tokens=args.max_tokens,
            concurrency=concurrency,
            server_fetch=args.server_fetch,
        )
        if args.stream:
            return stream_one(items[0], options, pool)
        return run_many(items, options, pool, output, args.resume_command)
    finally:
        output.abandon()  # no-op after a finished run
        pool.close()  # requests still under way (a stopped batch) end, quietly
        for client in clients:
            client.close()


def check_combinations(args: argparse.Namespace, fmt: str, items: list[InputItem]) -> None:
    if fmt in SUBTITLE_FORMATS and len(items) != 1:
        raise UsageError(f"--format {fmt} takes one input, got {len(items)}; for a batch use --format jsonl")
    if fmt in SUBTITLE_FORMATS and args.server_fetch:
        raise UsageError(f"--format {fmt} needs timings, which --server-fetch cannot give")
    if args.stream:
        if len(items) != 1:
            raise UsageError(f"--stream takes one input, got {len(items)}")
        if fmt != "text" or args.output is not None:
            raise UsageError("--stream prints text to stdout; drop --format/--output")


def stream_one(item: InputItem, options: BatchOptions, pool: ServerPool) -> ExitCode:
    def show(piece: str) -> None:
        sys.stdout.write(escape_text(piece))
        sys.stdout.flush()

    options.on_text = show
    records: list[Record] = []
    run_batch([item], options, pool, records.append)
    record = records[0]
    if isinstance(record.exception, BrokenPipeError):
        raise record.exception  # stdout closed (`| head`): not the input's failure
    if record.ok:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return ExitCode.OK
    report_failure(record)
    if record.exception is not None:
        return exit_code_for(record.exception)
    return ExitCode.FAILURES


def report_failure(record: Record) -> None:
    # Word for word the record's `error` (batch._fail puts the input first).
    log.error("%s", record.error or f"{record.source}: failed", exc_info=_debug_exc_info(record))


def _debug_exc_info(record: Record) -> Any:
    if log.isEnabledFor(logging.DEBUG) and record.exception is not None:
        exc = record.exception
        return (type(exc), exc, exc.__traceback__)
    return None


class WindowProgress:
    """A bar over one long input's windows, made once the input is split into several."""

    def __init__(self, options: BatchOptions) -> None:
        self.bar: tqdm[Any] | None = None
        self.lock = threading.Lock()
        options.on_windows, options.on_window_done = self.start, self.advance

    def start(self, windows: int) -> None:
        with self.lock:
            # disable=None: off when stderr is not a terminal.
            self.bar = tqdm(total=windows, unit="window", file=sys.stderr, disable=None, dynamic_ncols=True)

    def advance(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.update(1)

    def update(self, n: int) -> None:
        pass  # a file done: the windows said it

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()


def run_many(
    items: list[InputItem],
    options: BatchOptions,
    pool: ServerPool,
    output: Output,
    resume_cmd: str,
) -> ExitCode:
    resume = output.resume()
    shown = output.path
    if resume.dropped_partial:
        log.warning("%s: dropped a torn last line left by an interrupted run", shown)
    if resume.dropped_failed:
        log.info("%s: retrying %s", shown, plural(resume.dropped_failed, "failed input"))
    if resume.dropped_duplicates:
        log.warning("%s: dropped %s", shown, plural(resume.dropped_duplicates, "duplicate record"))
    done = resume.done
    skipping = sum(1 for i in items if i.key in done)
    if skipping:
        log.info("resuming: %d of %s already in %s", skipping, plural(len(items), "input"), shown)
    # None: off when stderr is not a terminal. One input: a bar over its windows, if it has several.
    progress: Any = tqdm(
        total=len(items) - skipping,
        unit="file",
        file=sys.stderr,
        disable=None if len(items) > 1 else True,
        dynamic_ncols=True,
    )
    if len(items) == 1:
        progress = WindowProgress(options)
    tally = {"done": skipping, "failed": 0}

    def on_record(record: Record) -> None:
        with sigint_deferred():  # the file and the count agree, whenever Ctrl-C comes
            output.add(record)
            tally["done" if record.ok else "failed"] += 1
        if not record.ok:
            report_failure(record)
        if len(items) > 1:
            progress.update(1)

    def where_it_stands() -> str:
        left = len(items) - tally["done"] - tally["failed"]
        text = f"{tally['done']} of {plural(len(items), 'input')} done, {tally['failed']} failed, {left} left"
        if output.resumable:
            return f"{text}; resume with: {resume_cmd}"
        return f"{text}; add --output FILE.jsonl to make a batch resumable"

    try:
        summary = run_batch(items, options, pool, on_record, skip=done)
    except KeyboardInterrupt:
        progress.close()
        output.abandon()
        raise KeyboardInterrupt(where_it_stands()) from None
    progress.close()
    if summary.aborted is not None and summary.not_run > 0:
        # The fatal error's message was already logged with the input it failed.
        output.abandon()
        log.info("%s", summary.line())
        log.error("batch stopped: %s", where_it_stands())
        return summary.exit_code()
    output.finish()
    if len(items) > 1 or output.path is not None:
        log.info("%s", summary.line())
    return summary.exit_code()
