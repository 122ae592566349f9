"""The caption page (web/): its static files and the client's constants, answered by the request
guard itself (request_guard.py) at GET / and /page/*, public, and never passed to vLLM."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PAGE_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
              ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
# Scripts, styles and fetches from this origin only, no inline script or style, nothing from
# elsewhere; blob: media for the player of a dropped file; no framing, no form posts.
PAGE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            b"connect-src 'self'; media-src blob:; base-uri 'none'; form-action 'none'; "
            b"frame-ancestors 'none'")
PAGE_HEADERS = [
    (b"content-security-policy", PAGE_CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"microphone=(self), camera=(), geolocation=()"),
    (b"cache-control", b"no-cache"),
]
PAGE_MAX_SECONDS = 3600  # longest audio the page decodes: 16 kHz float32 in a browser tab, 230 MB


def page_config(key_required: bool) -> dict[str, Any]:
    """What the page must share with the client, read from the client's own constants (one home):
    how audio is cut into windows (captioner/audio.py: the longest window, lowered to the server's
    MAX_AUDIO_SECONDS as the client lowers it) and when a request is retried (captioner/api.py)."""
    from captioner import api, audio

    max_audio = os.environ.get("VLLM_MAX_AUDIO_DECODE_DURATION_S")
    return {
        "sample_rate": audio.SAMPLE_RATE,
        "frame_seconds": audio.FRAME_SECONDS,
        "quiet_floor": audio.QUIET_FLOOR,
        "quiet_ratio": audio.QUIET_RATIO,
        "cut_search_seconds": audio.CUT_SEARCH_SECONDS,
        "cut_search_divisor": audio.CUT_SEARCH_DIVISOR,
        "max_window_seconds": audio.window_seconds(float(max_audio) if max_audio else None),
        "retry_statuses": [*api.RETRY_STATUSES, 429],
        "retry_pauses": api.retry_pauses(),
        "key_required": key_required,
        "page_max_seconds": PAGE_MAX_SECONDS,
    }


class Page:
    """The files of web/ (read once: a few KB) under / and /page/NAME, and /page/config.json."""

    def __init__(self, files: dict[str, tuple[bytes, bytes]]) -> None:
        self.files = files  # path -> (content type, body)

    @classmethod
    def load(cls, folder: Path, key_required: bool) -> Page:
        if not (folder / "index.html").is_file():
            return cls({})
        try:
            config = page_config(key_required)
        except ImportError as exc:  # a Python without the kit's client: the API still serves
            logging.getLogger("request_guard").warning(
                "request_guard: no caption page (%s); pip install -e %s", exc, folder.parent)
            return cls({})
        files = {"/page/config.json": (b"application/json", json.dumps(config).encode())}
        for path in sorted(folder.iterdir()):
            kind = PAGE_TYPES.get(path.suffix)
            if kind and path.is_file():
                files["/" if path.name == "index.html" else f"/page/{path.name}"] = (kind, path.read_bytes())
        return cls(files)

    async def serve(self, scope: Scope, send: Send) -> None:
        if scope["type"] != "http":  # a WebSocket upgrade: closed unaccepted, as the guard closes one
            await send({"type": "websocket.close", "code": 1008})
            return
        kind, body = self.files[scope["path"]]
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *PAGE_HEADERS],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})


