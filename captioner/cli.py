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
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from captioner.api import (
    DEFAULT_BACKOFF,
    DEFAULT_BASE_URL,
    CaptionClient,
    normalize_base_url,
    retry_wait,
)
from captioner.audio import window_seconds
from captioner.batch import (
    BatchOptions,
    ClientRing,
    plural,
    process_item,
    run_batch,
)
from captioner.config import SAMPLE_CLIP, ConfigError, Settings
from captioner.errors import (
    CaptionerError,
    ExitCode,
    InputError,
    UsageError,
    exit_code_for,
)
from captioner.formats import (
    FORMAT_BY_EXTENSION,
    SUBTITLE_FORMATS,
    escape_text,
)
from captioner.inputs import InputItem, resolve_inputs
from captioner.options import (
    DEFAULT_CONCURRENCY,
    PROMPT_REFUSED,
    build_parser,
)
from captioner.output import Output
from captioner.records import Record
from captioner.servers import ServerPool, is_server_down, short_reason

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
    return shlex.join([python, program, *argv])


def run(args: argparse.Namespace) -> ExitCode:
    if args.prompt is not None:
        raise UsageError(PROMPT_REFUSED)
    fmt = choose_format(args)
    try:
        settings = Settings()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    base_urls = choose_base_urls(args, settings)
    if args.inputs:
        items = resolve_inputs(args.inputs)
    else:
        if not SAMPLE_CLIP.exists():
            raise InputError(f"no INPUT given and the sample clip {SAMPLE_CLIP} is missing")
        items = resolve_inputs([str(SAMPLE_CLIP)])
    check_combinations(args, fmt, items)
    concurrency = choose_concurrency(args, settings, len(base_urls))
    segment_seconds = choose_segment_seconds(args, settings)
    api_key = args.api_key or settings.get("CAPTIONER_API_KEY") or settings.get("API_KEY")
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
    ring = ClientRing(clients, wait=retry_wait(retries))
    # Checked and locked before the first request: a typo in --output costs nothing.
    output = Output(fmt, args.output, [i.key for i in items], sys.stdout)
    try:
        model = choose_model(args.model, clients, ring)
        options = BatchOptions(
            model=model,
            segment_seconds=segment_seconds,
            max_tokens=args.max_tokens,
            concurrency=concurrency,
            server_fetch=args.server_fetch,
        )
        if args.stream:
            return stream_one(items[0], options, ring)
        return run_many(items, options, ring, output, args.resume_command)
    finally:
        output.abandon()  # no-op after a finished run
        ring.close()  # requests still under way (a stopped batch) end, quietly
        for client in clients:
            client.close()


def choose_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.output is not None:
        return FORMAT_BY_EXTENSION.get(args.output.suffix.lower(), "text")
    return "text"


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


def choose_base_urls(args: argparse.Namespace, settings: Settings) -> list[str]:
    """--base-url, else CAPTIONER_BASE_URL, else this host at the service's PORT."""
    urls = args.base_url or re.split(r"[\s,]+", settings.get("CAPTIONER_BASE_URL") or "")
    port = settings.get("PORT")
    default = f"http://127.0.0.1:{port}" if port and port.isdigit() else DEFAULT_BASE_URL
    urls = [normalize_base_url(u) for u in urls if u] or [default]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url {url}: expected http://HOST:PORT")
    return list(dict.fromkeys(urls))


def choose_concurrency(args: argparse.Namespace, settings: Settings, servers: int) -> int:
    """--concurrency, else CAPTIONER_CONCURRENCY, else MAX_NUM_SEQS per server, else 8.

    MAX_NUM_SEQS is how many sequences the server batches at once: fewer requests in
    flight leave its batch slots idle, more only wait in its queue. The server does
    not publish it (its metrics show running requests, not the cap), so it is read
    from the shared configuration.
    """
    if args.concurrency:
        return int(args.concurrency)
    for name, scale in (("CAPTIONER_CONCURRENCY", 1), ("MAX_NUM_SEQS", servers)):
        value = settings.get(name)
        if value:
            try:
                number = int(value)
            except ValueError:
                raise UsageError(f"{name}={value}: expected a whole number") from None
            if number >= 1:
                return number * scale
    return DEFAULT_CONCURRENCY * servers


