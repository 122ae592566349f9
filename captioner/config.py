"""The kit's settings: one schema, one parser, for the service scripts and the client.

config.env.example is the schema: every setting, its default, the comment above it that documents
it, and that comment's last line, its rule (`# type: ...`, the form is described at the top of
config.env.example; Rule parses it). config.env holds only what the operator changed. A value comes
from, lowest first: the schema's default, the config file (`--config FILE`, else
`$CAPTIONER_CONFIG`, else the kit's config.env when there is one), the environment. Files are
parsed, never executed: `KEY=value` lines and `#` comments; a value may be wrapped in double quotes.

The scripts run this file with any python3 (standard library only):
    python3 captioner/config.py --shell [--config FILE] [--prog NAME] [--derived] [--check NAME...|ALL]
prints every setting as a shell assignment to eval, and CONFIG_FILE (the file read, or empty);
--derived adds what the scripts use besides (absolute paths, the URLs, the guard's environment:
derive); --check validates the settings named (ALL: every one) first. A bad file or value is one
line `NAME: what is wrong` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = REPO_ROOT / "config.env.example"
SAMPLE_CLIP = REPO_ROOT / "samples" / "sample.wav"
# The kit's folder as the scripts name it (symlinks kept): relative paths are taken from it.
KIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_BLANK_OR_COMMENT = re.compile(r"^\s*(#.*)?$")
_RULE_PREFIX = "type:"

# Rules between two settings, checked after the setting's own rule: (operator, the other setting,
# what a bad value is told; {other} is the other's value). Validating the setting validates the
# other one first.
CROSS_RULES: dict[str, tuple[str, str, str]] = {
    "MAX_TOKENS": ("<", "MAX_MODEL_LEN", "must be below MAX_MODEL_LEN ({other}): the prompt needs room"),
    "STOP_TIMEOUT": (
        ">",
        "SHUTDOWN_DRAIN",
        "must exceed SHUTDOWN_DRAIN ({other} s), or in-flight requests are killed mid-drain",
    ),
}

# The settings the request guard (captioner_server/, in vLLM's process) reads, each as CAPTIONER_<NAME> (a
# path made absolute). Those vLLM reads too reach the guard under vLLM's one name instead
# (VLLM_API_KEY, VLLM_MAX_AUDIO_DECODE_*: start_service.sh), so each has one name there.
GUARD_SETTINGS = (
    "MODEL_PATH",
    "SERVED_MODEL_NAME",
    "MAX_MODEL_LEN",
    "MAX_TOKENS",
    "ALLOWED_MEDIA_DOMAINS",
    "MAX_REQUEST_BYTES",
    "ALLOWED_HOSTS",
    "EXTRA_ROUTES",
    "REQUEST_TIMEOUT",
)
GUARD_PREFIX = "CAPTIONER_"


class ConfigError(Exception):
    """A config file, or a value, that cannot be used; the message names the file and line, or the
    setting."""


class ConfigUnreadable(ConfigError):
    """A config file this account may not read (another account's config.env, kept to itself as
    the README says when it holds API_KEY)."""


_FLOAT = re.compile(r"[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?")
# A number as JSON writes it: the sampling settings go into vLLM's --override-generation-config.
_JSON_NUMBER = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_FLOAT_RANGE = re.compile(r"(-?[0-9.]+)(<=?)x(<=?)(-?[0-9.]+)")
_INT_RANGE = re.compile(r"(-?[0-9]+)\.\.(-?[0-9]+)?")
_SOCKET = re.compile(r"[A-Za-z0-9/_.-]+")
PATH_KINDS = ("path", "dir", "socket")  # relative to the kit; the scripts get NAME_ABS as well


@dataclass(frozen=True)
class Rule:
    """One `# type: [ALT or ]... KIND [ARG] [-- TEXT]` line of the schema (see its header)."""

    kind: str
    arg: str
    alternatives: tuple[str, ...]
    text: str | None

    @classmethod
    def parse(cls, line: str) -> Rule:
        body, _, text = line.partition(" -- ")
        words = body.split(None, 1)
        alternatives: list[str] = []
        while len(words) == 2 and words[1].startswith("or "):
            alternatives.append("" if words[0] == "empty" else words[0])
            words = words[1][3:].split(None, 1)
        kind, arg = words[0] if words else "", words[1].strip() if len(words) > 1 else ""
        rule = cls(kind, arg, tuple(alternatives), text.strip() or None)
        rule.check("\0", "\0")  # an unknown kind or a malformed range fails here, not on a user's value
        return rule

    def check(self, value: str, absolute: str) -> str | None:
        """None when VALUE is allowed, else what the operator is told (the value made absolute,
        for the path kinds)."""
        if value in self.alternatives:
            return None
        kind, arg = self.kind, self.arg
        if kind in ("int", "float") and _FLOAT.fullmatch(value) and not _JSON_NUMBER.fullmatch(value):
            written = str(int(value)) if kind == "int" and value.isdigit() else str(float(value))
            return f"write it as {written} (no leading zero or bare point: it goes into JSON)"
        if kind == "int":
            low, high = _match(_INT_RANGE, arg, "int MIN..[MAX]").groups()
            told = f"expected an integer from {low} to {high}" if high else f"expected an integer >= {low}"
            ok = (
                value.isascii()
                and value.isdigit()
                and int(low) <= int(value)
                and (high is None or int(value) <= int(high))
            )
        elif kind == "float":
            low, low_op, high_op, high = _match(_FLOAT_RANGE, arg, "float LO<x<=HI").groups()
            told = f"a number, {low} {low_op} x {high_op} {high}"
            x = float(value) if _FLOAT.fullmatch(value) else None
            ok = (
                x is not None
                and (float(low) < x if low_op == "<" else float(low) <= x)
                and (x < float(high) if high_op == "<" else x <= float(high))
            )
        elif kind == "enum":
            choices = arg.split("|")
            told, ok = f"expected one of: {' '.join(choices)}", value in choices
        elif kind == "regex":
            told, ok = f"must match {arg}", re.fullmatch(arg, value) is not None
        elif kind == "text":
            told, ok = "printable characters only", value.isprintable()
        elif kind == "path":
            told, ok = "must name a file or folder", value != "" and value.isprintable()
        elif kind == "dir":
            told = f"no such folder ({absolute})"
            ok = value != "" and os.path.isdir(absolute)
            if self.text:
                return None if ok else f"{told}: {self.text}"
        elif kind == "socket":
            told = "a socket path of letters, digits and / _ . - (under 100 characters in all)"
            ok = _SOCKET.fullmatch(value) is not None and len(absolute) < 100
        else:
            raise ValueError(f"unknown kind {kind!r} (int, float, enum, regex, text, path, dir, socket)")
        return None if ok else self.text or told


def _match(pattern: re.Pattern[str], arg: str, form: str) -> re.Match[str]:
    match = pattern.fullmatch(arg)
    if not match:
        raise ValueError(f"{arg!r} is not of the form {form}")
    return match


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    doc: str  # the comment lines right above it in the schema, '# ' removed, its rule line left out
    rule: Rule | None = None  # its `# type:` line; None where it has none (tests/test_config.py)


def parse(path: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line number, name, value, comment lines right above) for each `KEY=value` line."""
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigUnreadable(f"config file {path} cannot be read by this account") from None
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
            # Up to the '=' only: the rest may be a secret (`export API_KEY=...`).
            name, equals, _ = line.partition("=")
            shown = f": {name}=…" if equals else " (it has no '='; not shown, as it may be a secret)"
            raise ConfigError(f"{path}:{n}: not a KEY=value line{shown}")
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
    settings = {}
    for n, name, value, comments in parse(path):
        rule = None
        if comments and comments[-1].startswith(_RULE_PREFIX):
            try:
                rule = Rule.parse(comments[-1][len(_RULE_PREFIX) :].strip())
            except (ValueError, re.error) as exc:
                raise ConfigError(f"{path}:{n - 1}: the rule of {name}: {exc}") from None
            comments = comments[:-1]
        settings[name] = Setting(name, value, " ".join(comments), rule)
    return settings


