"""bench/compare.py: the ratio to a baseline is read at the baseline's saturated p95, from what
was measured; runs that cannot stand for a caption load, or are not loadgen results, are refused
in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "bench" / "compare.py"


def run_of(level: int, captions_per_s: float, p95: float, distinct: int | None = None) -> dict[str, Any]:
    ok = level * 2
    return {"mode": "closed", "concurrency": level, "requests": ok, "ok": ok, "errors": 0,
            "distinct_sequences": ok if distinct is None else distinct, "collapsed": distinct == 1,
            "captions_per_s": captions_per_s, "audio_s_per_s": captions_per_s * 30,
            "latency_s": {"p50": p95 - 0.5, "p95": p95}, "ttft_s": {"p95": 1.0}, "tpot_s": {"p50": 0.02}}


def write(path: Path, label: str, runs: list[dict[str, Any]], **meta: Any) -> Path:
    path.write_text(json.dumps({"meta": {"label": label, **meta}, "runs": runs}))
    return path


def compare(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(COMPARE), *map(str, paths)], capture_output=True, text=True,
                          timeout=30)


def test_the_ratio_is_read_at_the_baselines_saturated_p95_measured_and_between_levels(tmp_path: Path) -> None:
    base = write(tmp_path / "pred.json", "pred", [run_of(8, 1.5, 5.0), run_of(16, 1.6, 10.0)],
                 start_seconds=200)
    fast = write(tmp_path / "fp8.json", "fp8",
                 [run_of(32, 4.0, 7.0), run_of(64, 7.0, 9.0), run_of(96, 9.0, 11.0)])
    done = compare(base, fast)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| pred | c=16 | 1.60 | 48 | 9.50 | 10.00 | 1.00 | 20.0 | 32/32 | 200 |" in lines
    assert "| fp8 | c=96 | 9.00 | 270 | 10.50 | 11.00 | 1.00 | 20.0 | 192/192 | – |" in lines
    assert "Budget: the p95 of pred saturated (c=16: 1.60 captions/s, p95 10.00 s)." in lines
    # Measured: c=64 is the best level within 10 s (7.0/1.6 = 4.4x); on the line from c=64 to c=96
    # the budget lies halfway: 8.0 captions/s (5.0x).
    assert "| fp8 | 7.00 (c=64, p95 9.00 s) | 4.4× | 8.00 | 5.0× |" in lines


def test_a_budget_outside_the_sweep_is_left_blank_not_guessed(tmp_path: Path) -> None:
    base = write(tmp_path / "pred.json", "pred", [run_of(16, 1.6, 10.0)])
    slow = write(tmp_path / "slow.json", "slow", [run_of(32, 3.0, 12.0), run_of(64, 5.0, 14.0)])
    quick = write(tmp_path / "quick.json", "quick", [run_of(32, 3.0, 6.0), run_of(64, 5.0, 8.0)])
    lines = compare(base, slow, quick).stdout.splitlines()
    assert "| slow | none | – | – | – |" in lines
    assert "| quick | 5.00 (c=64, p95 8.00 s) | 3.1× | – | – |" in lines


def test_a_run_that_collapsed_to_one_sequence_is_refused_in_one_line(tmp_path: Path) -> None:
    base = write(tmp_path / "pred.json", "pred", [run_of(16, 1.6, 10.0)])
    greedy = write(tmp_path / "greedy.json", "greedy", [run_of(64, 9.9, 5.0, distinct=1)])
    done = compare(base, greedy)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"compare: {greedy}: 128 requests decoded only 1 distinct sequences "
                           "(greedy on random weights?): rerun it sampled\n")


def test_a_mistyped_path_or_a_file_that_is_not_a_loadgen_result_is_one_line_exit_1(tmp_path: Path) -> None:
    base = write(tmp_path / "pred.json", "pred", [run_of(16, 1.6, 10.0)])
    (tmp_path / "notes.json").write_text('{"levels": [1]}')
    for bad in (tmp_path / "fp8.jsn", tmp_path / "notes.json"):
        done = compare(base, bad)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"compare: {bad}: not a loadgen result (")
        assert done.stderr.endswith("give the JSON that bench/loadgen.py --output wrote\n")
        assert done.stderr.count("\n") == 1


def test_with_no_result_to_compare_it_is_usage_exit_2(tmp_path: Path) -> None:
    done = compare(write(tmp_path / "pred.json", "pred", [run_of(16, 1.6, 10.0)]))
    assert done.returncode == 2 and "usage: compare.py" in done.stderr


@pytest.mark.parametrize(("run", "names"), [
    ("2026-12-07-h100-levers", ("pred", "fp8-api2-again")),
    ("2026-12-07-h100-levers", ("fp8", "fp8-kvfp8", "fp8-sync", "fp8-api2", "fp8-api2-again", "fp8-api4",
                                "fp8-noprefix")),
    ("2026-12-07-h100-round3", ("pred", "fp8", "fp8-untuned", "bf16", "bf16-untuned")),
])
def test_the_performance_pages_lead_tables_are_compares_output_for_the_committed_runs(
        run: str, names: tuple[str, ...]) -> None:
    """docs/PERFORMANCE.md's lead tables are not typed by hand: they are what bench/compare.py
    prints for the raw files of the run they describe."""
    done = compare(*(ROOT / "bench" / "results" / run / f"{name}.json" for name in names))
    assert done.returncode == 0, done.stderr
    page = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    for block in done.stdout.strip().split("\n\n"):
        assert block in page, block.splitlines()[0]
