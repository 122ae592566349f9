"""bench/perf_round.sh names each setting it measures; every lever is a flag the locked vLLM's
`vllm serve` accepts, so a GPU run never spends its start on a typo. The runs themselves need a
GPU (docs/PERFORMANCE.md has them)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PERF_ROUND = ROOT / "bench" / "perf_round.sh"


def extra_args_of_each_setting() -> dict[str, list[str]]:
    text = PERF_ROUND.read_text()
    found = dict(re.findall(r"^\s+([a-z0-9-]+)\) printf .*\"EXTRA_VLLM_ARGS=([^\"]*)\"", text, re.M))
    return {name: shlex.split(args) for name, args in found.items()}


def test_every_lever_is_a_flag_the_locked_vllm_serve_accepts() -> None:
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    levers = extra_args_of_each_setting()
    assert set(levers) == {"fp8-sync", "fp8-kvfp8", "fp8-noprefix", "fp8-graphs128"}
    parser = arg_utils.AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    for name, args in levers.items():
        parsed = parser.parse_args(["--quantization", "fp8", *args])
        assert parsed.quantization == "fp8", name
    assert parser.parse_args(levers["fp8-kvfp8"]).kv_cache_dtype == "fp8"
    assert parser.parse_args(levers["fp8-sync"]).async_scheduling is False
    assert parser.parse_args(levers["fp8-noprefix"]).enable_prefix_caching is False
    assert parser.parse_args(levers["fp8-graphs128"]).max_cudagraph_capture_size == 128


def test_an_unknown_setting_is_one_line_exit_2_and_nothing_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [str(PERF_ROUND), str(out), "fp8", "fp8-typo"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr == "perf_round: unknown setting 'fp8-typo' (see --help for the names)\n"
    assert not out.exists()


def test_help_names_every_setting_it_accepts() -> None:
    text = PERF_ROUND.read_text()
    names = re.findall(r"^\s+([a-z0-9-]+)\) (?:echo|printf)", text, re.M)
    shown = subprocess.run([str(PERF_ROUND), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert len(names) == 10
    for name in names:
        assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", shown), name