def config_file(environ: Mapping[str, str], given: str | Path | None = None) -> Path | None:
    """The file to read: the one given, else $CAPTIONER_CONFIG, else config.env if it exists."""
    if given or environ.get("CAPTIONER_CONFIG"):
        return Path(given or environ["CAPTIONER_CONFIG"])
    default = REPO_ROOT / "config.env"
    return default if default.exists() else None


def load(
    environ: Mapping[str, str], given: str | Path | None = None, only: Iterable[str] | None = None
) -> dict[str, str]:
    """Every setting's value: schema default < config file < environment. A line naming no
    setting, or whose value a shell would have read otherwise (`shell_habit`), is a ConfigError;
    with `only` (what stop and status use), only for those settings: a mistake elsewhere is
    start's to refuse and never blocks them."""
    known = schema()
    values = {name: s.default for name, s in known.items()}
    path = config_file(environ, given)
    wanted = None if only is None else set(only)
    if path is not None:
        for n, name, value, _ in parse(path):
            if wanted is not None and name not in wanted:
                if name in known:
                    values[name] = value
                continue
            if known and name not in known:
                raise ConfigError(f"{path}:{n}: unknown variable {name} (known: see config.env.example)")
            rule = known[name].rule if name in known else None
            problem = shell_habit(value, path_kind=rule is not None and rule.kind in PATH_KINDS)
            if problem:
                raise ConfigError(f"{path}:{n}: {name}: {problem} (the file is read, not run by a shell)")
            values[name] = value
    values.update((name, environ[name]) for name in values if name in environ)
    return values


def shell_habit(value: str, path_kind: bool) -> str | None:
    """What in a config file's value a shell would have changed and this reader keeps as it is:
    single quotes, a comment after the value, and in a path `~`, `$VAR` or a backquote."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return "single quotes would stay part of the value: use double quotes or none"
    if re.search(r"\s#", value):
        return "a comment after the value would be part of it: put it on a line of its own"
    if path_kind and (value.startswith("~") or "$" in value or "`" in value):
        return "~, $VARIABLE and backquotes are not expanded: write the path out"
    return None


def absolute(path: str) -> str:
    """PATH from the kit's folder, as the scripts spell it (no normalising); empty stays empty."""
    return path if not path or path.startswith("/") else f"{KIT_ROOT}/{path}"


