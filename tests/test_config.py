"""config.env.example is the one schema; captioner/config.py is the one parser, for the scripts
and the client alike (no server)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.config import SCHEMA, ConfigError, Settings, load, parse, schema
from tests.service import ROOT


def shell_view(environ: dict[str, str]) -> dict[str, str]:
    """Every setting as lib/service_lib.sh's load_config leaves it in bash."""
    names = list(schema())
    script = ("source lib/service_lib.sh; load_config; "
              f'for v in {" ".join(names)}; do printf "%s=%s\\0" "$v" "${{!v}}"; done')
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env={"PATH": os.environ["PATH"], **environ},
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return dict(item.split("=", 1) for item in out.split("\0") if item)


def test_every_setting_in_the_schema_has_a_default_line_and_a_comment_that_documents_it() -> None:
    settings = schema()
    assert len(settings) >= 35
    assert [s.name for s in settings.values() if len(s.doc) < 15] == []


def test_the_shipped_config_env_sets_nothing_so_the_schema_is_the_default() -> None:
    assert parse(ROOT / "config.env") == []


def test_the_readme_table_names_every_setting_with_the_schemas_default() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| Variable | Default | Meaning |"):]
    table = table[: table.index("\n\n")]
    documented: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        names, default = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names_list = re.findall(r"`([A-Z_]+)`", names)
        defaults = [d.strip("`") for d in default.split(", ")] if len(names_list) > 1 else [default]
        for name, value in zip(names_list, defaults, strict=True):
            documented[name] = "" if value.startswith("empty") else value.strip("`")
    assert documented == {name: s.default for name, s in schema().items()}


def test_the_client_and_the_scripts_read_the_same_values(tmp_path: Path) -> None:
    config = tmp_path / "c.env"
    config.write_text('# a comment\nPORT=8123\nAPI_KEY="quoted key"\nTOP_K=7   \r\nLOG_DIR=\n')
    environ = {"CAPTIONER_CONFIG": str(config), "TOP_K": "9"}
    client = Settings(environ)
    shell = shell_view(environ)
    shell["VLLM_PYTHON"] = ""  # derived by the scripts when empty: the kit's venv, else python3
    assert {name: client.get(name) or "" for name in shell} == shell
    assert [shell[k] for k in ("PORT", "API_KEY", "TOP_K", "LOG_DIR")] == ["8123", "quoted key", "9", ""]
    assert shell["MAX_NUM_SEQS"] == schema()["MAX_NUM_SEQS"].default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PORT=1\nMAX_NUM_SEQ=8\n", "{f}:2: unknown variable MAX_NUM_SEQ (known: see config.env.example)"),
        ("export PORT=8003\n", "{f}:1: not a KEY=value line: export PORT=8003"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_and_line_for_client_and_scripts(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.env"
    config.write_text(text)
    expected = message.format(f=config)
    with pytest.raises(ConfigError) as caught:
        load({"CAPTIONER_CONFIG": str(config)})
    assert str(caught.value) == expected
    client = [sys.executable, str(ROOT / "test_client.py"), str(ROOT / "samples" / "sample.wav")]
    env = {**os.environ, "CAPTIONER_CONFIG": str(config)}
    result = subprocess.run(client, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (2, f"captioner: error: {expected}\n")


def test_a_config_file_named_but_missing_is_refused_while_none_at_all_is_fine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found or unreadable: create it from config.env.example"):
        load({"CAPTIONER_CONFIG": str(tmp_path / "none.env")})
    assert load({}, os.devnull)["PORT"] == "8003"


def test_a_new_setting_is_one_line_in_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extended = tmp_path / "schema.env"
    extended.write_text(SCHEMA.read_text() + "# Seconds of a new thing, for this test.\nNEW_SETTING=42\n")
    monkeypatch.setattr("captioner.config.SCHEMA", extended)
    (tmp_path / "c.env").write_text("NEW_SETTING=43\n")
    assert load({}, os.devnull)["NEW_SETTING"] == "42"
    assert load({}, tmp_path / "c.env")["NEW_SETTING"] == "43"
    assert schema()["NEW_SETTING"].doc == "Seconds of a new thing, for this test."
