"""Command line: `python test_client.py [INPUT ...]`.

The only module that prints and picks exit codes; everything it calls raises domain
errors or returns records.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from captioner import __version__
from captioner.api import (
    BACKOFF_MAX,
    DEFAULT_BACKOFF,
    DEFAULT_BASE_URL,
    DEFAULT_RETRIES,
    CaptionClient,
    normalize_base_url,
    retry_wait,
)
from captioner.audio import MAX_WINDOW_SECONDS, window_seconds
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
    FORMATS,
    SUBTITLE_FORMATS,
)
from captioner.inputs import InputItem, resolve_inputs
from captioner.output import Output
from captioner.records import Record
from captioner.servers import is_server_down, short_reason

log = logging.getLogger("captioner")

DEFAULT_CONCURRENCY = 8
DEFAULT_SEGMENT_SECONDS = MAX_WINDOW_SECONDS
PROMPT_REFUSED = (
    "--prompt: the Captioner takes no text prompt; it describes the audio alone, "
    "so requests carry audio only (drop --prompt)"
)

DESCRIPTION = """\
Caption audio with the Qwen3-Omni Captioner service (vLLM, OpenAI-compatible API).

INPUT is a file, a folder (searched recursively for audio), - for stdin, or an
http(s) URL; several may be given. With no INPUT the sample clip is captioned.
"""

DEFAULT_WAIT = retry_wait(DEFAULT_RETRIES)
WAIT_10 = retry_wait(10)

EPILOG = f"""\
defaults from the environment, then config.env (or $CAPTIONER_CONFIG), then config.env.example:
  CAPTIONER_BASE_URL    server URL(s), space- or comma-separated; else
                        http://127.0.0.1:PORT with the service's PORT ({DEFAULT_BASE_URL})
  CAPTIONER_API_KEY     API key, else API_KEY as the service uses it
  CAPTIONER_CONCURRENCY requests in flight, else MAX_NUM_SEQS (the server's batch
                        size) times the number of servers, else {DEFAULT_CONCURRENCY}
  MAX_AUDIO_SECONDS     the server's audio cap: --segment-seconds defaults to it
                        where it is below {DEFAULT_SEGMENT_SECONDS:g}

