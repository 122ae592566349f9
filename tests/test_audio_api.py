"""The OpenAI audio API on the service's port (captioner_server/audio_api.py, issue #22): POST
/v1/audio/transcriptions and /v1/audio/captions, a multipart upload captioned through the chat path.

Unit tests (no server): the form reader fed a byte at a time, the form's fields, the deltas that
add up to the joined caption, the decode cap, and the whole route inside the guard around a stub
vLLM. Server tests (the session's `server`: no key): WAV, MP3 and a 70 s file (three windows, the
client's own cuts), every response_format through requests and the OpenAI SDK, streaming, and the
refusals (Host, Origin, declared size, bad forms, bad audio, over MAX_AUDIO_SECONDS), each followed
by a good request. The key and the streamed-size cap are proved on test_security.py's keyed server
(`test_the_audio_route_is_behind_the_key_and_the_size_and_length_caps`): no second server here.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from captioner.audio import AudioTooLong, decode, prepare, to_pcm16
from captioner.formats import timestamp
from captioner.payload import SAMPLE_RATE, wav_bytes
from captioner.records import Segment, join_captions
from captioner_server.audio_api import (
    NO_FILE,
    DeltaJoiner,
    FormReader,
    Options,
    options_for,
)
from captioner_server.request_guard import RequestGuard
from captioner_server.request_policy import Limits
from tests.asgi import Drive
from tests.service import SAMPLE, Service
from tests.test_client_server import client_env, run_client
from tests.test_client_support import convert, parse_srt, parse_vtt, tone, write_wav

PATHS = ("/v1/audio/transcriptions", "/v1/audio/captions")
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def multipart(files: list[tuple[str, tuple[str, bytes] | bytes]] | None = None,
              data: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a form, as requests would send it. A file given as bytes alone
    goes without a filename: a text part."""
    text = [(k, (None, v)) for k, v in (data or {}).items()]
    parts: list[tuple[str, Any]] = [(k, (None, v) if isinstance(v, bytes) else v) for k, v in files or []]
    prepared = requests.Request("POST", "http://x/", files=text + parts).prepare()
    return prepared.body, prepared.headers["Content-Type"]  # type: ignore[return-value]


def read_form(body: bytes, content_type: str, chunk: int = 1) -> Any:
    reader = FormReader(content_type.encode())
    for i in range(0, len(body), chunk):
        reader.feed(body[i:i + chunk])
    return reader.finish()


def refusal_text(body: bytes, content_type: str) -> str:
    with pytest.raises(Exception) as info:
        read_form(body, content_type, chunk=7)
    return str(info.value)


# --- the form, the fields and the deltas (no server) -------------------------------------------


def test_the_form_is_read_as_it_streams_in_a_byte_at_a_time() -> None:
    clip = SAMPLE.read_bytes()
    body, ctype = multipart([("file", ("clip.wav", clip))], {"model": "m", "response_format": "srt"})
    form = read_form(body, ctype)
    assert form.file == clip and form.fields == {"model": "m", "response_format": "srt"}


@pytest.mark.parametrize(("files", "data", "words"), [
    ([("file", ("a.wav", b"RIFF")), ("file", ("b.wav", b"RIFF"))], {}, "two files"),
    ([("file", b"not a file")], {}, "the form field file must be a file upload"),
    ([("file", ("a.wav", b"RIFF"))], {"language": "en"}, "the form field 'language' is not accepted"),
    ([("file", ("a.wav", b"RIFF")), ("prompt", ("p.txt", b"x"))], {}, "'prompt' is not accepted"),
    ([("file", ("a.wav", b"RIFF")), ("model", ("m.txt", b"x"))], {}, "model must be text, not a file"),
    ([("file", ("a.wav", b"RIFF"))], {"model": "m" * 300}, "longer than 256 bytes"),
    ([], {"model": "m"}, NO_FILE),
])
def test_a_form_part_the_route_does_not_take_is_a_400_naming_it(
        files: list[Any], data: dict[str, str], words: str) -> None:
    body, ctype = multipart(files, data)
    assert words in refusal_text(body, ctype)


