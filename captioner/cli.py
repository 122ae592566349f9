"""Command line: `python test_client.py [INPUT ...]`.

The only module that prints and picks exit codes; everything it calls raises domain
errors or returns records.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from captioner import __version__
from captioner.api import (
    BACKOFF_MAX,
    DEFAULT_BACKOFF,
    DEFAULT_BASE_URL,
    DEFAULT_RETRIES,
    RETRY_STATUSES,
    CaptionClient,
    retry_wait,
)
from captioner.batch import (
    BatchOptions,
    ClientRing,
    JsonlWriter,
    Summary,
    load_finished,
    process_item,
    run_batch,
)
from captioner.config import SAMPLE_CLIP, Settings
from captioner.errors import (
    CaptionerError,
    ExitCode,
    InputError,
    ServerConnectionError,
    ServerHTTPError,
    UsageError,
    exit_code_for,
)
from captioner.formats import (
    FORMAT_BY_EXTENSION,
    FORMATS,
    SUBTITLE_FORMATS,
    render,
    render_text,
)
from captioner.inputs import InputItem, resolve_inputs
from captioner.records import Record

log = logging.getLogger("captioner")

DEFAULT_CONCURRENCY = 8
DEFAULT_SEGMENT_SECONDS = 30.0
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
defaults from the environment, then config.env (or $CAPTIONER_CONFIG):
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
        except Exception:  # noqa: BLE001 - logging must never raise
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        return int(run(args))
    except KeyboardInterrupt:
        log.error("interrupted")
        if threading.active_count() > 1:
            # Worker threads may sit in a socket read for minutes and the interpreter
            # would join them before exiting. Every record written is already fsynced.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(ExitCode.INTERRUPTED)
        return ExitCode.INTERRUPTED
    except CaptionerError as exc:
        log.error("%s", exc, exc_info=args.debug)
        return exit_code_for(exc)
    except BrokenPipeError:
        # stdout closed early (`| head`): not an error worth a message. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FAILURES
    except Exception as exc:  # the one place unexpected errors end up
        log.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=args.debug)
        if not args.debug:
            log.error("rerun with --debug for the traceback")
        return exit_code_for(exc)


def run(args: argparse.Namespace) -> ExitCode:
    if args.prompt is not None:
        raise UsageError(PROMPT_REFUSED)
    fmt = choose_format(args)
    settings = Settings()
    if args.inputs:
        items = resolve_inputs(args.inputs)
    else:
        if not SAMPLE_CLIP.exists():
            raise InputError(f"no INPUT given and the sample clip {SAMPLE_CLIP} is missing")
        items = resolve_inputs([str(SAMPLE_CLIP)])
    check_combinations(args, fmt, items)

    base_urls = choose_base_urls(args, settings)
    api_key = args.api_key or settings.get("CAPTIONER_API_KEY") or settings.get("API_KEY")
    concurrency = choose_concurrency(args, settings, len(base_urls))
    clients = [
        CaptionClient(
            url,
            api_key,
            connect_timeout=args.connect_timeout,
            read_timeout=args.timeout,
            retries=max(args.retries, 0),
            backoff=DEFAULT_BACKOFF,
            pool_size=concurrency,
        )
        for url in base_urls
    ]
    model = choose_model(args.model, clients)
    options = BatchOptions(
        model=model,
        segment_seconds=choose_segment_seconds(args, settings),
        max_tokens=args.max_tokens,
        concurrency=concurrency,
        server_fetch=args.server_fetch,
    )
    ring = ClientRing(clients)
    if args.stream:
        return stream_one(items[0], options, ring)
    return run_many(items, options, ring, fmt, args.output)


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
    urls = [u.rstrip("/") for u in urls if u] or [default]
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
        if cap > 0:
            return min(DEFAULT_SEGMENT_SECONDS, cap)
    return DEFAULT_SEGMENT_SECONDS


def choose_model(requested: str | None, clients: list[CaptionClient]) -> str:
    """The model to ask for; also the check that every server answers and accepts the key."""
    model = requested
    for client in clients:
        served = list_models_saying_when_waiting(client)
        if not served:
            raise UsageError(f"{client.base_url} serves no model")
        if model is None:
            model = served[0]
        elif model not in served:
            raise UsageError(
                f"--model {model}: not served by {client.base_url} (it serves {', '.join(served)})"
            )
    assert model is not None
    log.debug("model %s on %s", model, ", ".join(c.base_url for c in clients))
    return model


def list_models_saying_when_waiting(client: CaptionClient) -> list[str]:
    """`client.list_models()`, with one line on stderr before the retries wait a while.

    A server that is down or restarting is waited for (up to a minute by default) so a
    batch started during a restart goes ahead; a user who mistyped the URL is told why
    nothing happens, and how not to wait.
    """
    try:
        return client.list_models(retry=False)
    except (ServerConnectionError, ServerHTTPError) as exc:
        retryable = isinstance(exc, ServerConnectionError) or exc.status in RETRY_STATUSES
        if not retryable or client.retries == 0:
            raise
        if client.retry_wait > 0:
            log.warning(
                "%s is not answering; retrying for up to %g s (--retries %d; 0 fails at once)",
                client.base_url, client.retry_wait, client.retries,
            )  # fmt: skip
    return client.list_models()


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
    message = record.error or "failed"
    if record.source != "-" and not message.startswith(record.source):
        message = f"{record.source}: {message}"
    log.error("%s", message, exc_info=_debug_exc_info(record))


def _debug_exc_info(record: Record) -> Any:
    if log.isEnabledFor(logging.DEBUG) and record.exception is not None:
        exc = record.exception
        return (type(exc), exc, exc.__traceback__)
    return None


class Output:
    """Where records go: streamed (jsonl, text to stdout) or rendered at the end."""

    def __init__(self, fmt: str, path: Path | None, many: bool) -> None:
        self.fmt, self.path, self.many = fmt, path, many
        self.records: list[Record] = []
        self.writer = JsonlWriter(path) if (fmt == "jsonl" and path is not None) else None
        self.streaming = self.writer is not None or (path is None and fmt in ("jsonl", "text"))
        self._printed = 0

    def add(self, record: Record) -> None:
        if self.writer is not None:
            self.writer.write(record)
        elif self.streaming:
            self._print(record)
        else:
            self.records.append(record)

    def _print(self, record: Record) -> None:
        if self.fmt == "jsonl":
            text = record.to_line()
        else:
            text = render_text([record], self.many)
            if text and self._printed:
                text = "\n" + text
        if text:
            self._printed += 1
            sys.stdout.write(text)
            sys.stdout.flush()

    def finish(self, order: list[str]) -> None:
        if self.writer is not None:
            self.writer.close()
            return
        if self.streaming:
            return
        position = {source: i for i, source in enumerate(order)}
        self.records.sort(key=lambda r: position.get(r.source, len(order)))
        if self.fmt in SUBTITLE_FORMATS and not any(r.ok for r in self.records):
            return  # the failure is reported; an empty subtitle file helps nobody
        text = render(self.records, self.fmt, self.many)
        if self.path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_file(self.path, text)


def write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def run_many(
    items: list[InputItem],
    options: BatchOptions,
    ring: ClientRing,
    fmt: str,
    output_path: Path | None,
) -> ExitCode:
    many = len(items) > 1
    done: set[str] = set()
    if fmt == "jsonl" and output_path is not None:
        resume = load_finished(output_path)
        done = resume.done
        if resume.dropped_partial:
            log.warning("%s: dropped a torn last line left by an interrupted run", output_path)
        if resume.dropped_failed:
            log.info("%s: retrying %d failed inputs", output_path, resume.dropped_failed)
        if resume.dropped_duplicates:
            log.warning("%s: dropped %d duplicate records", output_path, resume.dropped_duplicates)
    try:
        output = Output(fmt, output_path, many)
    except OSError as exc:
        raise UsageError(f"{output_path}: cannot write: {exc.strerror}") from exc
    skipping = sum(1 for i in items if i.kind != "stdin" and i.source in done)
    if skipping:
        log.info("resuming: %d of %d inputs already in %s", skipping, len(items), output_path)
    progress = tqdm(
        total=len(items) - skipping,
        unit="file",
        file=sys.stderr,
        disable=None if many else True,  # None: off when stderr is not a terminal
        dynamic_ncols=True,
    )

    def on_record(record: Record) -> None:
        output.add(record)
        if not record.ok:
            report_failure(record)
        progress.update(1)

    try:
        summary = run_batch(items, options, ring, on_record, skip=done)
    finally:
        progress.close()
    output.finish([i.source for i in items])
    report_summary(summary, many or output_path is not None, output_path, fmt)
    return summary.exit_code()


def report_summary(summary: Summary, show: bool, output_path: Path | None, fmt: str) -> None:
    # The fatal error's message was already logged with the input it failed.
    if summary.aborted is not None and summary.not_run > 0:
        resumable = fmt == "jsonl" and output_path is not None
        hint = "; rerun the same command to resume" if resumable else ""
        log.error("batch stopped: %d inputs not run%s", summary.not_run, hint)
    if show:
        log.info("%s", summary.line())
