"""Render records as text, json, jsonl, srt or vtt."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from captioner.records import Record

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls except \t and \n

FORMATS = ("text", "json", "jsonl", "srt", "vtt")
SUBTITLE_FORMATS = ("srt", "vtt")
# --output FILE's extension picks the format when --format is not given.
FORMAT_BY_EXTENSION = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".srt": "srt",
    ".vtt": "vtt",
}


def render(records: Sequence[Record], fmt: str, many: bool) -> str:
    """The whole output for `records`; `many` when the run had several inputs."""
    if fmt == "text":
        return render_text(records, many)
    if fmt == "json":
        return render_json(records, many)
    if fmt == "jsonl":
        return "".join(r.to_line() for r in records)
    if fmt in SUBTITLE_FORMATS:
        if len(records) != 1:
            raise ValueError(f"{fmt} renders one input, got {len(records)}")
        return render_srt(records[0]) if fmt == "srt" else render_vtt(records[0])
    raise ValueError(f"unknown format {fmt!r}")


def render_text(records: Sequence[Record], many: bool) -> str:
    """Captions for a person: just the caption, or a `# source` header per input.

    Failed inputs are left out; their errors go to stderr.
    """
    ok = [r for r in records if r.ok]
    if not many:
        return "".join(r.caption.strip() + "\n" for r in ok)
    return "\n".join(f"# {r.source}\n{r.caption.strip()}\n" for r in ok)


def render_json(records: Sequence[Record], many: bool) -> str:
    """One JSON document: an object for one input, an array for several."""
    if not many and len(records) == 1:
        return json.dumps(records[0].to_json(), ensure_ascii=False, indent=2) + "\n"
    return json.dumps([r.to_json() for r in records], ensure_ascii=False, indent=2) + "\n"


def timestamp(seconds: float, decimal: str) -> str:
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def cue_text(caption: str) -> str:
    """Caption text safe inside a cue: no blank lines (they end a cue), no arrow.

    Control characters go too: a stray carriage return reads as a line break, and
    so as the blank line that ends the cue, in some players.
    """
    text = re.sub("\r\n?|[\x85\u2028\u2029]", "\n", caption)
    text = _CONTROL.sub("", text)
    text = re.sub(r"\n\s*\n+", "\n", text.strip())
    return text.replace("-->", "\u2192")


def _cues(record: Record) -> list[tuple[float, float, str]]:
    # A window that got an empty caption has nothing to show: no cue for it.
    cues = [(s.start, s.end, cue_text(s.caption)) for s in record.segments]
    return [c for c in cues if c[2]]


def render_srt(record: Record) -> str:
    blocks = [
        f"{i}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n"
        for i, (start, end, text) in enumerate(_cues(record), 1)
    ]
    return "\n".join(blocks)


def render_vtt(record: Record) -> str:
    blocks = [
        f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n" for start, end, text in _cues(record)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)
