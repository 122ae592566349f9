"""The result record: one per input, the unit of output and of resume."""

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


@dataclass
class Record:
    """What one input produced. `error` is set (and captions empty) when it failed."""

    source: str
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

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
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
        return json.dumps(self.to_json(), ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


# Besides \n and \r (which JSON escapes), what str.splitlines() and JavaScript also end a line at.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def join_captions(segments: list[Segment]) -> str:
    return " ".join(s.caption.strip() for s in segments if s.caption.strip())
