"""The caption client against the real server (vLLM on the tiny model).

The tiny model's captions are random bytes, often empty, so these tests check
structure, exit codes and messages, never caption text. The client runs as a
subprocess, as operators run it: exit codes, stdout/stderr and signals are real.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from captioner.payload import chat_request, data_url
from tests.service import ENVIRON, ROOT, SAMPLE, sample_folder
from tests.test_client_support import convert, parse_srt, parse_vtt, speech_wav, tone, write_wav

MAX_TOKENS = "16"  # keeps each request about a second on CPU
FORMATS = ("wav", "mp3", "flac", "ogg", "m4a")
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8ffff3f0005fe02fea7d6a4f40000000049454e44ae426082"
)

pytestmark = pytest.mark.server


def client_env(**extra: str) -> dict[str, str]:
    """The client's environment: the run's first (ENVIRON: a client started beside another test must
    not take up what that test set), without the client's settings."""
    env = {k: v for k, v in ENVIRON.items() if not k.startswith("CAPTIONER_")}
    env.pop("API_KEY", None)
    env["CAPTIONER_CONFIG"] = os.devnull  # hermetic: not the operator's settings
    env.update(extra)
    return env


def client_command(*args: str, server: Any = None) -> list[str]:
    command = [sys.executable, str(ROOT / "test_client.py"), *args]
    if server is not None:
        command += ["--base-url", server.base_url, "--max-tokens", MAX_TOKENS]
    return command