def test_a_body_that_is_no_form_is_refused_in_one_line() -> None:
    body, ctype = multipart([("file", ("a.wav", b"RIFF"))])
    assert "multipart/form-data" in refusal_text(body, "application/json")
    assert "multipart/form-data" in refusal_text(body, "multipart/form-data")  # no boundary
    assert "ends before its closing boundary" in refusal_text(body[:-10], ctype)
    assert "malformed multipart form" in refusal_text(b"garbage\r\n" * 4, ctype)
    twice = multipart([("file", ("a.wav", b"RIFF")), ("model", b"a"), ("model", b"b")])
    assert "the form field model is given twice" in refusal_text(*twice)
    cte = body.replace(b"Content-Disposition", b"Content-Transfer-Encoding: base64\r\nContent-Disposition", 1)
    assert "send it as binary" in refusal_text(cte, ctype)


def test_the_form_fields_by_the_chat_requests_rules() -> None:
    limits = Limits(served_model="served")
    assert options_for({}, limits) == Options("json", False, "served", None)
    assert options_for({"model": "served", "response_format": "verbose_json", "temperature": "0.2",
                        "stream": "False"}, limits) == Options("verbose_json", False, "served", 0.2)
    assert options_for({"stream": "true", "response_format": "text"}, limits).stream
    # A Whisper client's own model name is answered by the served model.
    assert options_for({"model": "whisper-1"}, limits) == Options("json", False, "served", None)
    for fields, words in [
        ({"model": "a\x1bb"}, "the request field model must be printable ASCII text"),
        ({"temperature": "3"}, "temperature must be a number in [0, 2]"),
        ({"temperature": "warm"}, "temperature must be a number in [0, 2]"),
        ({"temperature": "nan"}, "temperature must be a number in [0, 2]"),
        ({"response_format": "diarized_json"}, "response_format must be one of json, text, srt, vtt"),
        ({"stream": "yes"}, "stream must be true or false"),
        ({"stream": "true", "response_format": "srt"}, "response_format srt needs stream=false"),
    ]:
        with pytest.raises(Exception) as info:
            options_for(fields, limits)
        assert words in str(info.value), fields


def test_stream_deltas_add_up_to_the_joined_caption_whatever_the_pieces() -> None:
    rng = random.Random(22)
    alphabet = ["a", "b", " ", "\n", "\t", "é", "\u2028"]
    for _ in range(300):
        captions = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
                    for _ in range(rng.randrange(1, 5))]
        joiner, out = DeltaJoiner(), []
        for caption in captions:
            joiner.next_window()
            cuts = sorted(rng.sample(range(len(caption) + 1), min(3, len(caption) + 1)))
            pieces = [caption[a:b] for a, b in zip([0, *cuts], [*cuts, len(caption)], strict=True)]
            out += [d for d in (joiner.add(p) for p in pieces) if d]
        expected = join_captions([Segment(0, 1, c.strip()) for c in captions])
        assert "".join(out) == expected, captions


def test_decoding_stops_at_the_length_limit_and_prepare_says_how_long() -> None:
    ten = wav_bytes(to_pcm16(tone(10)).tobytes())
    with pytest.raises(AudioTooLong) as info:
        decode(ten, "clip", limit_seconds=4)
    assert not info.value.exact and 4 < info.value.seconds < 5  # stopped soon after the limit
    with pytest.raises(AudioTooLong) as info:
        prepare(ten, "clip", 3, limit_seconds=8)
    assert info.value.exact and info.value.seconds == pytest.approx(10)
    assert "10.0 s of audio, over the limit of 8 s" in str(info.value)
    assert prepare(ten, "clip", 3, limit_seconds=10).count == 4  # the limit itself is not over it
    assert prepare(ten, "clip", 30).count == 1


# --- the route inside the guard, around a stub vLLM (no server) --------------------------------


def stub_vllm(caption: str, seen: list[dict[str, Any]]) -> Any:
    """A stand-in for vLLM's app: records each chat request and streams `caption` in pieces."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        seen.append({"path": scope["path"], "headers": dict(scope["headers"]), "body": body})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        pieces = [caption[i:i + 3] for i in range(0, len(caption), 3)]
        chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  *({"choices": [{"delta": {"content": piece}}]} for piece in pieces),
                  {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}]
        for chunk in chunks:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    return app


def call_route(guard: RequestGuard, body: bytes, ctype: str, headers: list[tuple[bytes, bytes]] | None = None,
               path: str = PATHS[0], chunk: int = 65536) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """(status, headers, body, how many body messages the route read) of one upload."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", ctype.encode()), *(headers or [])]}
    done = Drive(guard, scope, chunks, stay=True)
    return done.status, done.headers, done.body, done.read


