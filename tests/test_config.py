"""config.env.example is the one schema; captioner/config.py is the one parser, for the scripts
and the client alike (no server)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.config import (
    GUARD_PREFIX,
    GUARD_SETTINGS,
    SCHEMA,
    ConfigError,
    Settings,
    derive,
    load,
    parse,
    schema,
    validate,
)
from captioner_server.request_guard import host_allowed
from captioner_server.settings import guard_settings
from tests.service import ROOT


def shell_view(environ: dict[str, str]) -> dict[str, str]:
    """Every setting as lib/service_lib.sh's load_config leaves it in bash."""
    names = list(schema())
    script = (
        "source lib/service_lib.sh; load_config; "
        f'for v in {" ".join(names)}; do printf "%s=%s\\0" "$v" "${{!v}}"; done'
    )
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
    table = readme[readme.index("| Variable | Default | Meaning |") :]
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
        ("export PORT=8003\n", "{f}:1: not a KEY=value line: export PORT=…"),
        ("export API_KEY=sk-secret\n", "{f}:1: not a KEY=value line: export API_KEY=…"),
        ("sk-secret\n", "{f}:1: not a KEY=value line (it has no '='; not shown, as it may be a secret)"),
        ("LOG_DIR=~/captioner-logs\n", "{f}:1: LOG_DIR: ~, $VARIABLE and backquotes are not expanded: "
         "write the path out (the file is read, not run by a shell)"),
        ("MODEL_PATH=$HOME/models\n", "{f}:1: MODEL_PATH: ~, $VARIABLE and backquotes are not expanded: "
         "write the path out (the file is read, not run by a shell)"),
        ("API_KEY='abc123'\n", "{f}:1: API_KEY: single quotes would stay part of the value: use double "
         "quotes or none (the file is read, not run by a shell)"),
        ("LOG_DIR=/var/log/captioner  # per host\n", "{f}:1: LOG_DIR: a comment after the value would be "
         "part of it: put it on a line of its own (the file is read, not run by a shell)"),
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
    new = "# Seconds of a new thing, for this test.\n# type: int 1..60\nNEW_SETTING=42\n"
    extended.write_text(SCHEMA.read_text() + new)
    monkeypatch.setattr("captioner.config.SCHEMA", extended)
    (tmp_path / "c.env").write_text("NEW_SETTING=43\n")
    assert load({}, os.devnull)["NEW_SETTING"] == "42"
    assert load({}, tmp_path / "c.env")["NEW_SETTING"] == "43"
    assert schema()["NEW_SETTING"].doc == "Seconds of a new thing, for this test."
    validate(load({}, tmp_path / "c.env"))
    with pytest.raises(ConfigError, match=r'^NEW_SETTING="61" is invalid: expected an integer from 1 to 60$'):
        validate(load({"NEW_SETTING": "61"}, os.devnull), ["NEW_SETTING"])


def test_every_setting_has_a_rule_on_the_last_line_of_its_comment() -> None:
    assert [name for name, s in schema().items() if s.rule is None] == []
    assert [name for name, s in schema().items() if "type:" in s.doc] == []
    validate(load({}, os.devnull))  # the defaults pass their own rules


def test_a_setting_without_a_rule_fails_validation_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extended = tmp_path / "schema.env"
    extended.write_text(SCHEMA.read_text() + "# A new thing someone forgot to give a rule.\nNEW_SETTING=42\n")
    monkeypatch.setattr("captioner.config.SCHEMA", extended)
    with pytest.raises(ConfigError, match="NEW_SETTING has no rule: give it a '# type: ...' line"):
        validate(load({}, os.devnull))


def test_a_malformed_rule_names_the_schema_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "schema.env"
    broken.write_text("# A thing.\n# type: int one..two\nTHING=1\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:2: the rule of THING: 'one..two' is not of the form"):
        schema(broken)
    broken.write_text("# A thing.\n# type: number 1..2\nTHING=1\n")
    with pytest.raises(ConfigError, match="unknown kind 'number'"):
        schema(broken)


