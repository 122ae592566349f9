"""Render records as text, json, jsonl, srt or vtt."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from captioner.records import JSON_ESCAPES, Record

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls except \t and \n
# What text output escapes: C0 controls but \t and \n, DEL, C1, and the line ends a terminal does
# not take for one (\x85, U+2028, U+2029). A caption or a file name cannot move the cursor,
# recolour or retitle the terminal, or hide text behind a carriage return.
_TERMINAL_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

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


def escape_text(text: str) -> str:
    """`text` with control characters shown as escapes (`\\x1b`, `\\r`, `\\u2028`): safe to print."""
    return _TERMINAL_CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def render_text(records: Sequence[Record], many: bool) -> str:
    """Captions for a person: just the caption, or a `# source` header per input.

    With several inputs a failed one keeps its place as one line, `# SOURCE: failed: WHY` (the
    same words as on stderr); one input that failed prints nothing (stderr and the exit code say).
    Control characters are escaped (`escape_text`).
    """
    if not many:
        return "".join(escape_text(r.caption.strip()) + "\n" for r in records if r.ok)
    return "\n".join(text_block(r) for r in records)


def text_block(record: Record) -> str:
    """One input's part of a multi-input text output."""
    source = escape_text(record.source)
    if record.ok:
        return f"# {source}\n{escape_text(record.caption.strip())}\n"
    reason = record.error or "failed"
    if reason.startswith(f"{record.source}: "):
        reason = reason[len(record.source) + 2 :]
    return f"# {source}: failed: {escape_text(reason)}\n"


def render_json(records: Sequence[Record], many: bool) -> str:
    """One JSON document: an object for one input, an array for several (see Record.to_line for
    the characters escaped beyond JSON's own)."""
    if not many and len(records) == 1:
        text = json.dumps(records[0].to_json(), ensure_ascii=False, indent=2)
    else:
        text = json.dumps([r.to_json() for r in records], ensure_ascii=False, indent=2)
    return text.translate(JSON_ESCAPES) + "\n"


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
