"""What the client runs with: each setting from the command line, else the environment and the
kit's config (`config.Settings`), else a default.

config.py parses the files (the one parser, standard library only, which the shell scripts run
too); this module turns its values and the flags into the client's settings, or a `UsageError`.
None of it asks a server anything: which model to ask for is the servers' start-up check
(`servers.first_model`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from captioner.api import normalize_base_url
from captioner.audio import window_seconds
from captioner.config import ConfigError, ConfigUnreadable, Settings, validate
from captioner.errors import UsageError
from captioner.formats import FORMAT_BY_EXTENSION
from captioner.options import DEFAULT_BASE_URL, DEFAULT_CONCURRENCY

log = logging.getLogger("captioner")


def load_settings() -> Settings:
    """The environment and the kit's config, or a `UsageError` that names the file and line. A
    config this account may not read (a colleague's service on a shared host) is left out with a
    warning: the flags and the environment still work."""
    try:
        return Settings()
    except ConfigUnreadable as exc:
        log.warning(f"{exc}: its settings are not used (give --base-url, and --api-key if it needs one)")
        return Settings(config=os.devnull)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def checked(settings: Settings, name: str) -> str | None:
    """A setting of the service's, validated by its rule in config.env.example as start_service.sh
    checks it (`UsageError`, the scripts' one line); None when unset."""
    value = settings.get(name)
    if value and name in settings.values:
        try:
            validate(settings.values, [name])
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return value


def choose_format(given: str | None, output: Path | None) -> str:
    """--format, else the extension of --output, else text."""
    if given:
        return given
    if output is not None:
        return FORMAT_BY_EXTENSION.get(output.suffix.lower(), "text")
    return "text"


def choose_base_urls(given: Sequence[str] | None, settings: Settings) -> list[str]:
    """--base-url, else CAPTIONER_BASE_URL, else this host at the service's PORT."""
    urls = given or re.split(r"[\s,]+", settings.get("CAPTIONER_BASE_URL") or "")
    urls = [normalize_base_url(u) for u in urls if u]
    if not urls:
        port = checked(settings, "PORT")
        urls = [f"http://127.0.0.1:{port}" if port and port.isdigit() else DEFAULT_BASE_URL]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url {url}: expected http://HOST:PORT")
    return list(dict.fromkeys(urls))


def choose_api_key(given: str | None, settings: Settings) -> str | None:
    """--api-key, else CAPTIONER_API_KEY, else the service's own API_KEY; `UsageError` for one that
    cannot be an HTTP header's value (printable ASCII, no spaces: a trailing CR of a Windows file
    would otherwise end up in an error message, key and all)."""
    for name, key in (("--api-key", given), ("CAPTIONER_API_KEY", settings.get("CAPTIONER_API_KEY")),
                      ("API_KEY", settings.get("API_KEY"))):
        if key:
            if not re.fullmatch(r"[!-~]+", key):
                raise UsageError(f"{name}: the API key holds a space or a control character "
                                 "(a line end copied from a file?); give the key alone")
            return key
    return None


def choose_concurrency(given: int | None, settings: Settings, servers: int) -> int:
    """--concurrency, else CAPTIONER_CONCURRENCY, else MAX_NUM_SEQS per server, else 8.

    MAX_NUM_SEQS is how many sequences the server batches at once: fewer requests in
    flight leave its batch slots idle, more only wait in its queue. The server does
    not publish it (its metrics show running requests, not the cap), so it is read
    from the shared configuration.
    """
    if given:
        return int(given)
    for name, scale in (("CAPTIONER_CONCURRENCY", 1), ("MAX_NUM_SEQS", servers)):
        value = checked(settings, name)
        if value:
            try:
                number = int(value)
            except ValueError:
                raise UsageError(f"{name}={value}: expected a whole number") from None
            if number >= 1:
                return number * scale
    return DEFAULT_CONCURRENCY * servers


def choose_segment_seconds(given: float | None, settings: Settings) -> float:
    """--segment-seconds, else 30 s, or MAX_AUDIO_SECONDS where that is lower.

    The server refuses audio longer than MAX_AUDIO_SECONDS, so windows longer than
    that would all be refused. Read from the shared configuration, like MAX_NUM_SEQS.
    """
    if given:
        return float(given)
    value = checked(settings, "MAX_AUDIO_SECONDS")
    if value:
        try:
            cap = float(value)
        except ValueError:
            raise UsageError(f"MAX_AUDIO_SECONDS={value}: expected a number of seconds") from None
        return window_seconds(cap)
    return window_seconds(None)