# What the shell's validate_config said before the rules moved to the schema (bats and the server
# tests assert some of these texts too).
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "abc"}, 'PORT="abc" is invalid: expected an integer from 1 to 65535'),
        ({"PORT": "0"}, 'PORT="0" is invalid: expected an integer from 1 to 65535'),
        ({"PORT": "٣"}, 'PORT="٣" is invalid: expected an integer from 1 to 65535'),
        (
            {"MODEL_PATH": ""},
            "MODEL_PATH=\"\" is invalid: must name the model folder (run 'make model' to download it)",
        ),
        (
            {"SERVED_MODEL_NAME": "a b"},
            'SERVED_MODEL_NAME="a b" is invalid: letters, digits and . _ / : - only',
        ),
        (
            {"LOAD_FORMAT": "gguf"},
            'LOAD_FORMAT="gguf" is invalid: expected one of: auto safetensors pt dummy',
        ),
        ({"HOST": "a b"}, 'HOST="a b" is invalid: an IP address or host name, e.g. 127.0.0.1'),
        ({"API_KEY": "a b"}, 'API_KEY="a b" is invalid: printable characters without spaces'),
        ({"GPU_MEMORY_UTIL": "0"}, 'GPU_MEMORY_UTIL="0" is invalid: a fraction, 0 < x <= 1'),
        ({"GPU_MEMORY_UTIL": "-0.5"}, 'GPU_MEMORY_UTIL="-0.5" is invalid: a fraction, 0 < x <= 1'),
        ({"TEMPERATURE": "2.01"}, 'TEMPERATURE="2.01" is invalid: a number from 0 to 2'),
        ({"TOP_P": "1e1"}, 'TOP_P="1e1" is invalid: a fraction, 0 < x <= 1'),
        ({"QUANTIZATION": "int4"}, 'QUANTIZATION="int4" is invalid: expected one of: fp8'),
        ({"CPU_KVCACHE_GB": "0"}, 'CPU_KVCACHE_GB="0" is invalid: expected an integer >= 1'),
        ({"MAX_NUM_BATCHED_TOKENS": "8"}, 'MAX_NUM_BATCHED_TOKENS="8" is invalid: expected an integer >= 16'),
        ({"TOP_K": "0"}, 'TOP_K="0" is invalid: expected an integer >= 1'),
        (
            {"MAX_TOKENS": "32768"},
            'MAX_TOKENS="32768" is invalid: must be below MAX_MODEL_LEN (32768): the prompt needs room',
        ),
        (
            {"ALLOWED_MEDIA_DOMAINS": "a;b"},
            'ALLOWED_MEDIA_DOMAINS="a;b" is invalid: host names separated by commas, '
            "e.g. media.example.com,cdn.example.com",
        ),
        (
            {"EXTRA_ROUTES": "tokenize"},
            'EXTRA_ROUTES="tokenize" is invalid: all, or paths separated by commas, '
            "e.g. /tokenize,/v1/completions",
        ),
        (
            {"UNIX_SOCKET": "/run/" + "x" * 100},
            f'UNIX_SOCKET="/run/{"x" * 100}" is invalid: a socket path of letters, digits and / _ . - '
            "(under 100 characters in all)",
        ),
        (
            {"UNIX_SOCKET": "a b.sock"},
            'UNIX_SOCKET="a b.sock" is invalid: a socket path of letters, digits and / _ . - '
            "(under 100 characters in all)",
        ),
        ({"LOG_DIR": ""}, 'LOG_DIR="" is invalid: must name a folder'),
        ({"LOG_KEEP": "1001"}, 'LOG_KEEP="1001" is invalid: expected an integer from 0 to 1000'),
        (
            {"STOP_TIMEOUT": "30"},
            'STOP_TIMEOUT="30" is invalid: must exceed SHUTDOWN_DRAIN (30 s), '
            "or in-flight requests are killed mid-drain",
        ),
        ({"EXTRA_VLLM_ARGS": "--a\tb"}, 'EXTRA_VLLM_ARGS="--a\tb" is invalid: printable characters only'),
        ({"PID_FILE": "a\nb"}, 'PID_FILE="a\nb" is invalid: a file path, or empty for $LOG_DIR/service.pid'),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting_and_what_it_allows(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(load(env, os.devnull))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "env",
    [
        {"TOP_K": "-1", "QUANTIZATION": "fp8", "MAX_NUM_BATCHED_TOKENS": "", "EXTRA_ROUTES": "all"},
        {"EXTRA_ROUTES": "/tokenize, /v1/completions", "ALLOWED_HOSTS": "a.example.com,b.example.com"},
        {"PORT": "8003", "GPU_MEMORY_UTIL": "1", "TEMPERATURE": "0", "TOP_P": "0.5", "MOE_CONFIG_DIR": ""},
        {
            "UNIX_SOCKET": "/run/captioner/api.sock",
            "PID_FILE": "/run/captioner/pid",
            "VLLM_PYTHON": "python3",
        },
    ],
)
def test_the_values_each_rule_allows_pass(env: dict[str, str]) -> None:
    validate(load(env, os.devnull))


