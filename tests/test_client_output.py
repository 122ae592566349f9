"""Output safety, one identity per input, input order (stub server: fast, deterministic).

The same behaviours against the real server are in test_client_server.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from captioner.cli import main
from captioner.errors import ExitCode
from captioner.inputs import resolve_inputs
from captioner.payload import data_url
from tests.test_client_support import StubServer, folder_of, tone, write_wav

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("client_env_cleared")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --- output paths are checked and locked before the first request -----------------------


@pytest.mark.parametrize("name", ["captions.json", "captions.srt", "captions.jsonl", "captions.txt"])
def test_an_output_in_a_missing_folder_stops_the_run_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    out = tmp_path / "missing" / name
    with StubServer() as stub:
        assert main([str(clip), "-o", str(out), "--base-url", stub.base_url]) == ExitCode.USAGE
    assert stub.requests == []
    assert capsys.readouterr().err == (
        f"captioner: error: --output {out}: the folder {out.parent} does not exist (create it first)\n")


def test_an_output_folder_that_cannot_be_written_stops_the_run_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    with StubServer() as stub:
        assert main([str(clip), "-o", "/proc/captions.json", "--base-url", stub.base_url]) == ExitCode.USAGE
    assert stub.requests == []
    assert "captioner: error: --output /proc/captions.json: cannot write in the folder /proc" in (
        capsys.readouterr().err)


@pytest.mark.parametrize(
    ("name", "locked"), [("out.jsonl", "out.jsonl"), ("out.json", "out.json.partial.jsonl")])
def test_a_second_run_on_an_output_another_run_holds_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, locked: str
) -> None:
    folder = folder_of(tmp_path, 2)
    out = tmp_path / name
    holder = os.open(tmp_path / locked, os.O_RDWR | os.O_CREAT)  # what the first run holds
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with StubServer() as stub:
            assert main([str(folder), "-o", str(out), "--base-url", stub.base_url]) == ExitCode.USAGE
    finally:
        os.close(holder)
    assert stub.requests == [] and (tmp_path / locked).read_bytes() == b""
    assert "another run is writing this file" in capsys.readouterr().err
    with StubServer() as stub:  # released: the same command runs
        assert main([str(folder), "-o", str(out), "--base-url", stub.base_url]) == ExitCode.OK
    assert len(stub.requests) == 2


def test_two_runs_at_once_on_one_jsonl_write_each_input_once(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    with StubServer(delay=0.2) as stub:
        command = client_command(str(folder), "-o", str(out), "--base-url", stub.base_url, "-c", "1")
        runs = [subprocess.Popen(command, env=client_env(), stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        codes = sorted(r.wait(timeout=120) for r in runs)
    assert codes == [ExitCode.OK, ExitCode.USAGE]  # the second is refused, not interleaved
    assert sorted(r["source"] for r in lines(out)) == sorted(str(p) for p in folder.iterdir())
    assert len(stub.requests) == 6


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.pop("API_KEY", None)
    env["CAPTIONER_CONFIG"] = os.devnull
    return env


def client_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "test_client.py"), *args]


# --- progressive writes: an interrupt or a fatal error keeps what was done ---------------


@pytest.mark.parametrize("fmt", ["json", "txt"])
def test_ctrl_c_keeps_finished_records_says_what_is_left_and_the_same_command_resumes(
    tmp_path: Path, fmt: str
) -> None:
    folder = folder_of(tmp_path, 6)
    out = tmp_path / f"captions.{fmt}"
    state = tmp_path / f"captions.{fmt}.partial.jsonl"
    with StubServer(delay=0.3) as stub:
        args = (str(folder), "-o", str(out), "--base-url", stub.base_url, "-c", "1")
        first = subprocess.Popen(client_command(*args), env=client_env(), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (state.exists() and state.read_text().count("\n") >= 2):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        assert first.returncode == ExitCode.INTERRUPTED
        assert not out.exists()
        kept = lines(state)
        done = len(kept)
        assert 2 <= done < 6
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"captioner: error: interrupted: {done} of 6 inputs done, 0 failed, "
                               f"{6 - done} left; resume with: ")
        assert last.endswith("test_client.py " + " ".join(args)) and "Traceback" not in err
        sent = len(stub.requests)

        second = subprocess.run(client_command(*args), env=client_env(), capture_output=True, text=True,
                                timeout=120)
    assert second.returncode == ExitCode.OK, second.stderr
    assert len(stub.requests) - sent == 6 - done  # nothing captioned twice
    assert not state.exists() and out.exists()
    if fmt == "json":
        in_order = [str(p) for p in sorted(folder.iterdir())]
        assert [r["source"] for r in json.loads(out.read_text())] == in_order
    else:
        headers = [x for x in out.read_text().splitlines() if x.startswith("# ")]
        assert headers == [f"# {p}" for p in sorted(folder.iterdir())]


def test_a_fatal_error_keeps_finished_records_and_names_the_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 4)
    out = tmp_path / "captions.json"
    refused = (401, {"error": {"message": "Unauthorized"}})
    with StubServer(replies=[(200, completion_body()), refused]) as stub:
        args = [str(folder), "-o", str(out), "--base-url", stub.base_url, "-c", "1"]
        assert main(args) == ExitCode.HTTP_4XX
    state = tmp_path / "captions.json.partial.jsonl"
    assert [r["error"] is None for r in lines(state)] == [True, False]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("captioner: error: batch stopped: 1 of 4 inputs done, 1 failed, 2 left; "
                           "resume with: ")
    assert last.endswith(" ".join(args))


@pytest.mark.parametrize("given", [["--api-key", "sk-live-SECRET"], ["--api-key=sk-live-SECRET"]])
def test_the_resume_line_of_a_stopped_batch_shows_the_api_key_as_a_placeholder_never_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: list[str]
) -> None:
    folder = folder_of(tmp_path, 3)
    out = tmp_path / "captions.jsonl"
    refused = (401, {"error": {"message": "Unauthorized"}})
    with StubServer(replies=[refused]) as stub:
        args = [str(folder), "-o", str(out), "--base-url", stub.base_url, "-c", "1", *given]
        assert main(args) == ExitCode.HTTP_4XX
    err = capsys.readouterr().err
    assert "sk-live-SECRET" not in err
    shown = ["--api-key", "'<KEY>'"] if len(given) == 2 else ["'--api-key=<KEY>'"]
    assert err.strip().splitlines()[-1].endswith(" ".join([*args[:-len(given)], *shown]))


@pytest.mark.parametrize("key", ["sk-live-SECRET\r", "sk-live SECRET", "sk-live-SECRET\n"])
def test_an_api_key_with_a_space_or_a_control_character_is_refused_before_any_request_and_not_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    clip = folder_of(tmp_path, 1) / "00.wav"
    monkeypatch.setenv("CAPTIONER_API_KEY", key)  # `$(cat key.txt)` of a file saved on Windows
    with StubServer() as stub:
        assert main([str(clip), "--base-url", stub.base_url]) == ExitCode.USAGE
    assert stub.requests == []
    assert capsys.readouterr().err == (
        "captioner: error: CAPTIONER_API_KEY: the API key holds a space or a control character "
        "(a line end copied from a file?); give the key alone\n"
    )


def completion_body() -> dict[str, Any]:
    from tests.test_client_support import completion

    return completion("first")


# --- one identity per input -------------------------------------------------------------


def test_one_file_named_three_ways_is_one_input_shown_by_the_first_name_known_by_its_real_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.wav").symlink_to(clip)
    monkeypatch.chdir(tmp_path / "sub")
    items = resolve_inputs(["../clip.wav", str(tmp_path / "link.wav"), str(clip), "../sub/../clip.wav"])
    assert [(i.source, i.key) for i in items] == [("../clip.wav", os.path.realpath(clip))]


def test_a_folder_with_a_symlink_loop_yields_each_real_file_once(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 3)
    (folder / "deeper").mkdir()
    write_wav(folder / "deeper" / "x.wav", tone(1))
    (folder / "deeper" / "loop").symlink_to(folder)  # deeper/loop/deeper/loop/...
    (folder / "again").symlink_to(folder / "deeper")
    (folder / "x-link.wav").symlink_to(folder / "deeper" / "x.wav")
    items = resolve_inputs([str(folder), str(folder / "deeper")])
    real = [str(folder / f"{i:02d}.wav") for i in range(3)] + [str(folder / "deeper" / "x.wav")]
    assert sorted(i.key for i in items) == sorted(real) and len(items) == 4
    # Shown by the first name met: x.wav is reached first through the link beside the clips.
    assert [i.source for i in items][3] == str(folder / "x-link.wav")
    with StubServer() as stub:
        assert main([str(folder), "-f", "jsonl", "--base-url", stub.base_url]) == ExitCode.OK
    assert len(stub.requests) == 4


# --- input order, identical error text, plural ------------------------------------------


def slow_first(body: dict[str, Any], slow_url: str) -> None:
    if body["messages"][0]["content"][0]["audio_url"]["url"] == slow_url:
        time.sleep(0.6)


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_stdout_is_in_input_order_though_the_first_input_finishes_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    folder = folder_of(tmp_path, 4)
    first = sorted(folder.iterdir())[0]
    slow_url = data_url(first.read_bytes())
    with StubServer(on_request=lambda body: slow_first(body, slow_url)) as stub:
        assert main([str(folder), "-f", fmt, "-c", "4", "--base-url", stub.base_url]) == ExitCode.OK
    out = capsys.readouterr().out
    if fmt == "text":
        shown = [x[2:] for x in out.splitlines() if x.startswith("# ")]
    else:
        shown = [json.loads(x)["source"] for x in out.splitlines()]
    assert shown == [str(p) for p in sorted(folder.iterdir())]


def test_jsonl_file_ends_in_input_order_though_records_arrive_in_completion_order(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 4)
    first = sorted(folder.iterdir())[0]
    slow_url = data_url(first.read_bytes())
    out = tmp_path / "out.jsonl"
    with StubServer(on_request=lambda body: slow_first(body, slow_url)) as stub:
        assert main([str(folder), "-o", str(out), "-c", "4", "--base-url", stub.base_url]) == ExitCode.OK
    assert [r["source"] for r in lines(out)] == [str(p) for p in sorted(folder.iterdir())]


def test_a_failed_inputs_error_in_jsonl_is_word_for_word_what_stderr_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 2)
    (folder / "bad.wav").write_bytes(b"not audio" * 20)
    out = tmp_path / "out.jsonl"
    with StubServer(replies=[(400, {"error": {"message": "Invalid or corrupted audio data."}})]) as stub:
        code = main([str(folder), "-o", str(out), "-c", "1", "--base-url", stub.base_url])
    assert code == ExitCode.FAILURES
    errors = [r["error"] for r in lines(out) if r["error"]]
    said = [x[len("captioner: error: "):] for x in capsys.readouterr().err.splitlines()
            if x.startswith("captioner: error: ")]
    assert len(errors) == 2 and sorted(errors) == sorted(said)


def test_one_input_is_counted_as_1_file_not_1_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    with StubServer() as stub:
        assert main([str(clip), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url]) == 0
    assert "captioner: 1 file: 1 captioned, 0 failed" in capsys.readouterr().err


# --- the command line's edges: imports, missing packages, a long file's progress ----------

SLOW_IMPORT = """
import pathlib, sys, time
READY = pathlib.Path(sys.argv[1])
class SlowNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            READY.touch()
            time.sleep(60)