def test_the_route_cuts_long_audio_by_the_clients_rule_and_captions_each_window_through_the_chat_checks(
        tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    guard = RequestGuard(stub_vllm("  a caption ", seen), max_bytes=50_000_000, api_key="key",
                         limits=Limits(served_model="served", max_audio_seconds=600))
    auth = [(b"authorization", b"Bearer key")]
    clip = write_wav(tmp_path / "long.wav", quiet_gapped(70)).read_bytes()
    body, ctype = multipart([("file", ("long.wav", clip))], {"response_format": "verbose_json"})
    status, headers, answer, _ = call_route(guard, body, ctype, auth)
    assert status == 200 and headers[b"content-type"] == b"application/json", answer
    assert (headers[b"cache-control"], headers[b"x-content-type-options"]) == (b"no-store", b"nosniff")
    reply = json.loads(answer)
    spans = prepare(clip, "x", 30).spans
    times = [(round(a, 3), round(b, 3)) for a, b in spans]
    assert [(s["start"], s["end"]) for s in reply["segments"]] == times
    assert len(spans) == 3 and reply["text"] == "a caption a caption a caption"
    assert reply["language"] == "unknown" and reply["duration"] == pytest.approx(70, abs=0.01)
    assert [s["id"] for s in reply["segments"]] == [0, 1, 2]
    assert len(seen) == 3 and {s["path"] for s in seen} == {"/v1/chat/completions"}
    for request in seen:  # a client's request: the key passed on, one audio part, the served model
        assert request["headers"][b"authorization"] == b"Bearer key"
        assert request["body"]["model"] == "served" and request["body"]["stream"] is True
        assert [p["type"] for p in request["body"]["messages"][0]["content"]] == ["audio_url"]
    status, _, answer, _ = call_route(guard, *multipart([("file", ("a.wav", SAMPLE.read_bytes()))],
                                                        {"response_format": "srt"}), auth)
    assert status == 200 and parse_srt(answer.decode()) == [("00:00:00,000", "00:00:05,578", "a caption")]
    status, headers, answer, _ = call_route(guard, *multipart([("file", ("a.wav", SAMPLE.read_bytes()))],
                                                              {"stream": "true"}), auth)
    events = [json.loads(line[6:]) for line in answer.decode().split("\n\n") if line]
    assert status == 200 and headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-store"  # a caption is kept by no cache
    assert "".join(e["delta"] for e in events[:-1]) == "a caption" == events[-1]["text"]
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["usage"]["total_tokens"] == 13


def test_the_route_is_behind_the_key_and_refuses_an_oversize_body_before_reading_it() -> None:
    guard = RequestGuard(stub_vllm("x", []), max_bytes=100_000, api_key="key", limits=Limits())
    body, ctype = multipart([("file", ("a.wav", SAMPLE.read_bytes()))])
    status, headers, answer, read = call_route(guard, body, ctype)
    assert status == 401 and read == 0 and json.loads(answer)["error"]["code"] == 401
    assert (headers[b"cache-control"], headers[b"x-content-type-options"]) == (b"no-store", b"nosniff")
    auth = [(b"authorization", b"Bearer key")]
    status, _, answer, read = call_route(guard, body, ctype, auth, chunk=10_000)
    assert status == 413 and "MAX_REQUEST_BYTES" in json.loads(answer)["error"]["message"]
    assert read == 11  # 110 000 bytes > 100 000: the rest was never read
    status, _, _, read = call_route(guard, body, ctype, [*auth, (b"content-length", str(len(body)).encode())])
    assert status == 413 and read == 0


def test_a_script_naming_local_files_is_refused_before_any_is_read_and_m4a_goes_to_vllm_as_wav(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # FFmpeg's concat demuxer opens the files a script names, from the process's folder: the route
    # once decoded a long one itself and handed a short one to vLLM, whose FFmpeg read it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write_wav(tmp_path / "sub" / "secret.wav", tone(40))
    seen: list[dict[str, Any]] = []
    guard = RequestGuard(stub_vllm("a caption", seen), max_bytes=50_000_000, api_key="key",
                         limits=Limits(served_model="served", max_audio_seconds=600))
    auth = [(b"authorization", b"Bearer key")]
    script = b"ffconcat version 1.0\nfile sub/secret.wav\n"
    status, _, answer, _ = call_route(guard, *multipart([("file", ("a.wav", script))]), auth)
    assert status == 400, answer
    assert json.loads(answer)["error"]["message"] == (
        "file: not an audio file this server reads (WAV, FLAC, MP3, Ogg, Opus, M4A/MP4, WebM/Matroska, "
        "AIFF, AAC, AMR, WMA or CAF)")
    assert seen == []
    # vLLM decodes with libsndfile alone (start_service.sh): what it cannot read goes as WAV.
    m4a = convert(write_wav(tmp_path / "a.wav", tone(3)), tmp_path / "a.m4a").read_bytes()
    flac = convert(tmp_path / "a.wav", tmp_path / "a.flac").read_bytes()
    for clip, sent in ((m4a, "data:audio/wav;base64,"), (flac, "data:audio/flac;base64,")):
        status, _, answer, _ = call_route(guard, *multipart([("file", ("clip", clip))]), auth)
        assert status == 200, answer
        assert seen.pop()["body"]["messages"][0]["content"][0]["audio_url"]["url"].startswith(sent)


def test_an_error_event_inside_vllms_stream_is_answered_in_one_bounded_line() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        trace = "Traceback (most recent call last):\n  at <x object at 0x7f00>\n" + "y" * 5000
        error = {"error": {"message": trace, "code": 500}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode()})
    guard = RequestGuard(failing, max_bytes=50_000_000, api_key="", limits=Limits())
    status, _, answer, _ = call_route(guard, *multipart([("file", ("a.wav", SAMPLE.read_bytes()))]))
    message = json.loads(answer)["error"]["message"]
    assert status == 500 and message == "Traceback (most recent call last):", message


def quiet_gapped(seconds: float) -> np.ndarray:
    """A tone with a 0.3 s pause at 27.5 s and 56 s: the client's rule cuts there, not at 30 and 60."""
    samples = tone(seconds)
    for at in (27.5, 56.0):
        samples[round(at * SAMPLE_RATE):round((at + 0.3) * SAMPLE_RATE)] = 0
    return samples


# --- the real server ---------------------------------------------------------------------------


def upload(server: Service, clip: bytes | None = None, path: str = PATHS[0], name: str = "clip.wav",
           headers: dict[str, str] | None = None, **fields: str) -> requests.Response:
    files = {} if clip is None else {"file": (name, clip)}
    return requests.post(server.base_url + path, files=files or None, data=fields or None,
                         headers={**server.headers(), **(headers or {})}, timeout=300)


def error_message(r: requests.Response) -> str:
    return str(r.json()["error"]["message"])


def test_the_sample_in_every_response_format_at_both_paths(server: Service) -> None:
    clip = SAMPLE.read_bytes()
    for path in PATHS:
        for fmt in FORMATS:
            r = upload(server, clip, path, response_format=fmt)
            assert r.status_code == 200, (path, fmt, r.text)
            if fmt == "json":
                assert isinstance(r.json()["text"], str) and r.json()["usage"]["type"] == "tokens"
            elif fmt == "verbose_json":
                reply = r.json()
                assert reply["duration"] == pytest.approx(5.578, abs=0.01) and reply["language"] == "unknown"
                assert [(s["id"], s["start"], s["end"]) for s in reply["segments"]] == [(0, 0.0, 5.578)]
            elif fmt == "srt":
                assert all(cue[:2] == ("00:00:00,000", "00:00:05,578") for cue in parse_srt(r.text))
            elif fmt == "vtt":
                assert r.headers["content-type"].startswith("text/vtt") and len(parse_vtt(r.text)) <= 1
            else:
                assert r.text.endswith("\n") and r.headers["content-type"].startswith("text/plain")


def test_an_mp3_and_a_70_s_file_in_three_windows_cut_where_the_client_cuts(
        server: Service, tmp_path: Path) -> None:
    mp3 = convert(write_wav(tmp_path / "tone.wav", tone(4, 330)), tmp_path / "tone.mp3")
    r = upload(server, mp3.read_bytes(), name="tone.mp3")
    assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text
    long = write_wav(tmp_path / "long.wav", quiet_gapped(70))
    r = upload(server, long.read_bytes(), PATHS[1], response_format="verbose_json")
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]
    assert len(segments) == 3 and r.json()["duration"] == pytest.approx(70, abs=0.01)
    client = run_client(str(long), "--format", "json", "--base-url", server.base_url, env=client_env())
    assert client.returncode == 0, client.stderr
    expected = [(s["start"], s["end"]) for s in json.loads(client.stdout)["segments"]]
    assert [(s["start"], s["end"]) for s in segments] == expected
    assert 27.5 < expected[0][1] < 27.8 and 56 < expected[1][1] < 56.3  # the quiet moments, not 30 and 60
    r = upload(server, long.read_bytes(), response_format="srt")
    assert r.status_code == 200
    windows = [(timestamp(a, ","), timestamp(b, ",")) for a, b in expected]
    cues = parse_srt(r.text)  # a window the random model said nothing for has no cue
    assert cues and all(cue[:2] in windows for cue in cues), (cues, windows)


