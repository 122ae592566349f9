"""One identity per input, and what an output file keeps (issue #20, item 2; stub server).

Stdin is known by its content's hash, a file by its real path and shown by the path as given,
`-o` through a symlink writes the file it points to; a text batch marks a failed input in place;
`.jsonl` gathers runs while `.json` is one run's document.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from captioner.cli import main
from captioner.errors import ExitCode
from tests.service import ROOT
from tests.test_client_support import StubServer, folder_of, tone, write_wav

pytestmark = pytest.mark.usefixtures("client_env_cleared")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def pipe(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """What `test_client.py - < FILE` reads."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_two_clips_from_stdin_into_one_jsonl_are_two_records_and_a_third_pipe_of_the_first_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_wav(tmp_path / "a.wav", tone(1, 300)).read_bytes()
    b = write_wav(tmp_path / "b.wav", tone(1, 500)).read_bytes()
    out = tmp_path / "all.jsonl"
    with StubServer() as stub:
        for data in (a, b, a):
            pipe(monkeypatch, data)
            assert main(["-", "-o", str(out), "--base-url", stub.base_url]) == ExitCode.OK
    assert len(stub.requests) == 2  # the third run found its clip done
    records = lines(out)
    assert [(r["source"], r["sha256"], r["path"]) for r in records] == [
        ("-", hashlib.sha256(a).hexdigest(), None),
        ("-", hashlib.sha256(b).hexdigest(), None),
    ]


def test_files_linked_into_a_blob_store_keep_the_users_names_and_resume_by_the_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blobs = tmp_path / "store" / "blobs"  # as the Hugging Face cache, git-annex or DVC keep files
    blobs.mkdir(parents=True)
    names = {"rain.wav": 300, "birds.wav": 500}
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    for name, freq in names.items():
        blob = write_wav(blobs / hashlib.sha256(name.encode()).hexdigest(), tone(1, freq))
        (recordings / name).symlink_to(os.path.relpath(blob, recordings))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    with StubServer() as stub:
        assert main(["recordings", "-o", str(out), "--base-url", stub.base_url]) == ExitCode.OK
        assert main(["recordings/", "--base-url", stub.base_url]) == ExitCode.OK  # text to stdout
        # The same files by other names: the blobs are done, nothing is sent again.
        again = [str(recordings / "rain.wav"), *map(str, blobs.iterdir())]
        assert main([*again, "-o", str(out), "--base-url", stub.base_url]) == ExitCode.OK
    assert len(stub.requests) == 4
    shown = sorted((r["source"], Path(r["path"]).parent) for r in lines(out))
    assert shown == [("recordings/birds.wav", blobs.resolve()), ("recordings/rain.wav", blobs.resolve())]
    headers = [x for x in capsys.readouterr().out.splitlines() if x.startswith("# ")]
    assert headers == ["# recordings/birds.wav", "# recordings/rain.wav"]


@pytest.mark.parametrize("name", ["captions.jsonl", "captions.json", "captions.srt"])
def test_an_output_through_a_symlink_writes_the_file_it_points_to_and_the_link_stays(
    tmp_path: Path, name: str
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / name
    link = tmp_path / name
    link.symlink_to(Path("store") / name)
    with StubServer() as stub:
        assert main([str(clip), "-o", str(link), "--base-url", stub.base_url]) == ExitCode.OK
    assert link.is_symlink() and os.readlink(link) == str(Path("store") / name)
    assert target.is_file() and "a stub caption" in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.wav", "store", name])
    assert sorted(p.name for p in target.parent.iterdir()) == [name]  # no .partial.jsonl left


@pytest.mark.parametrize(
    ("name", "locked"), [("out.jsonl", "out.jsonl"), ("out.json", "out.json.partial.jsonl")]
)
def test_the_lock_of_an_output_through_a_symlink_is_the_one_of_the_file_it_points_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, locked: str
) -> None:
    clip = write_wav(tmp_path / "clip.wav", tone(1))
    (tmp_path / "store").mkdir()
    (tmp_path / name).symlink_to(tmp_path / "store" / name)
    # Another run, writing the same file by its own name, holds the lock its state file takes.
    holder = os.open(tmp_path / "store" / locked, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with StubServer() as stub:
            code = main([str(clip), "-o", str(tmp_path / name), "--base-url", stub.base_url])
    finally:
        os.close(holder)
    assert code == ExitCode.USAGE and stub.requests == []
    assert f"--output {tmp_path / name}: another run is writing this file" in capsys.readouterr().err


def test_a_text_batch_marks_a_failed_input_in_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 3)
    (folder / "01.wav").write_bytes(b"not audio" * 20)
    with StubServer() as stub:
        assert main([str(folder), "--base-url", stub.base_url]) == ExitCode.FAILURES
    captured = capsys.readouterr()
    assert captured.out.split("\n\n") == [
        f"# {folder}/00.wav\na stub caption",
        f"# {folder}/01.wav: failed: cannot decode audio: Invalid data found when processing input",
        f"# {folder}/02.wav\na stub caption\n",
    ]
    assert f"captioner: error: {folder}/01.wav: cannot decode audio: Invalid data found" in captured.err