sys.meta_path.insert(0, SlowNumpy())
sys.argv = ["test_client.py", "--help"]
exec(compile(open("test_client.py").read(), "test_client.py", "exec"), {"__name__": "__main__"})
"""


def test_ctrl_c_while_the_client_is_still_importing_exits_130_in_one_line(tmp_path: Path) -> None:
    ready = tmp_path / "importing"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT, str(ready)], cwd=REPO, env=client_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (ExitCode.INTERRUPTED, "captioner: error: interrupted\n")


WITHOUT_PACKAGES = (
    "import sys; [sys.modules.__setitem__(m, None) for m in ('av', 'numpy', 'requests', 'tqdm', 'urllib3')]; "
    "sys.argv = ['test_client.py', *sys.argv[1:]]; "
    "exec(compile(open('test_client.py').read(), 'test_client.py', 'exec'), {'__name__': '__main__'})"
)


def without_packages(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_PACKAGES, *args], cwd=REPO, env=client_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "-h", "--he", "--version"])
def test_help_and_version_need_none_of_the_clients_packages(flag: str) -> None:
    r = without_packages(flag)
    assert (r.returncode, r.stderr) == (0, "")
    with_them = subprocess.run([sys.executable, "test_client.py", flag], cwd=REPO, env=client_env(),
                               capture_output=True, text=True, timeout=60)
    assert r.stdout == with_them.stdout and r.stdout.startswith("usage: " if flag != "--version" else "test_")


def test_a_usage_error_without_the_clients_packages_is_still_a_usage_error() -> None:
    r = without_packages("clip.wav", "--retries", "-5")
    assert r.returncode == ExitCode.USAGE and "--retries: must be 0 or more, got -5" in r.stderr


@pytest.mark.parametrize("args", [["clip.wav"], []])
def test_a_python_without_the_clients_packages_gets_a_one_line_install_hint(args: list[str]) -> None:
    r = without_packages(*args)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"captioner: error: this Python ({sys.executable}) lacks the package 'tqdm'; run the "
                        "client with the kit's .venv/bin/python (./install.sh makes it), or: pip install "
                        "requests av numpy tqdm\n")


def test_one_long_file_shows_a_progress_bar_over_its_windows_on_a_terminal(tmp_path: Path) -> None:
    import pty

    clip = write_wav(tmp_path / "long.wav", tone(100))  # four 30 s windows
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0x0
    with StubServer(delay=0.3) as stub:
        proc = subprocess.Popen(client_command(str(clip), "--base-url", stub.base_url, "-c", "1"),
                                env=client_env(), stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        proc.wait(timeout=60)
    os.close(controller)
    assert proc.returncode == 0
    assert b"4/4" in shown and b"window" in shown
