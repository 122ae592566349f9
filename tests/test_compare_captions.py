"""bench/compare_captions.py: the same audio captioned on two real services, scored pair by pair."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ROOT, SAMPLE, Service

sys.path.insert(0, str(ROOT / "bench"))

import compare_captions


def test_similarity_counts_shared_words_in_order_ignoring_case_and_punctuation() -> None:
    assert compare_captions.similarity("A dog barks, twice.", "a DOG barks twice") == 100.0
    assert compare_captions.similarity("a dog barks", "rain on a roof") == pytest.approx(100 * 2 / 7)
    assert compare_captions.similarity("one two three four", "five six seven eight") == 0.0
    assert compare_captions.similarity("", "") == 100.0


def test_inputs_missing_or_failed_in_any_run_are_listed_not_scored() -> None:
    a = {"x.wav": "a b c", "y.wav": "d e", "z.wav": None}
    b = {"x.wav": "a b c", "y.wav": "d f", "z.wav": "g"}
    again = {"x.wav": "a b", "y.wav": "d e"}
    pairs, failed = compare_captions.compare(a, b, again)
    assert [(p.source, p.score, p.baseline) for p in pairs] == [
        ("x.wav", 100.0, pytest.approx(80.0)), ("y.wav", 50.0, 100.0)]
    assert failed == ["z.wav"]
    text = compare_captions.report(pairs, failed, "http://a", "http://b")
    rows = [line for line in text.splitlines() if line.startswith("| ") and ".wav" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| y.wav", "| x.wav"]  # lowest score first
    assert "| A vs B | 75.0 | 75.0 | 50.0 |" in text
    assert "| A vs A (sampling alone) | 90.0 | 90.0 | 80.0 |" in text
    assert "Not compared (1)" in text and "- z.wav" in text


@pytest.mark.server
def test_a_caption_with_line_breaks_controls_and_pipes_stays_one_table_row() -> None:
    caption = "rain | wind\r\nthunder\x1e\x1cthen\u2028quiet\x85end"
    pairs, _ = compare_captions.compare({"x.wav": caption}, {"x.wav": "rain"}, None)
    rows = compare_captions.report(pairs, [], "http://a", "http://b").splitlines()
    [row] = [line for line in rows if "x.wav" in line]
    assert row.count(" | ") == 3 and "rain \\| wind" in row  # source, score, A, B
    assert row.endswith(" | rain |") and len(row.splitlines()) == 1


@pytest.mark.server
def test_two_urls_caption_a_folder_and_the_report_scores_every_file(server: Service, tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("one.wav", "two.wav"):
        shutil.copy(SAMPLE, folder / name)
    work, out = tmp_path / "work", tmp_path / "report.md"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_captions.py"), "--a", server.base_url,
         "--b", server.base_url.replace("127.0.0.1", "localhost"), "--baseline", "--work", str(work),
         "-o", str(out), str(folder)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    text = out.read_text(encoding="utf-8")
    assert "2 inputs captioned by every run" in text
    for name in ("one.wav", "two.wav"):
        assert sum(name in line for line in text.splitlines()) == 1
    a = compare_captions.read_captions(work / "a.jsonl")
    assert sorted(Path(s).name for s in a) == ["one.wav", "two.wav"]
    assert all(isinstance(c, str) for c in a.values())
    # A rerun resumes from the work folder: nothing is captioned again, the report is the same.
    again = subprocess.run(r.args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert out.read_text(encoding="utf-8") == text


def test_a_service_that_captions_nothing_stops_the_comparison_with_its_url_named(
        server: Service, tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_captions.py"), "--a", server.base_url,
         "--b", dead, "--work", str(tmp_path / "w"), "--retries", "0", str(SAMPLE)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"compare_captions: nothing was captioned on {dead} (test_client.py exit 4, its message above); "
        f"fix that and rerun: finished captions are kept in {tmp_path / 'w'}")
    assert len(compare_captions.read_captions(tmp_path / "w" / "a.jsonl")) == 1


def test_no_inputs_is_a_usage_error() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_captions.py"), "--a", "http://x",
                        "--b", "http://y"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == "compare_captions: give the files or folders to caption (see --help)\n"
