"""bench/perf_round.sh names each setting it measures; every lever is a flag the locked vLLM's
`vllm serve` accepts, so a GPU run never spends its start on a typo. The runs themselves need a
GPU (docs/PERFORMANCE.md has them)."""

from __future__ import annotations

import gzip
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
    assert len(names) == 11
    for name in names:
        assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", shown), name


def perf_round_with_stand_ins(tmp_path: Path, *settings: str, **env: str) -> Path:
    """bench/perf_round.sh over stand-ins for the kit's scripts (the real ones need a GPU here):
    each start rotates the log exactly as start_service.sh's rotate_logs does, then logs a start
    header with the settings it was given and a request line. Returns the output folder."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "perf_round.sh").write_text(PERF_ROUND.read_text())
    (tmp_path / "bench" / "serve_and_sweep.sh").write_text(
        "#!/usr/bin/env bash\nset -e\nlog=$LOG_DIR/service.log\n"
        '[[ -s $log ]] && mv -f "$log" "$log.1"\n'
        'echo "=== start_service: $BENCH_LABEL MOE_CONFIG_DIR=$MOE_CONFIG_DIR" >"$log"\n'
        'echo "settings: MAX_NUM_SEQS=${MAX_NUM_SEQS-} QUANTIZATION=${QUANTIZATION-}'
        ' API_SERVER_COUNT=${API_SERVER_COUNT-}" >>"$log"\n'
        'echo "Using configuration from $BENCH_LABEL" >>"$log"\n'
        'echo \'{"runs": []}\' >"$1"\n'
    )
    (tmp_path / "stop_service.sh").write_text("#!/usr/bin/env bash\nexit 0\n")
    for script in ("bench/perf_round.sh", "bench/serve_and_sweep.sh", "stop_service.sh"):
        (tmp_path / script).chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "service.log").write_text("an earlier run's long log\n" * 1000)
    out = tmp_path / "out"
    done = subprocess.run(
        [str(tmp_path / "bench" / "perf_round.sh"), str(out), *settings],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "LOG_DIR": str(logs), **env},
    )
    assert done.returncode == 0, done.stderr
    return out


def start_log(out: Path, setting: str) -> list[str]:
    return gzip.decompress((out / f"{setting}.service.log.gz").read_bytes()).decode().splitlines()


def test_each_setting_keeps_its_whole_start_log_though_every_start_begins_a_fresh_one(tmp_path: Path) -> None:
    """start_service.sh rotates service.log at each start: a setting's log is the whole new file,
    its start lines (the MoE table vLLM used, the KV cache size) included."""
    out = perf_round_with_stand_ins(tmp_path, "fp8", "fp8-untuned")
    assert start_log(out, "fp8") == ["=== start_service: fp8 MOE_CONFIG_DIR=",
                                     "settings: MAX_NUM_SEQS= QUANTIZATION=fp8 API_SERVER_COUNT=",
                                     "Using configuration from fp8"]
    assert start_log(out, "fp8-untuned") == ["=== start_service: fp8-untuned MOE_CONFIG_DIR=",
                                             "settings: MAX_NUM_SEQS= QUANTIZATION=fp8 API_SERVER_COUNT=",
                                             "Using configuration from fp8-untuned"]


def test_pred_runs_the_predecessors_settings_whatever_the_kit_ships_or_the_caller_asks(
        tmp_path: Path) -> None:
    """The ratio's baseline must stay the predecessor's (8 sequences, bf16, vLLM's MoE table, one
    API server) though the shipped defaults move (4 API servers since the levers run) and the
    operator's environment asks for others; the shipped settings take the caller's."""
    out = perf_round_with_stand_ins(tmp_path, "pred", "fp8", API_SERVER_COUNT="4", MAX_NUM_SEQS="128",
                                    QUANTIZATION="fp8", MOE_CONFIG_DIR="moe_configs")
    assert start_log(out, "pred")[:2] == ["=== start_service: pred MOE_CONFIG_DIR=",
                                          "settings: MAX_NUM_SEQS=8 QUANTIZATION= API_SERVER_COUNT=1"]
    assert start_log(out, "fp8")[:2] == ["=== start_service: fp8 MOE_CONFIG_DIR=moe_configs",
                                         "settings: MAX_NUM_SEQS=128 QUANTIZATION=fp8 API_SERVER_COUNT=4"]
