"""The benchmark tools: loadgen's JSON is whole and consistent; warm-up and plot run.

Never asserts speed: these run on a CPU with a tiny model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402


def check_run(run: dict[str, Any], requests: int, seconds: float) -> None:
    assert run["requests"] == requests
    assert run["ok"] + run["errors"] == run["requests"]
    assert len(run["per_request"]) == run["requests"]
    assert [r["index"] for r in run["per_request"]] == list(range(requests))
    assert run["ok"] == sum(r["ok"] for r in run["per_request"])
    assert run["output_tokens"] == sum(r["output_tokens"] for r in run["per_request"] if r["ok"])
    for name in ("latency_s", "ttft_s"):
        d = run[name]
        assert 0 < d["p50"] <= d["p95"] <= d["p99"] <= d["max"], (name, d)
    for r in run["per_request"]:
        if r["ok"]:
            assert 0 < r["ttft"] <= r["latency"]
            assert r["chunks"] >= 1
    assert run["captions_per_s"] > 0
    assert run["audio_s_per_s"] == pytest.approx(run["captions_per_s"] * seconds)
    assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] / run["span_s"])


@pytest.mark.server
def test_loadgen_closed_sweep_and_open_loop(server: Any) -> None:
    settings = loadgen.Settings(base_url=server.base_url, seconds=2.0, max_tokens=8, timeout=120)
    plan = loadgen.Plan("closed", [1, 3], requests=4, max_seconds=120)
    result = asyncio.run(loadgen.run_plan(settings, plan))
    assert result["meta"]["model"] == server.model
    assert [r["concurrency"] for r in result["runs"]] == [1, 3]
    for run in result["runs"]:
        assert run["errors"] == 0, run["error_samples"]
        check_run(run, 4, 2.0)
        # ignore_eos + max_tokens: every caption has exactly the asked length.
        assert {r["output_tokens"] for r in run["per_request"]} == {8}
        # The server returned every request's token ids; sampled captions of different clips differ.
        assert all(r["sequence"] for r in run["per_request"])
        assert run["distinct_sequences"] == 4 and not run["collapsed"]

    plan = loadgen.Plan("open", [20.0], requests=3, max_seconds=120)
    result = asyncio.run(loadgen.run_plan(settings, plan))
    (run,) = result["runs"]
    assert run["mode"] == "open" and run["rate"] == 20.0
    check_run(run, 3, 2.0)


@pytest.mark.server
def test_loadgen_cli_writes_json(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--base-url", server.base_url, "-c", "2",
         "-n", "2", "--seconds", "1", "--max-tokens", "4", "--label", "t", "--meta", "k=3", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["label"] == "t" and data["meta"]["k"] == 3
    check_run(data["runs"][0], 2, 1.0)
    assert "c=2" in r.stderr


@pytest.mark.server
def test_warm_up_succeeds(server: Any) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "warm_up.py"), "--base-url", server.base_url,
         "--requests", "3", "--seconds", "1", "--max-tokens", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 concurrent request(s) of 1 s audio, 2 tokens" in r.stdout


def test_warm_up_fails_without_server_and_needs_only_the_standard_library() -> None:
    r = subprocess.run(  # -I -S: no site-packages, as in a server venv without the client
        [sys.executable, "-I", "-S", str(ROOT / "tools" / "warm_up.py"), "--base-url", "http://127.0.0.1:1",
         "--requests", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("warm_up: cannot list models at http://127.0.0.1:1")


def test_loadgen_refuses_other_hosts() -> None:
    with pytest.raises(ValueError, match="only targets this host"):
        loadgen.check_local("http://10.1.2.3:8003")
    assert loadgen.check_local("http://localhost:8003/") == "http://localhost:8003"
    assert loadgen.main(["--base-url", "http://example.com:80", "-c", "1", "-n", "1"]) == 2


@pytest.mark.parametrize("kind", loadgen.AUDIO_KINDS)
def test_audio_is_16k_wav_of_the_asked_length_and_unique(kind: str) -> None:
    urls = {loadgen.audio_data_url(1.5, kind, seed) for seed in range(10)}
    assert len(urls) == 10
    data = base64.b64decode(next(iter(urls)).split(",", 1)[1])
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.getnframes() == 24000


def test_summary_of_failures_and_percentiles() -> None:
    settings = loadgen.Settings(base_url="http://127.0.0.1:1", seconds=30.0)
    results = [
        loadgen.RequestResult(index=i, start=0.1 * i, ok=True, ttft=0.1, latency=1.0 + i, output_tokens=10)
        for i in range(4)
    ] + [loadgen.RequestResult(index=4, start=0.5, error="HTTP 500: boom")]
    run = loadgen.summarize(results, 5.0, settings, mode="closed", concurrency=2)
    assert (run["requests"], run["ok"], run["errors"]) == (5, 4, 1)
    assert run["error_samples"] == ["HTTP 500: boom"]
    assert run["latency_s"]["p50"] == pytest.approx(2.5)
    assert run["span_s"] == pytest.approx(0.3 + 4.0)
    assert run["tpot_s"]["p50"] == pytest.approx((2.5 - 0.1) / 9)


def results_with_sequences(sequences: list[str | None]) -> list[loadgen.RequestResult]:
    return [loadgen.RequestResult(index=i, start=0.0, ok=True, ttft=0.1, latency=1.0, output_tokens=8,
                                  sequence=s) for i, s in enumerate(sequences)]


def test_a_level_whose_requests_decoded_the_same_tokens_is_marked_collapsed() -> None:
    settings = loadgen.Settings(base_url="http://127.0.0.1:1")
    run = loadgen.summarize(results_with_sequences(["a"] * 11 + ["b"]), 1.0, settings,
                            mode="closed", concurrency=12)
    assert (run["distinct_sequences"], run["collapsed"]) == (2, True)
    assert loadgen.one_line(run).endswith("distinct 2/12  COLLAPSED")
    assert loadgen.collapse_warning(run).startswith(
        "loadgen: WARNING: 12 requests produced only 2 distinct token sequences: the batch collapsed")


def test_a_level_of_different_captions_is_not_collapsed_and_unknown_is_not_guessed() -> None:
    settings = loadgen.Settings(base_url="http://127.0.0.1:1")
    run = loadgen.summarize(results_with_sequences(list("abcdefgh")), 1.0, settings, mode="closed",
                            concurrency=8)
    assert (run["distinct_sequences"], run["collapsed"]) == (8, False)
    assert loadgen.one_line(run).endswith("distinct 8/8")
    # A quarter is the line: 8 requests with 2 sequences are not collapsed, with 1 they are.
    assert not loadgen.summarize(results_with_sequences(list("abababab")), 1.0, settings,
                                 mode="closed", concurrency=8)["collapsed"]
    assert loadgen.summarize(results_with_sequences(["a"] * 8), 1.0, settings, mode="closed",
                             concurrency=8)["collapsed"]
    unknown = loadgen.summarize(results_with_sequences([None] * 8), 1.0, settings, mode="closed",
                                concurrency=8)
    assert (unknown["distinct_sequences"], unknown["collapsed"]) == (None, False)
    assert "distinct ?/8" in loadgen.one_line(unknown)


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    settings = loadgen.Settings(base_url="http://127.0.0.1:1")
    one = [loadgen.RequestResult(index=0, start=0.0, ok=True, ttft=0.1, latency=1.0, output_tokens=5)]
    runs = [loadgen.summarize(one, 1.0, settings, mode="closed", concurrency=c) for c in (1, 2)]
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"meta": {"label": "x"}, "runs": runs}))
    out = tmp_path / "p.png"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(out), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
