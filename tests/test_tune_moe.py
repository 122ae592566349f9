"""bench/tune_moe.py's tables are ones vLLM reads, under the name vLLM looks up, from the folder the
kit hands it; its candidates always include vLLM's default. The timing itself needs a GPU
(docs/PERFORMANCE.md has the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import tune_moe  # noqa: E402

fused_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")


def test_every_batch_size_has_vllms_default_first_and_no_duplicate_candidates() -> None:
    seeds = list(tune_moe.shipped_configs(128, 768, None).values())
    assert seeds, "vLLM ships tables for E=128,N=768 on other cards: they seed the grid"
    for m in tune_moe.VLLM_BATCH_SIZES:
        default = tune_moe.normalized(fused_moe.get_default_config(m, 128, 768, 2048, 8, None))
        found = tune_moe.candidates(m, "full", default, seeds)
        assert found[0] == default
        assert len({tune_moe.key_of(c) for c in found}) == len(found)
        assert all(set(c) == set(tune_moe.CONFIG_KEYS) for c in found)
        assert all(tune_moe.nearest(t, m) in found for t in seeds)
        assert len(tune_moe.candidates(m, "small", default, seeds)) < len(found)


def test_a_written_table_is_what_vllm_loads_from_the_folder_the_kit_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H100_80GB_HBM3")
    name = fused_moe.get_config_file_name(128, 768, "fp8_w8a8")
    assert name == "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    best = {
        64: tune_moe.grid_for(64, "full")[5],
        1: tune_moe.grid_for(1, "full")[3],
        4096: tune_moe.grid_for(4096, "full")[7],
    }
    tune_moe.write_table(tmp_path / name, best, "3.x")
    assert list(json.loads((tmp_path / name).read_text())) == ["triton_version", "1", "64", "4096"]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left

    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    fused_moe.get_moe_configs.cache_clear()
    try:
        assert fused_moe.get_moe_configs(128, 768, "fp8_w8a8") == best
        assert fused_moe.get_moe_configs(128, 768, None) is None  # bf16: not tuned here, vLLM's default
    finally:
        fused_moe.get_moe_configs.cache_clear()


def test_the_shipped_folder_is_the_settings_default_and_holds_only_vllm_tables() -> None:
    schema = (ROOT / "config.env.example").read_text()
    assert "\nMOE_CONFIG_DIR=moe_configs\n" in schema
    readme = (ROOT / "moe_configs" / "README.md").read_text()
    shipped = sorted((ROOT / "moe_configs").glob("*.json"))
    assert {p.name for p in shipped} >= {
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json",
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json",
    }
    for path in shipped:
        assert f"`{path.name}`" in readme, f"moe_configs/README.md does not list {path.name}"
        assert path.name.startswith("E=128,N=") and ",device_name=" in path.name, path.name
        table = json.loads(path.read_text())
        table.pop("triton_version", None)
        sizes = sorted(int(m) for m in table)
        assert sizes == sorted(tune_moe.VLLM_BATCH_SIZES), path.name
        assert all(set(c) == set(tune_moe.CONFIG_KEYS) for c in table.values()), path.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bf16", "--batch-sizes", "1,x"], "--batch-sizes '1,x': expected whole numbers"),
        (["--dtype", "bf16", "--batch-sizes", "0"], "--batch-sizes: every batch size must be 1 or more"),
        (["--dtype", "int4"], "argument --dtype: invalid choice"),
    ],
)
def test_bad_options_are_one_line_usage_errors(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune_moe.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_without_a_gpu_it_says_where_to_run_it_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune_moe.py"), "--dtype", "bf16", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "tune_moe: no CUDA GPU here: run it on the GPU host"
    assert list(tmp_path.iterdir()) == []


def test_the_time_bound_is_shared_evenly_so_every_batch_size_gets_timed_and_leftovers_roll_on() -> None:
    # 100 s left for 4 batch sizes: the first gets 25 s.
    assert tune_moe.share_deadline(0.0, 100.0, 4) == 25.0
    # It finished in 10 s: the other 3 share the 90 s left, 30 s each.
    assert tune_moe.share_deadline(10.0, 100.0, 3) == 40.0
    # Past the bound, a batch size still times its first candidate (vLLM's default), nothing more.
    assert tune_moe.share_deadline(120.0, 100.0, 2) == 120.0
