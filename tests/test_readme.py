"""README.md is the manual: its commands exist and its curl example works against the real server.
The first screen's commands (clone to a caption, on the GPU host and from a laptop) are each run
against the real server or checked here. The docs that README's long sections moved to
(MOVED_DOCS) are held to the same checks, and every link of these files resolves.
(The client chapter's commands are run by test_client_docs.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ROOT, SAMPLE, Service
from tests.test_client_support import parse_srt

README = (ROOT / "README.md").read_text()
# The sections README.md keeps as a summary and a link: what they held is checked as README's is.
MOVED_DOCS = [ROOT / "docs" / name for name in ("INSTALL.md", "SECURITY.md", "PREDECESSOR.md")]
ALL_DOCS = README + "".join(path.read_text() for path in MOVED_DOCS)
FIRST_SCREEN = README.split("\n## From clone to a caption\n", 1)[1].split("\n## ", 1)[0]


def bash_block_under(heading: str, holding: str = "") -> str:
    """The first ```bash block under `heading` (in its section) that holds `holding`."""
    section = re.split(r"^#{2,4} ", README.split(heading, 1)[1], flags=re.M)[0]  # (a bash comment is "# ")
    return next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if holding in b)


def first_screen_commands() -> list[str]:
    """Each line of the first screen's ```bash blocks, its comment dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", FIRST_SCREEN, re.S)
    return [re.sub(r"\s+#\s.*$", "", line).strip() for b in blocks for line in b.splitlines() if line.strip()]


def is_caption_command(command: str) -> bool:
    return command.startswith(".venv/bin/python test_client.py") or command.startswith("curl ")


def test_every_make_target_the_readme_names_exists() -> None:
    assert {"demo", "test", "install", "model"} <= set(
        re.findall(r"(?:^|`)make ([a-z][a-z-]*)", README, re.M)
    )
    targets = set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", ALL_DOCS, re.M))
    makefile = (ROOT / "Makefile").read_text()
    for t in targets:
        assert re.search(rf"^{t}:", makefile, re.M), (
            f"make {t} is in README.md or its docs but not in the Makefile"
        )


@pytest.mark.parametrize("script", sorted(set(re.findall(r"\./([a-z_]+\.sh)", ALL_DOCS))))
def test_every_script_the_readme_names_exists_and_has_help(script: str) -> None:
    r = subprocess.run([str(ROOT / script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Usage:" in r.stdout


def run_bash(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A README block as a user pastes it: bash, stopping at the first failing command."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_config_table_lists_every_variable_of_config_env_example() -> None:
    names = re.findall(r"^([A-Z_]+)=", (ROOT / "config.env.example").read_text(), re.M)
    for name in names:
        assert f"`{name}`" in README, f"{name} is missing from README.md's configuration table"


def test_every_first_screen_command_is_run_by_a_test_or_checked_here() -> None:
    """The caption commands run in the next test; every other line is one of the kinds below."""
    port = re.search(r"^PORT=(\d+)", (ROOT / "config.env.example").read_text(), re.M)
    assert port
    client_hint = re.search(r"pip install ([a-z ]+)\\n", (ROOT / "test_client.py").read_text())
    assert client_hint
    name = re.search(r'^name = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert name
    makefile = (ROOT / "Makefile").read_text()
    commands = first_screen_commands()
    for command in commands:
        if is_caption_command(command):
            continue
        if m := re.fullmatch(r"make ([a-z-]+)", command):
            assert re.search(rf"^{m.group(1)}:", makefile, re.M), command
        elif m := re.fullmatch(r"\./([a-z_]+\.sh)", command):
            assert os.access(ROOT / m.group(1), os.X_OK), command  # its --help: the test above
        elif command == "$EDITOR config.env":
            assert (ROOT / "config.env").is_file()
        elif m := re.fullmatch(r"git clone <the kit's git URL> ([\w-]+) && cd ([\w-]+)", command):
            assert m.group(1) == m.group(2) == name.group(1), command  # (the URL is where you got the kit)
        elif m := re.fullmatch(r"python3 -m venv \.venv && \.venv/bin/pip install ([a-z ]+)", command):
            # The laptop installs what the client names when a package is missing: its dependencies.
            assert m.group(1) == client_hint.group(1), command
            deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
            assert deps
            needed = {re.split(r"[<>=\[]", d)[0] for d in re.findall(r'"([^"]+)"', deps.group(1))}
            assert needed - set(m.group(1).split()) <= {"urllib3"}, command  # requests brings urllib3
        elif m := re.fullmatch(r"ssh -N -L (\d+):127\.0\.0\.1:(\d+) gpu-host", command):
            assert m.group(1) == m.group(2) == port.group(1), command  # the laptop's end is the default URL
        else:
            pytest.fail(f"the first screen's {command!r} is neither run by a test nor checked here")
    host, laptop = FIRST_SCREEN.split("\n### From a laptop\n")
    for part in (host, laptop):  # each path captions with the client and with curl
        part_commands = [c for b in re.findall(r"```bash\n(.*?)```", part, re.S) for c in b.splitlines()]
        assert any("test_client.py" in c for c in part_commands) and any(
            c.startswith("curl ") for c in part_commands
        )
    assert "./stop_service.sh" in commands


@pytest.mark.server
def test_the_first_screen_captions_on_the_host_and_the_laptop(server: Service, tmp_path: Path) -> None:
    """Run as on the host (the kit's folder) and as on a laptop (a tunnel to :8003: the test server)."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "sample.wav").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "recording.wav").write_bytes(SAMPLE.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.pop("API_KEY", None)
    env.update(CAPTIONER_BASE_URL=server.base_url, CAPTIONER_CONFIG=os.devnull)
    python = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'test_client.py'))}"
    ran = [c for c in first_screen_commands() if is_caption_command(c)]
    assert len(ran) == 4
    for command in ran:
        line = command.replace(".venv/bin/python test_client.py", python).replace(
            "http://127.0.0.1:8003", server.base_url
        )
        r = run_bash(line, tmp_path, env)
        assert r.returncode == 0, (command, r.stderr)
        if command.startswith("curl "):
            assert isinstance(json.loads(r.stdout)["text"], str), (command, r.stdout)
        else:
            # One caption line; a random model may say nothing (EOS first), so only its end is sure.
            assert r.stdout.endswith("\n") and "Traceback" not in r.stderr, (command, r.stdout, r.stderr)


def github_anchors(text: str) -> set[str]:
    """The #fragments GitHub gives the headings of a Markdown file."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#{1,6} (.+)$", text, re.M)
    }


@pytest.mark.parametrize("doc", [ROOT / "README.md", *MOVED_DOCS], ids=lambda p: p.name)
def test_every_link_resolves(doc: Path) -> None:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, fragment = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: {link} names no file"
        if fragment and target.suffix == ".md":
            assert fragment in github_anchors(target.read_text()), f"{doc.name}: {link} names no heading"


@pytest.mark.server
def test_the_readme_curl_example_returns_a_chat_completion(server: Service, tmp_path: Path) -> None:
    block = bash_block_under("### Caption with curl")
    block = (
        block.replace("http://127.0.0.1:8003", server.base_url)
        .replace('"Qwen3-Omni-30B-A3B-Captioner"', f'"{server.model}"')
        .replace("/tmp/caption-request.json", str(tmp_path / "req.json"))
    )
    r = run_bash(block, ROOT)
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
    r = run_bash(block, tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert all(cue[:2] == ("00:00:00,000", "00:00:05,578") for cue in parse_srt(r.stdout)), r.stdout
