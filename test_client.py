#!/usr/bin/env python3
"""Caption audio with the Qwen3-Omni Captioner service. `--help` for usage.

A thin face over the `captioner` package; README.md "The caption client" is its manual.
"""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main())
