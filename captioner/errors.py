"""Exit codes and the domain errors that carry them.

Every failure the client knows about is a `CaptionerError` subclass with a one-line
message fit for an operator; `exit_code_for` is the only place that turns an
exception into a process exit status.

vLLM (0.32) answers some client mistakes with HTTP 500: audio it cannot decode
("Error opening <_io.BytesIO object>: ... Malformed 'fmt ' chunk."), a file:// URL
("Cannot load local files without --allowed-local-media-path"). Those, told apart
by vLLM's message (`api.BAD_INPUT_500`), exit 6 like the 400 vLLM gives other
undecodable audio: the server refused the input, and a retry or a look at the
server will not help. Every other 5xx exits 7.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The client's exit statuses, each with its meaning: `--help` lists them from here."""

    meaning: str

    def __new__(cls, value: int, meaning: str = "") -> ExitCode:  # ExitCode(3): the member, as ever
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "ok"
    FAILURES = 1, "some inputs failed"  # of a batch (or an unexpected error)
    USAGE = 2, "usage"  # bad command line (same code argparse uses)
    INPUT = 3, "input unreadable"  # a file, stdin or URL download could not be read or decoded
    CONNECTION = 4, "cannot connect"  # to the caption server
    TIMEOUT = 5, "timeout"  # the caption server did not answer in time
    HTTP_4XX = 6, "server refused (4xx, or vLLM's 500 for unusable input)"  # bad key, bad audio
    HTTP_5XX = 7, "server error (other 5xx)"
    INTERRUPTED = 130, "Ctrl-C"  # 128 + SIGINT like a shell


def exit_codes_text() -> str:
    """`0 ok, 1 some inputs failed, ...`: every exit code and its meaning, for `--help`."""
    return ", ".join(f"{code.value} {code.meaning}" for code in ExitCode)


class CaptionerError(Exception):
    """Base of the client's errors: a one-line message plus an exit code."""

    exit_code: ExitCode = ExitCode.FAILURES

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CaptionerError):
    exit_code = ExitCode.USAGE


class InputError(CaptionerError):
    exit_code = ExitCode.INPUT


class ServerConnectionError(CaptionerError):
    exit_code = ExitCode.CONNECTION


class ServerTimeoutError(CaptionerError):
    exit_code = ExitCode.TIMEOUT


class ServerHTTPError(CaptionerError):
    """The server answered with an HTTP error status; `message` holds its own words."""

    def __init__(self, status: int, message: str, bad_input: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.bad_input = bad_input  # a 5xx that vLLM gives for a client's mistake
        server_failed = status >= 500 and not bad_input
        self.exit_code = ExitCode.HTTP_5XX if server_failed else ExitCode.HTTP_4XX


def exit_code_for(exc: BaseException) -> ExitCode:
    """The process exit status for an exception (the one mapping in the package)."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return ExitCode.OK  # stdout closed early (`| head -1`): the reader has what it wanted
    if isinstance(exc, CaptionerError):
        return ExitCode(exc.exit_code)
    return ExitCode.FAILURES


def is_fatal(exc: BaseException) -> bool:
    """Errors that would fail every remaining input of a batch the same way.

    An unreachable server or a rejected API key is not about one file, so a batch
    stops instead of grinding through the rest (a rerun resumes it).
    """
    if isinstance(exc, ServerConnectionError):
        return True
    return isinstance(exc, ServerHTTPError) and exc.status in (401, 403)
