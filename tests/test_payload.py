"""The one request builder, WAV writer and atomic write (captioner/payload.py, captioner/files.py):
what every sender of the kit builds is what the request guard accepts, and both modules load with
the standard library alone (tools/warm_up.py runs them under the Python that runs vLLM)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest

from captioner.files import atomic_write
from captioner.payload import SAMPLE_RATE, chat_request, data_url, wav_bytes
from captioner_server.request_policy import audio_only_problem
from tests.service import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import loadgen


@pytest.mark.parametrize(
    "body",
    [
        chat_request("data:audio/wav;base64,AAAA", "m"),  # a bare request: the server's sampling
        chat_request("data:audio/wav;base64,AAAA", "m", 64),  # the client
        chat_request("data:audio/wav;base64,AAAA", "m", 64, stream=True),  # the client, --stream
        chat_request("data:audio/wav;base64,AAAA", "m", 32, ignore_eos=True),  # tools/warm_up.py
        loadgen.request_body(loadgen.Settings(base_url="", model="m", greedy=True), "data:,"),
    ],
    ids=["bare", "client", "client-stream", "warm-up", "loadgen"],
)
def test_every_request_the_kit_builds_is_one_the_guard_accepts(body: dict[str, Any]) -> None:
    assert audio_only_problem(body) is None
    (message,) = body["messages"]
    assert [part["type"] for part in message["content"]] == ["audio_url"]


def test_a_stream_asks_for_the_usage_at_its_end() -> None:
    body = chat_request("data:,", "m", stream=True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in body and "stream" not in chat_request("data:,", "m")


def test_the_wav_is_mono_16_bit_at_16_khz_holding_the_samples_as_given() -> None:
    pcm = bytes(range(200))
    with wave.open(io.BytesIO(wav_bytes(pcm))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        assert w.readframes(w.getnframes()) == pcm
    url = data_url(wav_bytes(pcm))
    assert url.startswith("data:audio/wav;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == wav_bytes(pcm)


def test_atomic_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]


def test_the_shared_modules_need_only_the_standard_library() -> None:
    # -I -S: no site-packages, no environment: what a bare Python has.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import captioner.payload, captioner.files; "
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in "
            "('numpy', 'requests', 'urllib3', 'av', 'tqdm')))")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "[]\n", "")