def test_a_jsonl_output_gathers_runs_while_a_json_output_is_one_runs_document(tmp_path: Path) -> None:
    a = write_wav(tmp_path / "a.wav", tone(1, 300))
    b = write_wav(tmp_path / "b.wav", tone(1, 500))
    with StubServer() as stub:
        for out in (tmp_path / "all.jsonl", tmp_path / "last.json"):
            for clip in (a, b):
                assert main([str(clip), "-o", str(out), "--base-url", stub.base_url]) == ExitCode.OK
    assert [r["source"] for r in lines(tmp_path / "all.jsonl")] == [str(a), str(b)]
    assert json.loads((tmp_path / "last.json").read_text())["source"] == str(b)


def test_a_file_url_is_the_local_file_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = write_wav(tmp_path / "my clip.wav", tone(1))
    url = "file://" + str(clip).replace(" ", "%20")
    with StubServer() as stub:
        assert main([url, "-f", "json", "--base-url", stub.base_url]) == ExitCode.OK
        assert main(["file://elsewhere/clip.wav", "--base-url", stub.base_url]) == ExitCode.INPUT
        assert main([f"file://{tmp_path}/missing.wav", "--base-url", stub.base_url]) == ExitCode.INPUT
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert (record["source"], record["path"]) == (url, str(clip.resolve()))
    assert len(stub.requests) == 1  # read by the client: the server never sees a file:// URL
    assert "file://elsewhere/clip.wav: a file:// URL names a file on this machine" in captured.err
    assert f"file://{tmp_path}/missing.wav: no such file or folder" in captured.err


def test_a_hard_link_is_the_same_input_as_its_file_captioned_once_under_the_first_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 2)
    os.link(folder / "00.wav", folder / "99-hard-link.wav")
    with StubServer() as stub:
        code = main([str(folder), str(folder / "99-hard-link.wav"), "--base-url", stub.base_url])
    assert code == ExitCode.OK
    assert len(stub.requests) == 2
    headers = [x for x in capsys.readouterr().out.splitlines() if x.startswith("# ")]
    assert headers == [f"# {folder}/00.wav", f"# {folder}/01.wav"]


@pytest.mark.parametrize("how", ["the same name", "a symlink", "a hard link"])
@pytest.mark.parametrize("name", ["clip.wav", "clip.json"])
def test_an_output_that_is_one_of_the_inputs_is_refused_before_anything_is_sent_and_the_audio_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, name: str
) -> None:
    clip = write_wav(tmp_path / name, tone(1))
    audio = clip.read_bytes()
    output = clip if how == "the same name" else tmp_path / "out.json"
    if how == "a symlink":
        output.symlink_to(clip)
    elif how == "a hard link":
        os.link(clip, output)
    with StubServer() as stub:
        code = main([str(clip), "-f", "json", "-o", str(output), "--base-url", stub.base_url])
    assert (code, stub.requests) == (ExitCode.USAGE, [])
    err = capsys.readouterr().err
    assert err == f"captioner: error: --output {output}: is one of the inputs; give another file name\n"
    assert clip.read_bytes() == audio


def test_a_pipe_named_as_a_path_is_refused_in_one_line_that_says_to_pipe_it_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "clip.fifo"  # what `<(cat clip.wav)` hands over is such a pipe, by /dev/fd/N
    os.mkfifo(fifo)
    with StubServer() as stub:
        code = main([str(fifo), "--base-url", stub.base_url])
    assert (code, stub.requests) == (ExitCode.INPUT, [])
    assert capsys.readouterr().err == (
        f"captioner: error: {fifo}: not a regular file; pipe it in instead: ... | test_client.py -\n"
    )


def test_a_subfolder_the_user_cannot_read_stops_the_run_before_anything_is_sent(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 2)
    locked = folder / "locked"
    locked.mkdir()
    write_wav(locked / "hidden-from-us.wav", tone(1))
    locked.chmod(0)
    # Root reads every folder: drop the capabilities that let it, as an ordinary account has none.
    caps = "-dac_override,-dac_read_search"
    as_user = [] if os.geteuid() != 0 else ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    try:
        with StubServer() as stub:
            result = subprocess.run([*as_user, sys.executable, str(ROOT / "test_client.py"), str(folder),
                                     "--base-url", stub.base_url], capture_output=True, text=True, timeout=60)
    finally:
        locked.chmod(0o755)
    assert (result.returncode, stub.requests) == (ExitCode.INPUT, [])
    assert result.stderr == f"captioner: error: {locked}: cannot read this folder: Permission denied\n"
