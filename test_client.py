#!/usr/bin/env python3
"""Caption audio with the Qwen3-Omni Captioner service. `--help` for usage.

A thin face over the `captioner` package; README.md "The caption client" is its manual.
"""

import os
import signal
import sys
import threading


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"captioner: error: interrupted\n")
    os._exit(130)


# Before the heavy imports (numpy, PyAV, requests: a second or more): a Ctrl-C while they
# load ends the run as one later does, exit 130 and one line, not a 25-line traceback.
signal.signal(signal.SIGINT, _interrupted)

try:
    from captioner.cli import main
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] == "captioner":
        raise
    # --help, --version and usage errors need none of the packages (options.py is standard
    # library only): they answer as always, and only a command that would run gets the hint.
    from captioner.options import build_parser

    build_parser().parse_args()
    sys.stderr.write(
        f"captioner: error: this Python ({sys.executable}) lacks the package {exc.name!r}; "
        "run the client with the kit's .venv/bin/python (./install.sh makes it), "
        "or: pip install requests av numpy tqdm\n"
    )
    sys.exit(1)

if __name__ == "__main__":
    code = main()
    if threading.active_count() > 1:
        # A request thread may still wait on a server that never answers (its records are
        # written, the batch is over): don't let the interpreter join it for minutes.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(code)
    sys.exit(code)
