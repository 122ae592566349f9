"""The kit's settings: one schema, one parser, for the service scripts and the client.

config.env.example is the schema: every setting, its default, and the comment above it that
documents it. config.env holds only what the operator changed. A value comes from, lowest first:
the schema's default, the config file (`--config FILE`, else `$CAPTIONER_CONFIG`, else the kit's
config.env when there is one), the environment. Files are parsed, never executed: `KEY=value`
lines and `#` comments; a value may be wrapped in double quotes.

The scripts run this file with any python3 (standard library only):
    python3 captioner/config.py --shell [--config FILE] [--prog NAME]
prints every setting as a shell assignment to eval, and CONFIG_FILE (the file read, or empty),
or one line `NAME: what is wrong` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = REPO_ROOT / "config.env.example"
SAMPLE_CLIP = REPO_ROOT / "samples" / "sample.wav"

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_BLANK_OR_COMMENT = re.compile(r"^\s*(#.*)?$")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    doc: str  # the comment lines right above it in the schema, '# ' removed


def parse(path: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line number, name, value, comment lines right above) for each `KEY=value` line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(
            f"config file {path} not found or unreadable: create it from config.env.example"
        ) from None
    found: list[tuple[int, str, str, list[str]]] = []
    comments: list[str] = []
    for n, line in enumerate(text.split("\n"), 1):  # lines as bash reads them: \n ends a line
        line = line.rstrip("\r")
        if _BLANK_OR_COMMENT.match(line):
            stripped = line.strip()
            is_doc = stripped.startswith("#") and not stripped.startswith("# ---")
            comments = [*comments, stripped[1:].strip()] if is_doc else []
            continue
        match = _ASSIGNMENT.match(line)
        if not match:
            raise ConfigError(f"{path}:{n}: not a KEY=value line: {line}")
        value = match.group(2).rstrip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found.append((n, match.group(1), value, comments))
        comments = []
    return found


def schema(path: Path | None = None) -> dict[str, Setting]:
    """Every setting of config.env.example, in its order. Empty where the kit has no schema
    (the client package installed on its own)."""
    path = path or SCHEMA
    if not path.is_file():
        return {}
    return {name: Setting(name, value, " ".join(doc)) for _, name, value, doc in parse(path)}


def config_file(environ: Mapping[str, str], given: str | Path | None = None) -> Path | None:
    """The file to read: the one given, else $CAPTIONER_CONFIG, else config.env if it exists."""
    if given or environ.get("CAPTIONER_CONFIG"):
        return Path(given or environ["CAPTIONER_CONFIG"])
    default = REPO_ROOT / "config.env"
    return default if default.exists() else None


def load(environ: Mapping[str, str], given: str | Path | None = None) -> dict[str, str]:
    """Every setting's value: schema default < config file < environment."""
    known = schema()
    values = {name: s.default for name, s in known.items()}
    path = config_file(environ, given)
    if path is not None:
        for n, name, value, _ in parse(path):
            if known and name not in known:
                raise ConfigError(f"{path}:{n}: unknown variable {name} (known: see config.env.example)")
            values[name] = value
    values.update((name, environ[name]) for name in values if name in environ)
    return values


class Settings:
    """The client's view: a setting as the service sees it, and the client's own CAPTIONER_*
    variables from the environment. Empty counts as unset."""

    def __init__(self, environ: Mapping[str, str] | None = None, config: str | Path | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.values = load(self.environ, config)

    def get(self, name: str) -> str | None:
        value = self.values[name] if name in self.values else self.environ.get(name)
        return value or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the kit's settings as shell assignments.")
    ap.add_argument("--shell", action="store_true", required=True)
    ap.add_argument("--config", help="the config file (default: $CAPTIONER_CONFIG, else config.env)")
    ap.add_argument("--prog", default="config", help="prefix of the error line")
    args = ap.parse_args(argv)
    try:
        values = load(os.environ, args.config)
    except ConfigError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return 1
    values["CONFIG_FILE"] = str(config_file(os.environ, args.config) or "")
    print("".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