def run_client(
    *args: str,
    server: Any = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_command(*args, server=server),
        check=False,
        input=None if stdin is None else stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="latin-1",  # captions of a random model are arbitrary bytes
        env=env or client_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wav, mp3, flac, ogg and m4a of the same speech, one in a subfolder, plus a non-audio file."""
    folder = tmp_path_factory.mktemp("mixed")
    source = speech_wav(tmp_path_factory.mktemp("src") / "speech.wav")
    (folder / "deeper").mkdir()
    for fmt in FORMATS:
        target = folder / ("deeper" if fmt == "flac" else ".") / f"speech.{fmt}"
        convert(source, target)
    (folder / "notes.txt").write_text("not audio: the folder scan skips it")
    return folder


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local http.server on 127.0.0.1 serving a fresh folder: (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_no_argument_captions_the_sample_clip(server: Any) -> None:
    result = run_client(server=server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stderr == ""
    as_json = run_client("-f", "json", server=server)
    record = json.loads(as_json.stdout)
    assert record["source"] == str(SAMPLE) and record["error"] is None
    assert record["model"] == server.model and record["duration"] > 1


def test_every_input_kind_in_one_run_file_folder_stdin_url(
    server: Any, mixed_folder: Path, file_server: tuple[str, Path], tmp_path: Path
) -> None:
    url_base, www = file_server
    shutil.copy(SAMPLE, www / "clip.wav")
    out = tmp_path / "out.jsonl"
    result = run_client(
        str(SAMPLE), str(mixed_folder), "-", f"{url_base}/clip.wav", "-o", str(out),
        server=server, stdin=(mixed_folder / "speech.ogg").read_bytes(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = {r["source"]: r for r in records(out)}
    expected = {str(SAMPLE), "-", f"{url_base}/clip.wav"} | {
        str(mixed_folder / ("deeper" if f == "flac" else ".") / f"speech.{f}").replace("/./", "/")
        for f in FORMATS
    }
    assert set(got) == expected
    for record in got.values():
        assert record["error"] is None and record["model"] == server.model
        assert record["duration"] > 1 and len(record["segments"]) == 1
        assert record["usage"]["prompt_tokens"] > 0
    assert "8 files: 8 captioned, 0 failed" in result.stderr


def test_75s_clip_is_three_windows_with_valid_srt_and_vtt(server: Any, tmp_path: Path) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(75))
    result = run_client(str(clip), "-f", "json", server=server)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0, 30), (30, 60), (60, 75)]
    assert record["duration"] == 75
    windows = {("00:00:00,000", "00:00:30,000"), ("00:00:30,000", "00:01:00,000"),
               ("00:01:00,000", "00:01:15,000")}  # fmt: skip
    srt = run_client(str(clip), "-f", "srt", "-o", str(tmp_path / "long.srt"), server=server)
    assert srt.returncode == 0, srt.stderr
    # Empty captions (common with the tiny model) give no cue, so: a subset, in order.
    cues = [(a, b) for a, b, _ in parse_srt((tmp_path / "long.srt").read_text("utf-8"))]
    assert set(cues) <= windows and cues == sorted(cues)
    vtt = run_client(str(clip), "-f", "vtt", server=server)
    assert vtt.returncode == 0, vtt.stderr
    vtt_cues = [(a.replace(".", ","), b.replace(".", ",")) for a, b, _ in parse_vtt(vtt.stdout)]
    assert set(vtt_cues) <= windows


def test_stream_prints_the_caption_and_a_final_newline(server: Any) -> None:
    result = run_client(str(SAMPLE), "--stream", server=server)
    assert (result.returncode, result.stderr) == (0, "")
    # Up to 16 tokens of a random model (it may sample EOS first: no text), then the "\n" the client adds.
    assert result.stdout.endswith("\n")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("corrupt.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)), "cannot decode audio"),
        ("empty.wav", b"", "empty input (0 bytes)"),
        ("picture.wav", PNG, "no audio stream"),
        ("missing.wav", None, "no such file or folder"),
    ],
    ids=["corrupt", "empty", "png-renamed-wav", "missing-path"],
)
def test_bad_file_exits_3_naming_it_and_a_good_request_still_succeeds(
    server: Any, tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = run_client(str(path), server=server)
    assert result.returncode == 3
    assert result.stderr.startswith(f"captioner: error: {path}") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert run_client(str(SAMPLE), server=server).returncode == 0


def test_url_that_404s_exits_3_with_the_http_status(server: Any, file_server: tuple[str, Path]) -> None:
    url = f"{file_server[0]}/nothing-here.wav"
    result = run_client(url, server=server)
    assert result.returncode == 3
    assert result.stderr == f"captioner: error: {url}: download failed: HTTP 404 File not found\n"


def test_server_fetch_of_a_404_url_exits_6_quoting_the_server(
    server: Any, file_server: tuple[str, Path]
) -> None:
    result = run_client(f"{file_server[0]}/nothing-here.wav", "--server-fetch", server=server)
    assert result.returncode == 6
    assert "server refused the request: HTTP 4" in result.stderr


def test_batch_goes_on_past_bad_files_and_exits_1(server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a_good.wav")
    (folder / "b_corrupt.wav").write_bytes(b"not audio at all" * 10)
    (folder / "c_empty.wav").write_bytes(b"")
    (folder / "d_picture.wav").write_bytes(PNG)
    shutil.copy(SAMPLE, folder / "e_good.wav")
    out = tmp_path / "out.jsonl"
    result = run_client(str(folder), "-o", str(out), server=server)
    assert result.returncode == 1
    by_name = {Path(r["source"]).name: r for r in records(out)}
    assert sorted(by_name) == sorted(p.name for p in folder.iterdir())
    assert by_name["a_good.wav"]["error"] is None and by_name["e_good.wav"]["error"] is None
    for bad in ("b_corrupt.wav", "c_empty.wav", "d_picture.wav"):
        assert by_name[bad]["error"].startswith(str(folder / bad))
        assert f"captioner: error: {folder / bad}: " in result.stderr
    assert "5 files: 2 captioned, 3 failed" in result.stderr


def test_debug_shows_a_traceback_only_when_asked(server: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"junk" * 50)
    assert "Traceback" not in run_client(str(bad), server=server).stderr
    assert "Traceback" in run_client(str(bad), "--debug", server=server).stderr


def test_unreachable_server_exits_4_with_the_tunnel_hint() -> None:
    result = run_client(str(SAMPLE), "--base-url", "http://127.0.0.1:9", "--retries", "1")
    assert result.returncode == 4
    assert "connection refused" in result.stderr
    assert "ssh -N -L 9:127.0.0.1:9 host" in result.stderr
    assert "./status_service.sh" in result.stderr


def test_prompt_is_refused(server: Any) -> None:
    result = run_client(str(SAMPLE), "--prompt", "What is this?", server=server)
    assert result.returncode == 2 and "takes no text prompt" in result.stderr


def test_two_base_urls_share_a_batch(server: Any, tmp_path: Path) -> None:
    other = server.base_url.replace("127.0.0.1", "localhost")  # same server, second client
    folder = sample_folder(tmp_path / "two", 4)
    out = tmp_path / "out.jsonl"
    result = run_client(str(folder), "--base-url", other, "-o", str(out), server=server)
    assert result.returncode == 0, result.stderr
    assert len(records(out)) == 4


def _start_batch(server: Any, folder: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        client_command(str(folder), "-o", str(out), "--concurrency", "1", server=server),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=client_env(), cwd=ROOT,
    )  # fmt: skip


def _interrupt_after(proc: subprocess.Popen[bytes], out: Path, lines: int, sig: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            break
        assert proc.poll() is None, "the batch ended before it could be interrupted"
        time.sleep(0.01)
    assert proc.poll() is None, "the batch ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=60)


def test_interrupted_batch_resumes_with_every_input_exactly_once(server: Any, tmp_path: Path) -> None:
    folder = sample_folder(tmp_path / "many", 40)
    out = tmp_path / "out.jsonl"

    first = _start_batch(server, folder, out)
    _interrupt_after(first, out, 3, signal.SIGINT)  # Ctrl-C
    assert first.returncode == 130
    assert first.stderr is not None and b"captioner: error: interrupted" in first.stderr.read()

    second = _start_batch(server, folder, out)
    _interrupt_after(second, out, 8, signal.SIGKILL)  # no chance to clean up
    done = len(records(out))
    assert 8 <= done < 40

    # What a crash in the middle of a write would leave: half a record, no newline.
    with out.open("ab") as f:
        f.write(b'{"source": "' + str(folder / "39.wav").encode() + b'", "durat')
    third = run_client(str(folder), "-o", str(out), server=server)
    assert third.returncode == 0, third.stderr
    assert "dropped a torn last line" in third.stderr
    assert f"resuming: {done} of 40 inputs already in" in third.stderr
    sources = [r["source"] for r in records(out)]
    assert sorted(sources) == sorted(str(p) for p in folder.iterdir())  # each exactly once
    assert all(r["error"] is None for r in records(out))


def test_openai_sdk_works_unchanged(server: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key or "unused")
    assert server.model in [m.id for m in client.models.list()]
    audio = base64.b64encode(SAMPLE.read_bytes()).decode()
    # OpenAI's own audio part, as SDK users write it.
    standard: Any = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]
    response = client.chat.completions.create(
        model=server.model,
        max_tokens=int(MAX_TOKENS),
        messages=[{"role": "user", "content": standard}],
    )
    assert response.choices[0].message.content is not None
    assert response.usage is not None and response.usage.prompt_tokens > 0
    # vLLM's audio_url part (what this client sends), streamed.
    kits: Any = chat_request(data_url(SAMPLE.read_bytes()), server.model)["messages"]
    stream = client.chat.completions.create(
        model=server.model,
        max_tokens=int(MAX_TOKENS),
        stream=True,
        messages=kits,
    )
    finish = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finish and finish[-1] in ("length", "stop")


def test_interrupted_json_batch_keeps_what_was_done_and_the_same_command_finishes_it(
    server: Any, tmp_path: Path
) -> None:
    folder = sample_folder(tmp_path / "many", 12)
    out = tmp_path / "captions.json"
    state = tmp_path / "captions.json.partial.jsonl"
    first = _start_batch(server, folder, out)
    _interrupt_after(first, state, 2, signal.SIGINT)
    assert first.returncode == 130 and not out.exists()
    done = len(records(state))
    assert first.stderr is not None
    last = first.stderr.read().decode().strip().splitlines()[-1]
    assert f"interrupted: {done} of 12 inputs done, 0 failed, {12 - done} left; resume with: " in last
    second = run_client(str(folder), "-o", str(out), "--concurrency", "1", server=server)
    assert second.returncode == 0, second.stderr
    assert f"resuming: {done} of 12 inputs already in {out}" in second.stderr
    shown = json.loads(out.read_text(encoding="utf-8"))
    assert [r["source"] for r in shown] == [str(p) for p in sorted(folder.iterdir())]
    assert not state.exists()


def test_a_missing_output_folder_is_refused_before_the_server_is_asked(server: Any, tmp_path: Path) -> None:
    result = run_client(str(SAMPLE), "-o", str(tmp_path / "typo" / "x.srt"), server=server)
    assert result.returncode == 2
    assert result.stderr == (f"captioner: error: --output {tmp_path / 'typo' / 'x.srt'}: the folder "
                             f"{tmp_path / 'typo'} does not exist (create it first)\n")


def test_one_file_under_three_names_and_a_symlink_loop_is_captioned_once(server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.wav")
    (folder / "loop").symlink_to(folder)
    (folder / "b.wav").symlink_to(folder / "a.wav")
    out = tmp_path / "out.jsonl"
    result = run_client(str(folder), str(folder / "loop" / "a.wav"), str(folder / ".." / "linked" / "a.wav"),
                        "-o", str(out), server=server)
    assert result.returncode == 0, result.stderr
    assert [r["source"] for r in records(out)] == [str(folder / "a.wav")]
    assert "1 file: 1 captioned, 0 failed" in result.stderr


def test_stdout_and_output_file_are_in_input_order_with_the_same_error_text(
    server: Any, tmp_path: Path
) -> None:
    long = write_wav(tmp_path / "a_long.wav", tone(70))  # three windows: finishes last
    bad = tmp_path / "b_bad.wav"
    bad.write_bytes(b"not audio" * 30)
    short = [shutil.copy(SAMPLE, tmp_path / f"c{i}.wav") for i in range(3)]
    inputs = [str(long), str(bad), *map(str, short)]
    shown = run_client(*inputs, "-f", "jsonl", server=server)
    assert shown.returncode == 1
    # stdout was read as latin-1 (random captions); as UTF-8, each record is one line to any reader.
    got = [json.loads(x) for x in shown.stdout.encode("latin-1").decode().splitlines()]
    assert [r["source"] for r in got] == inputs
    assert f"captioner: error: {got[1]['error']}\n" in shown.stderr
    out = tmp_path / "out.txt"
    assert run_client(*inputs, "-o", str(out), server=server).returncode == 1
    # A header names an input; random captions can hold a line that starts with "# " too.
    headers = [x[2:] for x in out.read_text(encoding="utf-8").split("\n") if x.startswith(f"# {tmp_path}/")]
    assert headers[1].startswith(f"{bad}: failed: cannot decode audio: ")  # in its place, one line
    assert headers[:1] + headers[2:] == [str(long), *map(str, short)]


def test_a_truncated_flac_the_server_cannot_decode_exits_6_like_other_unusable_audio(
    server: Any, tmp_path: Path
) -> None:
    whole = convert(write_wav(tmp_path / "src.wav", tone(20)), tmp_path / "whole.flac")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 3])  # the header still says 20 s
    result = run_client(str(cut), server=server)
    assert result.returncode == 6, result.stderr
    # vLLM's 500 for audio it cannot decode reaches the client as the guard's one-line 400.
    assert f"captioner: error: {cut}: {server.base_url}: server refused the request: HTTP 400: could not " \
        "decode the audio: " in result.stderr


def test_a_dead_base_url_next_to_a_live_server_leaves_the_rotation_and_the_batch_completes(
    server: Any, tmp_path: Path
) -> None:
    from tests.service import free_port

    folder = sample_folder(tmp_path / "failover", 6)
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = run_client(str(folder), "--base-url", dead, "-o", str(out), server=server)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 120
    assert sorted(r["source"] for r in records(out)) == sorted(str(p) for p in folder.iterdir())
    assert f"captioner: warning: {dead} left the rotation (connection refused)" in result.stderr
