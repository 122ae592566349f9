"""The guard's settings, read in one place from the environment start_service.sh exports: the
kit's settings as CAPTIONER_<NAME> (captioner/config.py's GUARD_SETTINGS), and under vLLM's own
names those vLLM reads too (VLLM_API_KEY, VLLM_MAX_AUDIO_DECODE_*)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from captioner_server.request_policy import Limits

DEFAULT_FETCH_BYTES = 256 * 2**20
DEFAULT_REQUEST_TIMEOUT = 30.0


class GuardSettings(NamedTuple):
    max_bytes: int | None  # the request body cap (MAX_REQUEST_BYTES); None: no cap
    api_key: str | None
    extra_routes: list[str]
    allowed_hosts: list[str]
    media_domains: list[str]
    limits: Limits
    max_fetch_bytes: int  # a fetched clip is held whole, as an uploaded one is


def guard_settings(environ: Mapping[str, str], max_bytes: int | None = None, api_key: str | None = None,
                   extra_routes: str | None = None, allowed_hosts: str | None = None,
                   media_domains: str | None = None, limits: Limits | None = None) -> GuardSettings:
    """The settings in `environ`, each one given here taking its place."""
    def setting(given: str | None, name: str) -> list[str]:
        return split_list(environ.get(name) if given is None else given)

    if max_bytes is None:
        max_bytes = int(environ.get("CAPTIONER_MAX_REQUEST_BYTES") or 0)
    body_cap = max_bytes if max_bytes > 0 else None
    # A fetched clip's cap: the body cap, or vLLM's decode cap, whichever is lower.
    caps = [c for c in (body_cap, int(environ.get("VLLM_MAX_AUDIO_DECODE_BYTES") or 0)) if c]
    return GuardSettings(
        max_bytes=body_cap,
        api_key=environ.get("VLLM_API_KEY") if api_key is None else api_key,
        extra_routes=setting(extra_routes, "CAPTIONER_EXTRA_ROUTES"),
        allowed_hosts=setting(allowed_hosts, "CAPTIONER_ALLOWED_HOSTS"),
        media_domains=setting(media_domains, "CAPTIONER_ALLOWED_MEDIA_DOMAINS"),
        limits=limits_from_env(environ) if limits is None else limits,
        max_fetch_bytes=min(caps) if caps else DEFAULT_FETCH_BYTES,
    )


def request_timeout(environ: Mapping[str, str]) -> float:
    """REQUEST_TIMEOUT: how long the HTTP parser waits for an unfinished request (http_limits.py)."""
    return float(environ.get("CAPTIONER_REQUEST_TIMEOUT") or DEFAULT_REQUEST_TIMEOUT)


def split_list(value: str | None) -> list[str]:
    return [v.strip().lower() for v in (value or "").replace(" ", ",").split(",") if v.strip()]


def limits_from_env(environ: Mapping[str, str]) -> Limits:
    """What start_service.sh exports about the served model and the settings (request_policy)."""
    def number(name: str) -> int | None:
        value = environ.get(name, "")
        return int(value) if value.isdigit() else None

    return Limits(vocab_size=vocab_size(environ.get("CAPTIONER_MODEL_PATH")),
                  served_model=environ.get("CAPTIONER_SERVED_MODEL_NAME") or None,
                  max_tokens=number("CAPTIONER_MAX_TOKENS"), max_model_len=number("CAPTIONER_MAX_MODEL_LEN"),
                  max_audio_seconds=number("VLLM_MAX_AUDIO_DECODE_DURATION_S"))


def vocab_size(model_dir: str | None) -> int | None:
    """The vocabulary vLLM checks token ids against: the text model's (the thinker's) vocab_size."""
    if not model_dir:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    thinker = config.get("thinker_config", {})
    for part in (thinker.get("text_config", {}), config.get("text_config", {}), config):
        if isinstance(part, dict) and isinstance(part.get("vocab_size"), int):
            return int(part["vocab_size"])
    return None
