"""Settings: the environment first, then the service's `config.env`.

The client reads the operator's configuration file the way the service scripts do
(lib/service_lib.sh `load_config`): `$CAPTIONER_CONFIG` or the kit's config.env,
`KEY=value` lines, values optionally in double quotes, and a variable set in the
environment wins. So an API key, PORT or MAX_NUM_SEQS set once for the service is
what the client uses too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CLIP = REPO_ROOT / "samples" / "sample.wav"

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("CAPTIONER_CONFIG") or REPO_ROOT / "config.env")


def read_config_file(path: Path) -> dict[str, str]:
    """The `KEY=value` lines of a config file; a missing or unreadable file is empty.

    Lines that aren't assignments are skipped: validating the file is the service
    scripts' job, and a client should not refuse to run over a typo in it.
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return values
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line.rstrip("\r"))
        if not match:
            continue
        value = match.group(2).rstrip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values[match.group(1)] = value
    return values


class Settings:
    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.config_file = config_file or config_path(self.environ)
        self.config = read_config_file(self.config_file)

    def get(self, name: str) -> str | None:
        """The environment's value if set (even empty, as the scripts do), else the file's."""
        if name in self.environ:
            return self.environ[name] or None
        return self.config.get(name) or None