def test_a_script_validates_only_what_it_names_and_what_those_rules_read_first() -> None:
    values = load({"PORT": "x", "SHUTDOWN_DRAIN": "x", "STOP_TIMEOUT": "5"}, os.devnull)
    validate(values, ["LOG_DIR", "PID_FILE"])
    with pytest.raises(ConfigError, match='^SHUTDOWN_DRAIN="x" is invalid'):
        validate(values, ["STOP_TIMEOUT"])
    with pytest.raises(ConfigError, match="no such setting: PROT"):
        validate(values, ["PROT"])


def test_the_guard_reads_each_setting_under_one_name_that_config_py_exports() -> None:
    read = set()
    for source in (ROOT / "captioner_server").glob("*.py"):
        read |= set(re.findall(rf'"{GUARD_PREFIX}([A-Z_]+)"', source.read_text()))
    assert read == set(GUARD_SETTINGS)
    env = dict(item.split("=", 1) for item in derive(load({"MODEL_PATH": "m"}, os.devnull))["GUARD_ENV"])
    assert env[f"{GUARD_PREFIX}MODEL_PATH"] == f"{ROOT}/m"
    assert env[f"{GUARD_PREFIX}MAX_TOKENS"] == schema()["MAX_TOKENS"].default


@pytest.mark.parametrize(("host", "listed", "allowed"), [
    ("10.0.0.5", "", "10.0.0.5"),
    ("10.0.0.5", "gpu.example", "gpu.example,10.0.0.5"),
    ("fd00::5", "", "fd00::5"),
    ("127.0.0.1", "gpu.example", "gpu.example"),
    ("0.0.0.0", "", ""),
    ("::", "", ""),
])
def test_a_server_bound_to_one_address_takes_that_address_in_the_host_header(
        host: str, listed: str, allowed: str) -> None:
    # start and status reach it at that address: the guard once answered their /health 421.
    values = load({"MODEL_PATH": "m", "HOST": host, "ALLOWED_HOSTS": listed}, os.devnull)
    derived = derive(values)
    env = dict(item.split("=", 1) for item in derived["GUARD_ENV"])
    assert env[f"{GUARD_PREFIX}ALLOWED_HOSTS"] == allowed
    reached = str(derived["HTTP_URL"]).removeprefix("http://")
    assert host_allowed(reached.encode(), guard_settings(env).allowed_hosts)


@pytest.mark.parametrize(("name", "value", "written"), [
    ("TEMPERATURE", ".6", "0.6"), ("TOP_P", "00.95", "0.95"),
    ("MAX_TOKENS", "0100", "100"), ("TOP_K", "020", "20"),
])
def test_a_number_json_cannot_read_is_refused_with_how_to_write_it(
        name: str, value: str, written: str) -> None:
    # start_service.sh puts the sampling settings into --override-generation-config as they are:
    # {"temperature":.6} is no JSON, and vLLM died at start after every value had been "checked".
    with pytest.raises(ConfigError) as caught:
        validate(load({"MODEL_PATH": "m", name: value}, os.devnull), [name])
    assert str(caught.value) == (f'{name}="{value}" is invalid: write it as {written} '
                                 "(no leading zero or bare point: it goes into JSON)")
    validate(load({"MODEL_PATH": "m", name: written}, os.devnull), [name])
