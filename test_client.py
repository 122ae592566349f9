#!/usr/bin/env python3
"""Caption audio with the Qwen3-Omni Captioner service. `--help` for usage.

A thin face over the `captioner` package; README.md "The caption client" is its manual.
"""

import os
import signal
import sys


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
    sys.stderr.write(
        f"captioner: error: this Python ({sys.executable}) lacks the package {exc.name!r}; "
        "run the client with the kit's .venv/bin/python (./install.sh makes it), "
        "or: pip install requests av numpy tqdm\n"
    )
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())
