"""The client as a package: the exit codes' one home (no server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.errors import ExitCode
from captioner.options import build_parser

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("client_env_cleared")


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
