"""Run every client command and the Python examples of README.md (and of the docs its long
sections moved to) against the real server.

Commands are the `$ ` lines of the ```console blocks; a trailing `# exit N` is the exit code
they must give (else 0). They run in a folder holding the files the page names, with these
swaps, and nothing else changed:
  python                     -> this interpreter; test_client.py -> the kit's, by absolute path
  http://127.0.0.1:8003      -> the test server
  http://127.0.0.1:8004      -> the test server again, as localhost (a second base URL)
  https://media.example.com  -> a local http.server serving the folder's www/
and CAPTIONER_BASE_URL points at the test server (as a tunnel to :8003 would).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_client_support import convert, speech_wav, tone, write_wav

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "README.md"
# The sections README.md keeps as a summary and a link: their blocks are run as README's are.
MOVED_DOCS = [REPO / "docs" / name for name in ("INSTALL.md", "SECURITY.md", "PREDECESSOR.md")]
SAMPLE = REPO / "samples" / "sample.wav"

pytestmark = pytest.mark.server


def blocks(language: str) -> list[tuple[str, str]]:
    """(heading above it, body) of each fenced block in `language`, README.md's then the moved docs'."""
    found = []
    for doc in (DOC, *MOVED_DOCS):
        heading = "top" if doc == DOC else doc.name
        for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", doc.read_text(), re.M | re.S):
            if match.group(1):
                heading = match.group(1).lstrip("# ").strip()
            elif match.group(2) == language:
                found.append((heading, match.group(3)))
    return found


def console_blocks() -> list[Any]:
    params = []
    for heading, body in blocks("console"):
        commands = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        slug = re.sub(r"\W+", "-", heading.lower()).strip("-")
        params.append(pytest.param(commands, id=slug))
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The folder the commands run in, and the base URL standing in for media.example.com."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copy(SAMPLE, root / "clip.wav")
    write_wav(root / "long.wav", tone(75))
    speech = speech_wav(root / "speech.wav", "Recordings for the batch example.")
    (root / "recordings" / "older").mkdir(parents=True)
    shutil.copy(speech, root / "recordings" / "a.wav")
    convert(speech, root / "recordings" / "b.mp3")
    convert(speech, root / "recordings" / "older" / "c.flac")
    (root / "www").mkdir()
    shutil.copy(SAMPLE, root / "www" / "clip.wav")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root / "www"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def localize(text: str, server: Any, media: str) -> str:
    return (
        text.replace("http://127.0.0.1:8003", server.base_url)
        .replace("http://127.0.0.1:8004", server.base_url.replace("127.0.0.1", "localhost"))
        .replace("https://media.example.com", media)
    )


def test_every_documented_command_is_listed() -> None:
    commands = [c for p in console_blocks() for c in p.values[0]]
    assert len(commands) >= 10 and all(c.startswith(("python ", "CAPTIONER_")) for c in commands)


@pytest.mark.parametrize("commands", console_blocks())
def test_documented_commands_run(commands: list[str], server: Any, workdir: tuple[Path, str]) -> None:
    root, media = workdir
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.pop("API_KEY", None)
    env.update(CAPTIONER_BASE_URL=server.base_url, CAPTIONER_CONFIG=os.devnull)
    python = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'test_client.py'))}"
    for command in commands:
        expected = re.search(r"#\s*exit (\d+)\s*$", command)
        line = localize(command, server, media).replace("python test_client.py", python)
        result = subprocess.run(
            ["bash", "-c", line], cwd=root, env=env, capture_output=True, timeout=300, check=False
        )
        stderr = result.stderr.decode("utf-8", "replace")
        assert result.returncode == (int(expected.group(1)) if expected else 0), (command, stderr)
        assert "Traceback" not in stderr, (command, stderr)


@pytest.mark.parametrize(
    ("heading", "code"),
    [
        pytest.param(heading, code, id=re.sub(r"\W+", "-", heading.lower()).strip("-"))
        for heading, code in blocks("python")
    ],
)
def test_documented_openai_sdk_example_runs(
    heading: str, code: str, server: Any, workdir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(localize(code, server, workdir[1]), str(DOC), "exec"), {})
    assert out.getvalue().endswith("\n")
