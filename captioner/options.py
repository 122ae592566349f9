"""The command line's options, their defaults and `--help`: standard library only.

test_client.py falls back on this module when the client's packages (requests, PyAV, numpy, tqdm)
are missing, so `--help` still prints the help and a usage error is still a usage error; only a
command that would run says which package is missing.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from captioner import __version__
from captioner.errors import exit_codes_text
from captioner.formats import FORMATS

DEFAULT_BASE_URL = "http://127.0.0.1:8003"
DEFAULT_CONCURRENCY = 8
MAX_WINDOW_SECONDS = 30.0  # the longest window by default: the model is at its best on 30 s or less
DEFAULT_SEGMENT_SECONDS = MAX_WINDOW_SECONDS
DEFAULT_RETRIES = 7
DEFAULT_BACKOFF = 0.5  # seconds: the pauses are 0, 1, 2, 4, ... (urllib3's formula)
BACKOFF_MAX = 30.0  # longest single pause
# A restarting server or a proxy in front of one: retried (api.py), then failed over (servers.py).
RETRY_STATUSES = (502, 503, 504)
RETRIED_HTTP = "HTTP " + "/".join(map(str, RETRY_STATUSES))
PROMPT_REFUSED = (
    "--prompt: the Captioner takes no text prompt; it describes the audio alone, "
    "so requests carry audio only (drop --prompt)"
)


def backoff_pauses(retries: int, backoff: float = DEFAULT_BACKOFF) -> list[float]:
    """The pause before each of `retries` retries: urllib3's formula (no pause before the first,
    then backoff x 2^(n-1), at most BACKOFF_MAX); api.retry_pauses asks urllib3 itself, and a test
    holds the two equal."""
    return [0.0 if n <= 1 else min(BACKOFF_MAX, backoff * 2 ** (n - 1)) for n in range(1, retries + 1)]


DEFAULT_WAIT = sum(backoff_pauses(DEFAULT_RETRIES))
WAIT_10 = sum(backoff_pauses(10))

DESCRIPTION = """\
Caption audio with the Qwen3-Omni Captioner service (vLLM, OpenAI-compatible API).

INPUT is a file, a folder (searched recursively for audio), - for stdin, or an
http(s) URL; several may be given. With no INPUT the sample clip is captioned.
"""

EPILOG = f"""\
defaults from the environment (CAPTIONER_* only there), then config.env (or $CAPTIONER_CONFIG),
then config.env.example:
  CAPTIONER_BASE_URL    server URL(s), space- or comma-separated; else
                        http://127.0.0.1:PORT with the service's PORT ({DEFAULT_BASE_URL})
  CAPTIONER_API_KEY     API key, else API_KEY as the service uses it
  CAPTIONER_CONCURRENCY requests in flight, else MAX_NUM_SEQS (the server's batch
                        size) times the number of servers, else {DEFAULT_CONCURRENCY}
  MAX_AUDIO_SECONDS     the server's audio cap: --segment-seconds defaults to it
                        where it is below {DEFAULT_SEGMENT_SECONDS:g}

retries: refused or dropped connections and {RETRIED_HTTP} are retried after
  pauses of 0, 1, 2, 4 ... s, each at most {BACKOFF_MAX:g} s (or the server's Retry-After),
  one line on stderr each: --retries {DEFAULT_RETRIES} (the default) waits up to \
{DEFAULT_WAIT:g} s in all,
  --retries 10 up to {WAIT_10:g} s (a GPU server loading the model may need it); a read
  timeout is not retried on the same server (with several, the request goes to another)

{textwrap.fill("exit codes: " + exit_codes_text(), 78)}
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
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
        help="write results to FILE instead of stdout; a stopped run's rerun skips inputs already "
        "done; .jsonl keeps every run's records (a rerun skips what it holds), other formats are "
        "rewritten for this run's inputs",
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
    p.add_argument(
        "--model",
        help="served model name (default: the first that /v1/models lists, asked of every server "
        "at once; given, nothing is asked)",
    )  # fmt: skip
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
        help="seconds to wait for an answer (default 300); a server that does not answer in "
        "time leaves the rotation like one that refuses",
    )  # fmt: skip
    p.add_argument(
        "--connect-timeout", type=positive_float, default=10.0, metavar="S",
        help="seconds to wait for a connection (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=non_negative_int, default=DEFAULT_RETRIES, metavar="N",
        help=f"retries on refused or dropped connections and {RETRIED_HTTP}, with "
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