def test_the_openai_sdk_unchanged_every_format_and_a_stream(server: Service) -> None:
    from openai import OpenAI
    from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with SAMPLE.open("rb") as clip:
        result = client.audio.transcriptions.create(model=server.model, file=clip)
    assert isinstance(result.text, str)
    for fmt in ("text", "srt", "vtt"):
        with SAMPLE.open("rb") as clip:
            text = client.audio.transcriptions.create(model=server.model, file=clip, response_format=fmt)
        assert isinstance(text, str), fmt
    with SAMPLE.open("rb") as clip:
        verbose = client.audio.transcriptions.create(
            model=server.model, file=clip, response_format="verbose_json", temperature=0.2)
    assert verbose.duration == pytest.approx(5.578, abs=0.01) and verbose.segments
    assert (verbose.segments[0].start, verbose.segments[0].end) == (0.0, 5.578)
    with SAMPLE.open("rb") as clip:
        events = list(client.audio.transcriptions.create(model=server.model, file=clip, stream=True))
    assert isinstance(events[-1], TranscriptionTextDoneEvent)
    assert all(isinstance(e, TranscriptionTextDeltaEvent) for e in events[:-1])
    assert "".join(e.delta for e in events[:-1]) == events[-1].text  # type: ignore[union-attr]
    with SAMPLE.open("rb") as clip:  # a Whisper client's model name: the served model answers
        whisper = client.audio.transcriptions.create(model="whisper-1", file=clip)
    # Its text may be "" (random weights can decode to nothing): what it generated is counted.
    assert isinstance(whisper.text, str) and whisper.usage is not None
    assert whisper.usage.output_tokens > 0  # type: ignore[union-attr]


