"""The result record: one per input, the unit of output and of resume.

An input is shown by its `source` (the path as the user gave it, the URL, or `-`) and known by its
key (`input_key`): the real path of a file, the content hash of stdin, the URL. Two names of one
file are one input; two clips piped in are two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from captioner.errors import ExitCode


@dataclass
class Segment:
    start: float
    end: float
    caption: str

    def to_json(self) -> dict[str, Any]:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "caption": self.caption}


def input_key(source: str, path: str | None = None, sha256: str | None = None) -> str:
    """An input's identity, for resume and deduplication: a file's real path, stdin's content
    hash, else the source itself (a URL; or a record written before records named paths, whose
    source was the real path)."""
    if path:
        return path
    if sha256:
        return f"sha256:{sha256}"
    return source


@dataclass
class Record:
    """What one input produced. `error` is set (and captions empty) when it failed."""

    source: str
    path: str | None = None  # a file's real path (its identity); None for stdin and URLs
    sha256: str | None = None  # stdin's content hash (its identity)
    duration: float | None = None
    segments: list[Segment] = field(default_factory=list)
    caption: str = ""
    model: str | None = None
    usage: dict[str, int] | None = None
    latency: float = 0.0
    error: str | None = None
    # Not written out: the failure itself, and the exit code it maps to.
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    exit_code: ExitCode = ExitCode.OK

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> str:
        return input_key(self.source, self.path, self.sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": self.path,
            "sha256": self.sha256,
            "duration": None if self.duration is None else round(self.duration, 3),
            "segments": [s.to_json() for s in self.segments],
            "caption": self.caption,
            "model": self.model,
            "usage": self.usage,
            "latency": round(self.latency, 3),
            "error": self.error,
        }

    def to_line(self) -> str:
        """The record as one JSONL line, newline included. JSON escapes inner newlines; the other
        characters that some readers take for line ends (Python's `splitlines`, JavaScript) are
        escaped too, so any reader sees one line per record."""
        return json.dumps(self.to_json(), ensure_ascii=False).translate(JSON_ESCAPES) + "\n"


# JSON escapes the C0 controls (\n and \r among them) but leaves DEL and the C1 controls raw with
# ensure_ascii=False; escaped, they cannot drive a terminal (C1 0x9b is CSI on some). \x85 and
# U+2028/U+2029 are line ends to str.splitlines() and JavaScript: escaped, any reader sees one line
# per record. The escaped JSON is the same JSON value.
JSON_ESCAPES = {ord(c): f"\\u{ord(c):04x}" for c in [*map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"]}


def join_captions(segments: list[Segment]) -> str:
    return " ".join(s.caption.strip() for s in segments if s.caption.strip())
