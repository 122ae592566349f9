"""README.md is the manual: its commands exist and its curl example works against the real server.
(The client chapter's commands are run by test_client_docs.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.service import ROOT, Service
from tests.test_client_support import parse_srt

README = (ROOT / "README.md").read_text()


def bash_block_under(heading: str, holding: str = "") -> str:
    """The first ```bash block under `heading` (in its section) that holds `holding`."""
    section = re.split(r"^#{2,4} ", README.split(heading, 1)[1], flags=re.M)[0]  # (a bash comment is "# ")
    return next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if holding in b)


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", README, re.M))
    makefile = (ROOT / "Makefile").read_text()
    assert {"demo", "test", "install", "model"} <= targets
    for t in targets:
        assert re.search(rf"^{t}:", makefile, re.M), f"make {t} is in README.md but not in the Makefile"


@pytest.mark.parametrize("script", sorted(set(re.findall(r"\./([a-z_]+\.sh)", README))))
def test_every_script_the_readme_names_exists_and_has_help(script: str) -> None:
    r = subprocess.run([str(ROOT / script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_the_config_table_lists_every_variable_of_config_env_example() -> None:
    names = re.findall(r"^([A-Z_]+)=", (ROOT / "config.env.example").read_text(), re.M)
    for name in names:
        assert f"`{name}`" in README, f"{name} is missing from README.md's configuration table"


@pytest.mark.server
def test_the_readme_curl_example_returns_a_chat_completion(server: Service, tmp_path: Path) -> None:
    block = bash_block_under("### Caption with curl")
    block = (block.replace("http://127.0.0.1:8003", server.base_url)
             .replace('"Qwen3-Omni-30B-A3B-Captioner"', f'"{server.model}"')
             .replace("/tmp/caption-request.json", str(tmp_path / "req.json")))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str)


@pytest.mark.server
def test_the_readme_upload_example_returns_subtitles(server: Service, tmp_path: Path) -> None:
    block = bash_block_under("### Caption with curl", "/v1/audio/transcriptions")
    (tmp_path / "clip.wav").write_bytes((ROOT / "samples" / "sample.wav").read_bytes())
    block = block.replace("http://127.0.0.1:8003", server.base_url)
    env = {**os.environ, "API_KEY": ""}  # the test server has none: the header is sent empty
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(cue[:2] == ("00:00:00,000", "00:00:05,578") for cue in parse_srt(r.stdout)), r.stdout
