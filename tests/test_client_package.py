"""The client as a package: its public names, the exit codes' one home, one captioning path (no server)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import captioner
from captioner.cli import main
from captioner.errors import ExitCode
from captioner.options import build_parser
from tests.test_client_support import StubServer, tone, write_wav

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("client_env_cleared")


def test_every_public_name_loads_from_the_module_that_defines_it() -> None:
    tree = ast.parse(Path(captioner.__file__).read_text())
    homes = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
        if node.module.startswith("captioner.")
    }
    assert sorted(homes) == sorted(n for n in captioner.__all__ if n != "__version__")
    for name, module in homes.items():
        assert getattr(captioner, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'ClientRing'"):
        captioner.ClientRing  # noqa: B018


def test_the_command_lines_help_needs_none_of_the_client_packages() -> None:
    # test_client.py answers --help from captioner.options when requests, numpy, PyAV are missing.
    packages = "{'requests', 'numpy', 'av', 'tqdm'}"
    code = f"import sys, captioner, captioner.options; print(sorted({packages} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


def test_help_lists_every_exit_code_with_its_meaning_from_the_enum() -> None:
    help_text = " ".join(build_parser().format_help().split())
    listed = help_text[help_text.index("exit codes: ") :]
    assert listed == "exit codes: " + ", ".join(f"{code.value} {code.meaning}" for code in ExitCode)


def readme_exit_codes() -> list[int]:
    """The codes of README's client exit-code table (`### Errors and exit codes`), in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Errors and exit codes") :]
    section = section[: section.index("\n#", 1)]
    return [int(m) for m in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)]


def test_readmes_exit_code_table_lists_the_enums_codes_in_order() -> None:
    assert readme_exit_codes() == [code.value for code in ExitCode]


def test_a_streamed_long_input_prints_its_windows_one_after_another_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(75))  # three 30-s windows at most
    sent: list[int] = []

    def caption_by_window(body: object) -> None:
        sent.append(len(sent) + 1)
        stub.caption = f"window {len(sent)} of three"

    # Slow pieces and -c 4: were the windows sent at once, their words would interleave.
    with StubServer(chunk_delay=0.05, on_request=caption_by_window) as stub:
        assert main([str(clip), "--base-url", stub.base_url, "--stream", "-c", "4"]) == ExitCode.OK
    assert len(sent) == 3 and all(request["stream"] is True for request in stub.requests)
    assert capsys.readouterr().out == "window 1 of three window 2 of three window 3 of three\n"