retries: refused or dropped connections and HTTP 502/503/504 are retried after
  pauses of 0, 1, 2, 4 ... s, each at most {BACKOFF_MAX:g} s (or the server's Retry-After):
  --retries {DEFAULT_RETRIES} (the default) waits up to {DEFAULT_WAIT:g} s in all, \
--retries 10 up to {WAIT_10:g} s
  (a GPU server loading the model may need it); a read timeout is never retried

exit codes: 0 ok, 1 some inputs failed, 2 usage, 3 input unreadable, 4 cannot
connect, 5 timeout, 6 server refused (4xx, or vLLM's 500 for unusable input),
7 server error (other 5xx), 130 Ctrl-C
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_client.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="file, folder, -, or URL")
    p.add_argument(
        "-f", "--format", choices=FORMATS, default=None,
        help="output format (default: from --output's extension, else text); "
        "srt and vtt take one input; jsonl with --output resumes",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="write results to FILE instead of stdout; with jsonl, a rerun skips "
        "inputs already in FILE",
    )  # fmt: skip
    p.add_argument(
        "-c", "--concurrency", type=positive_int, metavar="N",
        help="requests in flight at once (default: see below)",
    )  # fmt: skip
    p.add_argument(
        "--base-url", action="append", metavar="URL",
        help="server to use; repeat to spread a batch over several servers",
    )  # fmt: skip
    p.add_argument("--api-key", metavar="KEY", help="API key (default: see below)")
    p.add_argument("--model", help="served model name (default: the server's first, from /v1/models)")
    p.add_argument(
        "--segment-seconds", type=positive_float, metavar="S",
        help=f"split audio longer than S seconds into windows (default {DEFAULT_SEGMENT_SECONDS:g}, "
        "or the server's MAX_AUDIO_SECONDS if lower; the model is at its best on 30 s or less)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens", type=positive_int, metavar="N",
        help="cap a caption's length in tokens (default: the server's)",
    )  # fmt: skip
    p.add_argument(
        "--stream", action="store_true",
        help="print the caption as it is generated (one input, text format)",
    )  # fmt: skip
    p.add_argument(
        "--server-fetch", action="store_true",
        help="let the server download http(s) inputs (needs ALLOWED_MEDIA_DOMAINS on "
        "the server; no long-audio splitting) instead of the client sending them inline",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=positive_float, default=300.0, metavar="S",
        help="seconds to wait for an answer (default 300)",
    )  # fmt: skip
    p.add_argument(
        "--connect-timeout", type=positive_float, default=10.0, metavar="S",
        help="seconds to wait for a connection (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
        help="retries on refused or dropped connections and HTTP 502/503/504, with "
        f"backoff (default {DEFAULT_RETRIES}: up to {DEFAULT_WAIT:g} s in all; "
        "0 fails at once; see below)",
    )  # fmt: skip
    p.add_argument(
        "--prompt", metavar="TEXT",
        help="refused: the Captioner takes no text prompt (kept so the refusal is clear)",
    )  # fmt: skip
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


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
        text = prefix + record.getMessage()
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        args = build_parser().parse_args(argv)
        setup_logging(args.debug)
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
    except BrokenPipeError:
        # stdout closed early (`| head`): not an error worth a message. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FAILURES
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
    if args.inputs:
        items = resolve_inputs(args.inputs)
    else:
        if not SAMPLE_CLIP.exists():
            raise InputError(f"no INPUT given and the sample clip {SAMPLE_CLIP} is missing")
        items = resolve_inputs([str(SAMPLE_CLIP)])
    check_combinations(args, fmt, items)
    base_urls = choose_base_urls(args, settings)
    concurrency = choose_concurrency(args, settings, len(base_urls))
    segment_seconds = choose_segment_seconds(args, settings)
    # Checked and locked before the first request: a typo in --output costs nothing.
    output = Output(fmt, args.output, [i.source for i in items], sys.stdout)
    try:
        api_key = args.api_key or settings.get("CAPTIONER_API_KEY") or settings.get("API_KEY")
        retries = max(args.retries, 0)
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
                on_not_answering=say_not_answering,
            )
            for url in base_urls
        ]
        ring = ClientRing(clients, wait=retry_wait(retries))
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


def choose_model(requested: str | None, clients: list[CaptionClient], pool: ClientRing | None = None) -> str:
    """The model to ask for; also the check that the servers answer and accept the key.

    With several servers, one that does not answer starts out of the rotation (a
    warning; it is probed again later) and the batch runs on the others; only when none
    answers is it waited for as for a single server.
    """
    model = requested
    answering: list[CaptionClient] = []
    for client in clients:
        try:
            served = client.list_models()
        except CaptionerError as exc:
            if len(clients) == 1 or not is_server_down(exc):
                raise
            if pool is not None:
                pool.mark_down(client, short_reason(exc))
            continue
        answering.append(client)
        if not served:
            raise UsageError(f"{client.base_url} serves no model")
        if model is None:
            model = served[0]
        elif model not in served:
            raise UsageError(
                f"--model {model}: not served by {client.base_url} (it serves {', '.join(served)})"
            )
    if not answering:  # none answers: wait for the first as if it were the only one
        served = clients[0].list_models()
        model = model or (served[0] if served else None)
        if model is None:
            raise UsageError(f"{clients[0].base_url} serves no model")
    assert model is not None
    log.debug("model %s on %s", model, ", ".join(c.base_url for c in answering or clients))
    return model


def say_not_answering(client: CaptionClient) -> None:
    """One line on stderr when a run starts while its server is not answering.

    A server that is down or restarting is waited for (up to a minute by default) so a
    batch started during a restart goes ahead; a user who mistyped the URL is told why
    nothing happens, and how not to wait.
    """
    if client.retry_wait > 0:
        log.warning(
            "%s is not answering; retrying for up to %g s (--retries %d; 0 fails at once)",
            client.base_url, client.retry_wait, client.retries,
        )  # fmt: skip


def stream_one(item: InputItem, options: BatchOptions, ring: ClientRing) -> ExitCode:
    def show(piece: str) -> None:
        sys.stdout.write(piece)
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
    skipping = sum(1 for i in items if i.kind != "stdin" and i.source in done)
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