def test_refusals_each_a_one_line_error_and_the_next_upload_captions(server: Service, tmp_path: Path) -> None:
    clip = SAMPLE.read_bytes()
    r = upload(server, clip, headers={"Host": "evil.example"})
    assert r.status_code == 421
    r = upload(server, clip, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = requests.get(server.base_url + PATHS[0], timeout=10)
    assert r.status_code == 405
    # A declared 10 GB upload is refused at once: nothing of it is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 10000000000\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")
    ogg = tmp_path / "long.ogg"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=220:d=601",
                    "-c:a", "libopus", "-b:a", "6k", str(ogg)], check=True)
    url = server.base_url + PATHS[0]
    cases: list[tuple[requests.Response, int, str]] = [
        (requests.post(url, files={"model": (None, server.model)}, timeout=60), 400, "holds no file"),
        (upload(server, None, model=server.model), 400, "multipart/form-data"),  # (urlencoded)
        (upload(server, b"this is not audio at all", name="notes.txt"), 400, "file: "),
        (upload(server, b"", name="empty.wav"), 400, "empty input"),
        (upload(server, clip, language="en"), 400, "the form field 'language' is not accepted"),
        (upload(server, clip, model="m" * 300), 400, "longer than 256 bytes"),
        (upload(server, clip, temperature="9"), 400, "temperature must be a number in [0, 2]"),
        (upload(server, clip, response_format="srt", stream="true"), 400, "needs stream=false"),
        (upload(server, ogg.read_bytes(), name="long.ogg"), 413,
         "the audio is 601.0 s long: this server takes at most 600 s (MAX_AUDIO_SECONDS)"),
        (requests.post(url, files=[("file", ("a.wav", clip)), ("file", ("b.wav", clip))], timeout=60), 400,
         "two files"),
        (requests.post(url, files={"file": (None, "text")}, timeout=60), 400,
         "the form field file must be a file upload"),
        (requests.post(url, json={"file": "x"}, timeout=60), 400, "multipart/form-data"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in error_message(r), (status, words, r.text)
        assert "\n" not in error_message(r) and len(r.content) < 1000
    assert "Traceback" not in (server.log_dir / "service.log").read_text(errors="replace")
    r = upload(server, clip)
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


def test_curl_uploads_a_file_and_gets_subtitles(server: Service) -> None:
    assert shutil.which("curl")
    r = subprocess.run(["curl", "-sS", "--fail-with-body", "-F", f"file=@{SAMPLE}", "-F",
                        "response_format=vtt", f"{server.base_url}/v1/audio/captions"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("WEBVTT\n\n")
