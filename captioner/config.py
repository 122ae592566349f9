"""Settings: the environment first, then the service's `config.env`.

The client shares the operator's configuration file with the service scripts
(same precedence as theirs: a variable set in the environment wins), so an API key
or MAX_NUM_SEQS set once for the service is what the client uses too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = (REPO_ROOT / "config.env", REPO_ROOT / "config.env.local")
SAMPLE_CLIP = REPO_ROOT / "samples" / "sample.wav"

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_DEFAULT_EXPANSION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?-(.*)\}$")


def read_config_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines of a shell config file; `${NAME:-default}` yields the default.

    Only the plain forms the service's config.env uses; anything fancier is skipped
    rather than half-interpreted.
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return values
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if not match:
            continue
        name, value = match.group(1), match.group(2).strip()
        if value and value[0] in "\"'":
            quote = value[0]
            end = value.find(quote, 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = value.split(" #", 1)[0].strip()
        expansion = _DEFAULT_EXPANSION.match(value)
        if expansion:
            value = expansion.group(1)
        if "$" in value or "`" in value:
            continue
        values[name] = value
    return values


class Settings:
    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        config_files: tuple[Path, ...] = CONFIG_FILES,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.config: dict[str, str] = {}
        for path in config_files:  # later files override earlier ones
            self.config.update(read_config_file(path))

    def get(self, name: str, *, from_config: bool = True) -> str | None:
        value = self.environ.get(name)
        if value:
            return value
        if from_config:
            return self.config.get(name) or None
        return None