def choose_segment_seconds(args: argparse.Namespace, settings: Settings) -> float:
    """--segment-seconds, else 30 s, or MAX_AUDIO_SECONDS where that is lower.

    The server refuses audio longer than MAX_AUDIO_SECONDS, so windows longer than
    that would all be refused. Read from the shared configuration, like MAX_NUM_SEQS.
    """
    if args.segment_seconds:
        return float(args.segment_seconds)
    value = settings.get("MAX_AUDIO_SECONDS")
    if value:
        try:
            cap = float(value)
        except ValueError:
            raise UsageError(f"MAX_AUDIO_SECONDS={value}: expected a number of seconds") from None
        return window_seconds(cap)
    return window_seconds(None)


def choose_model(requested: str | None, clients: list[CaptionClient], pool: ServerPool | None = None) -> str:
    """The model to ask for: `requested` (--model) as it is, nothing asked; else the first model
    the servers list (GET /v1/models), which also checks that they answer and take the key.

    Several servers are asked at once and the first answer decides: a server that has not
    answered stays out of the rotation (`ServerPool.pending`) until it does, so one that
    accepts connections and never answers holds nothing up. One that cannot be reached leaves
    the rotation with a warning (probed later); one that refuses (a wrong key) or does not serve
    the model is left out for the run. Only when none answers is the check waited for, as long
    as the retries of one server would wait.
    """
    if requested is not None:
        return requested
    if pool is None or len(clients) == 1:
        served = clients[0].list_models()
        if not served:
            raise UsageError(f"{clients[0].base_url} serves no model")
        log.debug("model %s on %s", served[0], clients[0].base_url)
        return served[0]
    return _first_model(clients, pool)


def _first_model(clients: list[CaptionClient], pool: ServerPool) -> str:
    lock = threading.Lock()
    known = threading.Event()
    chosen: list[str] = []
    refusals: list[CaptionerError] = []
    left = [len(clients)]

    def failed(client: CaptionClient, exc: CaptionerError) -> None:
        with lock:
            if is_server_down(exc):
                pool.mark_down(client, short_reason(exc))
            else:
                pool.retire(client, short_reason(exc))
                refusals.append(exc)
            left[0] -= 1
            if not left[0]:
                known.set()

    def check(client: CaptionClient) -> None:
        try:
            served = client.list_models()
        except CaptionerError as exc:
            failed(client, exc)
            return
        except Exception as exc:  # whatever it is, the count must come down
            failed(client, CaptionerError(f"{client.base_url}: unexpected {type(exc).__name__}: {exc}"))
            return
        with lock:
            if not chosen and served:
                chosen.append(served[0])
                log.debug("model %s, first listed by %s", served[0], client.base_url)
            if chosen and chosen[0] in served:
                pool.confirm(client)
            else:
                what = ", ".join(served) or "no model"
                pool.retire(client, f"it serves {what}, not {chosen[0]}" if chosen else f"it serves {what}")
                if not chosen:
                    refusals.append(UsageError(f"{client.base_url} serves no model"))
            left[0] -= 1
            if chosen or not left[0]:
                known.set()

    for client in clients:
        pool.pending(client)
    for client in clients:  # daemons: a check still waiting on a hung server never holds the exit
        threading.Thread(target=check, args=(client,), name="captioner-check", daemon=True).start()
    known.wait()
    with lock:
        if chosen:
            return chosen[0]
        if refusals:
            raise refusals[0]
    # None answers: wait for one as for a single server (probes, as long as --retries would).
    served = pool.call(lambda c: c.list_models())
    if not served:
        raise UsageError("the server that answered serves no model")
    return str(served[0])


def stream_one(item: InputItem, options: BatchOptions, ring: ClientRing) -> ExitCode:
    def show(piece: str) -> None:
        sys.stdout.write(escape_text(piece))
        sys.stdout.flush()

    record = process_item(item, options, ring, on_text=show)
    if record.ok:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return ExitCode.OK
    report_failure(record)
    if record.exception is not None:
        return exit_code_for(record.exception)
    return ExitCode.FAILURES


def report_failure(record: Record) -> None:
    # Word for word the record's `error` (process_item puts the input first).
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
    ring: ClientRing,
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
        summary = run_batch(items, options, ring, on_record, skip=done)
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
