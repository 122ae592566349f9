"""Resume, torn-line recovery and batch bookkeeping (no server)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import pytest

from captioner import (
    BatchOptions,
    Caption,
    CaptionClient,
    ExitCode,
    InputItem,
    Output,
    Record,
    ResumeInfo,
    ServerPool,
    StateFile,
    run_batch,
)
from captioner.errors import InputError, ServerConnectionError, UsageError


def line(source: str, error: str | None = None) -> str:
    return Record(source=source, caption="c", error=error).to_line()


def load_finished(path: Path) -> ResumeInfo:
    """What a run with `--output path` finds done (and repairs), as the command line opens it."""
    output = Output("jsonl", path, [], io.StringIO())
    try:
        return output.resume()
    finally:
        output.abandon()


def test_missing_output_file_means_nothing_done(tmp_path: Path) -> None:
    assert load_finished(tmp_path / "none.jsonl").done == set()


def test_torn_last_line_is_dropped_and_the_file_repaired(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = line("a") + line("b")
    out.write_text(whole + line("c")[:25])  # a crash in the middle of writing "c"
    info = load_finished(out)
    assert info.done == {"a", "b"} and info.dropped_partial
    assert out.read_text() == whole


def test_failed_and_duplicate_records_are_dropped_so_each_source_appears_once(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(line("a") + line("b", error="boom") + line("a") + line("c"))
    info = load_finished(out)
    assert info.done == {"a", "c"}
    assert (info.dropped_failed, info.dropped_duplicates) == (1, 1)
    assert [json.loads(x)["source"] for x in out.read_text().splitlines()] == ["a", "c"]


def test_a_complete_file_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(line("a"))
    before = out.stat().st_mtime_ns
    assert load_finished(out).done == {"a"}
    assert out.stat().st_mtime_ns == before


def test_a_file_this_client_did_not_write_is_refused_not_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "notes.jsonl"
    out.write_text("my precious notes\n")
    with pytest.raises(UsageError, match="not a caption record"):
        load_finished(out)
    assert out.read_text() == "my precious notes\n"


def test_writer_appends_whole_lines(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    writer = StateFile(out)
    writer.write(Record(source="a", caption="line one\nline two"))
    writer.write(Record(source="b"))
    writer.close()
    lines = out.read_text().splitlines()
    assert [json.loads(x)["source"] for x in lines] == ["a", "b"]


class FakeClient:
    """Stands in for CaptionClient: fails for sources named in `fail`."""

    base_url = "fake"

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[str] = []

    def caption_body(self, body: bytes, model: str) -> Caption:
        audio_url = json.loads(body)["messages"][0]["content"][0]["audio_url"]["url"]
        self.calls.append(audio_url)
        if audio_url in self.fail:
            raise self.fail[audio_url]
        return Caption("caption of " + audio_url, model)


def url_items(*names: str) -> list[InputItem]:
    return [InputItem(f"http://127.0.0.1:9/{n}", "url") for n in names]


def run(items: list[InputItem], client: FakeClient, skip: set[str] | None = None) -> Any:
    records: list[Record] = []
    pool = ServerPool([cast(CaptionClient, client)])
    options = BatchOptions(model="m", concurrency=2, server_fetch=True)
    summary = run_batch(items, options, pool, records.append, skip=skip or set())
    return summary, records


def test_batch_skips_done_sources_and_captions_the_rest_once() -> None:
    items = url_items("a", "b", "c")
    client = FakeClient()
    summary, records = run(items, client, skip={items[0].source})
    assert sorted(r.source for r in records) == [items[1].source, items[2].source]
    assert sorted(client.calls) == [items[1].source, items[2].source]
    assert (summary.files, summary.skipped, summary.done) == (3, 1, 2)
    assert summary.exit_code() == ExitCode.OK


def test_batch_goes_on_past_a_bad_input_and_exits_1() -> None:
    items = url_items("a", "bad", "c")
    client = FakeClient({items[1].source: InputError("bad: cannot decode audio")})
    summary, records = run(items, client)
    assert len(records) == 3 and summary.done == 2 and summary.failed == 1
    assert summary.exit_code() == ExitCode.FAILURES


def test_single_input_failure_exits_with_its_own_code() -> None:
    items = url_items("bad")
    summary, _ = run(items, FakeClient({items[0].source: InputError("bad")}))
    assert summary.exit_code() == ExitCode.INPUT


def test_unreachable_server_stops_the_batch_instead_of_failing_every_input() -> None:
    items = url_items(*"abcdefghij")
    down = ServerConnectionError("cannot connect")
    summary, records = run(items, FakeClient({i.source: down for i in items}))
    assert summary.aborted is down and summary.exit_code() == ExitCode.CONNECTION
    assert len(records) < len(items)