def validate(values: Mapping[str, str], names: Iterable[str] | None = None) -> None:
    """The rules of the settings named (None: every one), in the schema's order, a setting that a
    cross rule reads before the one that reads it. The first bad value raises ConfigError
    `NAME="value" is invalid: what is allowed`."""
    known = schema()
    wanted = set(known if names is None else names)
    unknown = wanted - set(known)
    if unknown:
        raise ConfigError(f"no such setting: {', '.join(sorted(unknown))} (known: see config.env.example)")
    wanted |= {CROSS_RULES[name][1] for name in wanted if name in CROSS_RULES}
    for name in (n for n in known if n in wanted):
        rule, value = known[name].rule, values[name]
        if rule is None:
            raise ConfigError(f"{name} has no rule: give it a '# type: ...' line in config.env.example")
        told = rule.check(value, absolute(value) if rule.kind in PATH_KINDS else value)
        if told is None and name in CROSS_RULES:
            op, other, text = CROSS_RULES[name]
            a, b = int(value), int(values[other])
            told = None if (a < b if op == "<" else a > b) else text.format(other=values[other])
        if told is not None:
            raise ConfigError(f'{name}="{value}" is invalid: {told}')


def derive(values: Mapping[str, str]) -> dict[str, str | list[str]]:
    """What the scripts use besides the settings: NAME_ABS of every path setting, the PID, lock and
    log files, where the scripts reach the server (BASE_URL what they print, HTTP_URL and
    CURL_SOCKET what curl gets), and GUARD_ENV, the guard's environment (NAME=value items)."""
    known = schema()
    out: dict[str, str | list[str]] = {
        f"{name}_ABS": absolute(values[name])
        for name, s in known.items()
        if s.rule is not None and s.rule.kind in PATH_KINDS
    }
    out["PID_FILE_ABS"] = absolute(values["PID_FILE"] or f"{values['LOG_DIR']}/service.pid")
    out["LOCK_FILE"] = f"{out['PID_FILE_ABS']}.lock"
    out["LOG_FILE"] = f"{out['LOG_DIR_ABS']}/service.log"
    host = values["HOST"]  # clients on this host use 127.0.0.1 whatever address the server binds
    if host in ("0.0.0.0", "127.0.0.1", "localhost", ""):
        host = "127.0.0.1"
    elif host in ("::", "::1"):
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    out["HEALTH_HOST"] = host
    socket = out["UNIX_SOCKET_ABS"]
    # With a socket the server listens on that socket alone (no TCP port), and curl goes through it.
    out["BASE_URL"] = f"unix:{socket}" if socket else f"http://{host}:{values['PORT']}"
    out["HTTP_URL"] = "http://localhost" if socket else f"http://{host}:{values['PORT']}"
    out["CURL_SOCKET"] = ["--unix-socket", str(socket)] if socket else []
    guard = {name: str(out.get(f"{name}_ABS", values[name])) for name in GUARD_SETTINGS}
    if host not in ("127.0.0.1", "[::1]"):  # bound to one address: clients name it in their Host header
        guard["ALLOWED_HOSTS"] = ",".join(h for h in (values["ALLOWED_HOSTS"], values["HOST"]) if h)
    out["GUARD_ENV"] = [f"{GUARD_PREFIX}{name}={value}" for name, value in guard.items()]
    return out


class Settings:
    """The client's view: a setting as the service sees it, and the client's own CAPTIONER_*
    variables from the environment. Empty counts as unset."""

    def __init__(self, environ: Mapping[str, str] | None = None, config: str | Path | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.values = load(self.environ, config)

    def get(self, name: str) -> str | None:
        value = self.values[name] if name in self.values else self.environ.get(name)
        return value or None


def shell(name: str, value: str | list[str]) -> str:
    """NAME=value as bash reads it back; a list is an array."""
    if isinstance(value, list):
        return f"{name}=({' '.join(shlex.quote(v) for v in value)})\n"
    return f"{name}={shlex.quote(value)}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the kit's settings as shell assignments.")
    ap.add_argument("--shell", action="store_true", required=True)
    ap.add_argument("--config", help="the config file (default: $CAPTIONER_CONFIG, else config.env)")
    ap.add_argument("--prog", default="config", help="prefix of the error line")
    ap.add_argument("--derived", action="store_true", help="print the derived values too (derive)")
    ap.add_argument(
        "--check", nargs="+", metavar="NAME", help="validate these settings first (ALL: every one)"
    )
    args = ap.parse_args(argv)
    try:
        subset = args.check if args.check and args.check != ["ALL"] else None
        values = load(os.environ, args.config, only=subset)
        if args.check:
            validate(values, None if args.check == ["ALL"] else args.check)
        derived = derive(values) if args.derived else {}
    except ConfigError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return 1
    values["CONFIG_FILE"] = str(config_file(os.environ, args.config) or "")
    print("".join(shell(name, value) for name, value in {**values, **derived}.items()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
