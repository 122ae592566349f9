"""text, json, jsonl, srt and vtt rendering (no server)."""

from __future__ import annotations

import json
import re

import pytest

from captioner.formats import cue_text, render, timestamp
from captioner.records import Record, Segment
from tests.test_client_support import parse_srt, parse_vtt


def segmented() -> Record:
    return Record(
        source="/audio/long.wav",
        duration=75.0,
        segments=[
            Segment(0.0, 30.0, "A man speaks."),
            Segment(30.0, 60.0, ""),
            Segment(60.0, 75.0, "Rain falls.\n\nThen --> silence."),
        ],
        caption="A man speaks. Rain falls. Then --> silence.",
        model="m",
        usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        latency=1.23456,
    )


def test_timestamps_use_comma_for_srt_and_dot_for_vtt() -> None:
    assert timestamp(3723.4567, ",") == "01:02:03,457"
    assert timestamp(0, ".") == "00:00:00.000"
    assert timestamp(59.9996, ".") == "00:01:00.000"


def test_srt_is_valid_with_sequential_cues_and_skips_empty_captions() -> None:
    cues = parse_srt(render([segmented()], "srt", many=False))
    assert [(a, b) for a, b, _ in cues] == [
        ("00:00:00,000", "00:00:30,000"),
        ("00:01:00,000", "00:01:15,000"),
    ]
    assert cues[1][2] == "Rain falls.\nThen \u2192 silence."


def test_vtt_is_valid_and_never_carries_an_arrow_in_text() -> None:
    cues = parse_vtt(render([segmented()], "vtt", many=False))
    assert [(a, b) for a, b, _ in cues] == [
        ("00:00:00.000", "00:00:30.000"),
        ("00:01:00.000", "00:01:15.000"),
    ]


def test_cue_text_removes_blank_lines_that_would_end_a_cue() -> None:
    assert cue_text("  one\n\n \ntwo  ") == "one\ntwo"
    assert cue_text("a\rb\x0c\x00c\r\n\r\nd") == "a\nbc\nd"


def test_jsonl_is_one_whole_record_per_line_with_every_field() -> None:
    text = render([segmented(), Record(source="b.wav", error="b.wav: boom")], "jsonl", True)
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n")
    first = json.loads(lines[0])
    assert list(first) == [
        "source", "path", "sha256", "duration", "segments", "caption", "model", "usage", "latency", "error",
    ]  # fmt: skip
    assert first["segments"][2] == {
        "start": 60.0,
        "end": 75.0,
        "caption": segmented().segments[2].caption,
    }
    assert first["latency"] == 1.235
    assert json.loads(lines[1])["error"] == "b.wav: boom"


# A random-weight model's caption held U+0085 and broke a reader that used str.splitlines (CI, stop 15).
@pytest.mark.parametrize("odd", ["\x85", "\u2028", "\u2029", "\x1c", "\x0b", "\x0c", "\r"])
def test_a_caption_with_any_line_break_character_stays_on_its_one_jsonl_line(odd: str) -> None:
    caption = f"before{odd}after"
    text = render([Record(source="a.wav", caption=caption), Record(source="b.wav")], "jsonl", True)
    lines = text.splitlines()
    assert len(lines) == 2 and text.count("\n") == 2
    assert json.loads(lines[0])["caption"] == caption


def test_json_is_an_object_for_one_input_and_an_array_for_several() -> None:
    assert json.loads(render([segmented()], "json", many=False))["source"] == "/audio/long.wav"
    many = json.loads(render([segmented(), segmented()], "json", many=True))
    assert isinstance(many, list) and len(many) == 2


def test_text_is_the_bare_caption_for_one_input_and_headed_blocks_for_several() -> None:
    ok = Record(source="a.wav", caption="Birds sing.")
    bad = Record(source="b.wav", error="b.wav: cannot decode audio")
    assert render([ok], "text", many=False) == "Birds sing.\n"
    assert render([bad], "text", many=False) == ""  # one input: stderr and the exit code say it
    # Several: a failed input keeps its place, one line naming it and the error.
    assert render([bad, ok, bad], "text", many=True) == (
        "# b.wav: failed: cannot decode audio\n\n"
        "# a.wav\nBirds sing.\n\n"
        "# b.wav: failed: cannot decode audio\n"
    )


ESCAPE = "\x1b]0;owned\x07\x1b[2J\rfake\x9b31m\x7f"


def test_text_shows_control_characters_of_captions_and_names_as_escapes() -> None:
    record = Record(source="odd\x1b[1m.wav", caption=f"Rain{ESCAPE}.\nWind\tblows.")
    one = render([record], "text", many=False)
    assert one == "Rain\\x1b]0;owned\\x07\\x1b[2J\\rfake\\x9b31m\\x7f.\nWind\tblows.\n"
    many = render([record, Record(source="x\r.wav", error="x\r.wav: HTTP 400: bad \x1b[31m")], "text", True)
    assert many.startswith("# odd\\x1b[1m.wav\nRain\\x1b]0;owned")
    assert many.endswith("# x\\r.wav: failed: HTTP 400: bad \\x1b[31m\n")
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", one + many)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_stays_json_with_no_raw_control_character(fmt: str) -> None:
    record = Record(source="a.wav", caption=f"Rain{ESCAPE}")
    text = render([record, record], fmt, many=True)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
    first = json.loads(text)[0] if fmt == "json" else json.loads(text.splitlines()[0])
    assert first["caption"] == f"Rain{ESCAPE}"


def test_subtitles_refuse_several_records() -> None:
    with pytest.raises(ValueError, match="one input"):
        render([segmented(), segmented()], "srt", many=True)
