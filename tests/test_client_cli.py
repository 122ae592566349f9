"""The command line against a scripted stub server: flags, errors, exit codes.

Fast and deterministic; the same paths against real vLLM are in
test_client_server.py.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from urllib3.exceptions import NewConnectionError
from urllib3.util.retry import Retry

from captioner.api import CaptionClient, retry_wait
from captioner.cli import build_parser, main
from captioner.errors import (
    CaptionerError,
    ExitCode,
    InputError,
    ServerConnectionError,
    ServerHTTPError,
    ServerTimeoutError,
    UsageError,
    exit_code_for,
)
from captioner.options import BACKOFF_MAX, DEFAULT_BACKOFF, DEFAULT_RETRIES
from tests.test_client_output import REPO, client_env
from tests.test_client_support import IdleClosingServer, StubServer, folder_of, parse_srt, tone, write_wav

pytestmark = pytest.mark.usefixtures("client_env_cleared")


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "clip.wav", tone(2))


def call(*argv: str) -> int:
    return main(list(argv))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UsageError("x"), ExitCode.USAGE),
        (InputError("x"), ExitCode.INPUT),
        (ServerConnectionError("x"), ExitCode.CONNECTION),
        (ServerTimeoutError("x"), ExitCode.TIMEOUT),
        (ServerHTTPError(401, "x"), ExitCode.HTTP_4XX),
        (ServerHTTPError(503, "x"), ExitCode.HTTP_5XX),
        (CaptionerError("x"), ExitCode.FAILURES),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
        (BrokenPipeError(), ExitCode.OK),  # stdout closed by `| head`
        (RuntimeError("x"), ExitCode.FAILURES),
    ],
)
def test_each_error_maps_to_its_exit_code(error: BaseException, code: ExitCode) -> None:
    assert exit_code_for(error) == code


def test_prompt_is_refused_because_the_captioner_takes_none(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert call(str(clip), "--prompt", "describe the music") == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no text prompt" in err


def test_missing_path_exits_3_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert call("/no/such/clip.wav") == ExitCode.INPUT
    assert capsys.readouterr().err == "captioner: error: /no/such/clip.wav: no such file or folder\n"


def test_subtitles_of_several_inputs_are_a_usage_error(clip: Path) -> None:
    other = write_wav(clip.with_name("b.wav"), tone(1))
    assert call(str(clip), str(other), "-f", "vtt") == ExitCode.USAGE


def test_unreachable_server_exits_4_with_tunnel_and_status_hints(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = call(str(clip), "--base-url", "http://127.0.0.1:9", "--retries", "0")
    assert code == ExitCode.CONNECTION
    err = capsys.readouterr().err
    assert "connection refused" in err
    assert "ssh -N -L 9:127.0.0.1:9 host" in err and "./status_service.sh" in err
    assert "Traceback" not in err


def test_request_carries_one_audio_part_with_the_original_bytes_and_no_text(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--max-tokens", "16") == 0
    assert capsys.readouterr().out == "a stub caption\n"
    (request,) = stub.requests
    assert request["model"] == "stub-model" and request["max_tokens"] == 16
    (message,) = request["messages"]
    (part,) = message["content"]
    assert part["type"] == "audio_url" and set(part) == {"type", "audio_url"}
    prefix = "data:audio/wav;base64,"
    assert part["audio_url"]["url"].startswith(prefix)
    assert base64.b64decode(part["audio_url"]["url"][len(prefix) :]) == clip.read_bytes()
    assert "text" not in json.dumps(request)


def test_503_is_retried_with_backoff_then_succeeds(clip: Path) -> None:
    busy = (503, {"error": {"message": "busy"}})
    with StubServer(replies=[busy, busy]) as stub:
        assert call(str(clip), "--base-url", stub.base_url) == ExitCode.OK
    assert len(stub.requests) == 3


@pytest.mark.parametrize(
    ("status", "body", "code", "shown"),
    [
        (400, {"error": {"message": "Invalid audio: could not decode", "code": 400}},
         ExitCode.HTTP_4XX, "HTTP 400: Invalid audio: could not decode"),
        (500, {"error": {"message": "engine died"}}, ExitCode.HTTP_5XX, "HTTP 500: engine died"),
    ],
)  # fmt: skip
def test_http_errors_exit_with_their_class_and_quote_the_server(
    clip: Path, capsys: pytest.CaptureFixture[str], status: int, body: object,
    code: ExitCode, shown: str,
) -> None:  # fmt: skip
    with StubServer(replies=[(status, body)]) as stub:
        assert call(str(clip), "--base-url", stub.base_url) == code
    assert shown in capsys.readouterr().err


def test_wrong_api_key_exits_6_with_a_hint(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(api_key="right") as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--api-key", "wrong") == 6
        assert call(str(clip), "--base-url", stub.base_url, "--api-key", "right") == 0
    err = capsys.readouterr().err
    assert "HTTP 401: Unauthorized" in err and "--api-key" in err


def test_api_key_comes_from_the_environment(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONER_API_KEY", "right")
    with StubServer(api_key="right") as stub:
        assert call(str(clip), "--base-url", stub.base_url) == 0


def test_slow_server_exits_5_on_read_timeout(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(delay=2) as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--timeout", "0.5") == 5
    assert "no answer within 0.5 s" in capsys.readouterr().err


def test_stalled_stream_exits_5_on_read_timeout(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(caption="one two", chunk_delay=2) as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--stream", "--timeout", "0.5") == 5
    captured = capsys.readouterr()
    assert captured.out == "one" and "no answer within 0.5 s" in captured.err


def test_stream_prints_the_caption_as_it_arrives(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(caption="birds sing at dawn") as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--stream") == 0
    assert capsys.readouterr().out == "birds sing at dawn\n"
    assert stub.requests[0]["stream"] is True


def test_batch_is_spread_over_every_base_url(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        write_wav(folder / f"{i}.wav", tone(1, 200 + 50 * i))
    # Slow enough that all six are in flight at once: the least-busy server takes each next one.
    with StubServer(delay=0.5) as one, StubServer(delay=0.5) as two:
        code = call(str(folder), "--base-url", one.base_url, "--base-url", two.base_url,
                    "-f", "jsonl", "-o", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert code == 0
    assert len(one.requests) == 3 and len(two.requests) == 3


def test_rerun_with_the_same_jsonl_output_sends_nothing_new(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_wav(folder / f"{i}.wav", tone(1, 300 + 100 * i))
    out = tmp_path / "out.jsonl"
    with StubServer() as stub:
        assert call(str(folder), "-o", str(out), "--base-url", stub.base_url) == 0
        assert call(str(folder), "-o", str(out), "--base-url", stub.base_url) == 0
    assert len(stub.requests) == 3  # format jsonl inferred from the extension
    sources = [json.loads(x)["source"] for x in out.read_text().splitlines()]
    assert sorted(sources) == sorted(str(p) for p in folder.iterdir())


def test_75s_clip_gives_three_timed_segments_and_valid_srt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(75))
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url, "-f", "srt") == 0
    cues = parse_srt(capsys.readouterr().out)
    assert [(a, b) for a, b, _ in cues] == [
        ("00:00:00,000", "00:00:30,000"),
        ("00:00:30,000", "00:01:00,000"),
        ("00:01:00,000", "00:01:15,000"),
    ]
    assert len(stub.requests) == 3


def test_default_base_url_and_concurrency_follow_the_service_config(
    tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StubServer() as stub:
        port = stub.base_url.rsplit(":", 1)[1]
        config = tmp_path / "service.env"
        config.write_text(f"PORT={port}\nMAX_NUM_SEQS=3\n")
        monkeypatch.setenv("CAPTIONER_CONFIG", str(config))
        assert call(str(clip)) == ExitCode.OK
    assert len(stub.requests) == 1


@pytest.mark.parametrize(("line", "flags", "message"), [
    ("PORT=abc", [], 'PORT="abc" is invalid: expected an integer from 1 to 65535'),
    ("MAX_NUM_SEQS=0", ["--base-url", "http://127.0.0.1:9"], 'MAX_NUM_SEQS="0" is invalid: expected'),
    ("MAX_AUDIO_SECONDS=abc", ["--base-url", "http://127.0.0.1:9"], 'MAX_AUDIO_SECONDS="abc" is invalid'),
])
def test_a_bad_value_of_a_setting_the_client_reads_is_the_scripts_one_line_exit_2(
    tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    line: str, flags: list[str], message: str,
) -> None:  # fmt: skip
    # PORT=abc once sent the client to port 8003 (exit 4, "connection refused") and MAX_NUM_SEQS=0
    # passed silently: start_service.sh refuses both.
    (tmp_path / "config.env").write_text(line + "\n")
    monkeypatch.setenv("CAPTIONER_CONFIG", str(tmp_path / "config.env"))
    assert call(str(clip), *flags) == ExitCode.USAGE
    assert capsys.readouterr().err.startswith(f"captioner: error: {message}")


def test_a_config_file_this_account_may_not_read_is_left_out_with_a_warning_and_the_flags_work(
    tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A colleague's config.env, kept to its owner (chmod o-r, as README asks when it holds API_KEY);
    # root reads any file, so this account's refusal is played by read_text.
    config = tmp_path / "config.env"
    config.write_text("PORT=9\n")
    monkeypatch.setenv("CAPTIONER_CONFIG", str(config))
    real = Path.read_text

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", refused)
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--api-key", "k") == ExitCode.OK
    assert len(stub.requests) == 1
    assert (f"captioner: warning: config file {config} cannot be read by this account: its settings are not "
            "used (give --base-url, and --api-key if it needs one)\n") in capsys.readouterr().err


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_dropped_before_an_answer_is_resent_and_the_batch_goes_on(
    tmp_path: Path, how: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_wav(folder / f"{i}.wav", tone(1, 300 + 100 * i))
    out = tmp_path / "out.jsonl"
    with StubServer(drops=[how, how]) as stub:
        code = call(str(folder), "-o", str(out), "--base-url", stub.base_url, "--concurrency", "1")
    assert code == ExitCode.OK
    assert len(stub.requests) == 5  # two dropped, then each of the three answered once
    assert [json.loads(x)["error"] for x in out.read_text().splitlines()] == [None] * 3


def test_connection_dropped_more_often_than_retries_fails_as_closed_mid_request(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with StubServer(drops=["close"] * 3) as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--retries", "2") == ExitCode.CONNECTION
    assert len(stub.requests) == 3
    assert "the server closed the connection mid-request" in capsys.readouterr().err


def test_read_timeout_is_not_resent(clip: Path) -> None:
    with StubServer(delay=1) as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--timeout", "0.3") == ExitCode.TIMEOUT
    assert len(stub.requests) == 1


def test_default_retries_wait_about_a_minute_as_urllib3_counts_it() -> None:
    assert build_parser().parse_args([]).retries == DEFAULT_RETRIES == 7
    retry = Retry(total=DEFAULT_RETRIES, backoff_factor=DEFAULT_BACKOFF, backoff_max=BACKOFF_MAX)
    pauses = []
    for _ in range(DEFAULT_RETRIES):
        retry = retry.increment("GET", "/", error=NewConnectionError(None, "refused"))  # type: ignore[arg-type]
        pauses.append(retry.get_backoff_time())
    assert pauses == [0, 1, 2, 4, 8, 16, 30]
    assert retry_wait(DEFAULT_RETRIES) == sum(pauses) == 61
    assert "up to 61 s in all" in build_parser().format_help()


def test_unreachable_server_says_each_retry_as_it_waits_then_exits_4(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = call(str(clip), "--base-url", "http://127.0.0.1:9", "--retries", "2")
    assert code == ExitCode.CONNECTION
    # Only our own lines: a stub of an earlier test may still print its thread's traceback.
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("captioner: ")]
    assert lines[:2] == [
        "captioner: warning: http://127.0.0.1:9: connection refused; retry 1 of 2 now",
        "captioner: warning: http://127.0.0.1:9: connection refused; retry 2 of 2 in 1 s",
    ]
    assert len(lines) == 3 and "connection refused" in lines[2]


@pytest.mark.parametrize(
    "message",
    [
        "Error opening <_io.BytesIO object>: Error in WAV/W64/RF64 file. Malformed 'fmt ' chunk.",
        "Cannot load local files without `--allowed-local-media-path`.",
        "Failed to decode audio: invalid data found when processing input",
        "Error : flac decoder lost sync.",
        "[Errno 1094995529] Invalid data found when processing input: '<none>'",
    ],
    ids=["corrupt-audio", "file-url", "decode-failure", "truncated-flac", "ffmpeg-invalid-data"],
)
def test_vllm_500_for_bad_input_exits_6_saying_the_server_could_not_use_it(
    clip: Path, capsys: pytest.CaptureFixture[str], message: str
) -> None:
    with StubServer(replies=[(500, {"error": {"message": message, "code": 500}})]) as stub:
        assert call(str(clip), "--base-url", stub.base_url) == ExitCode.HTTP_4XX
    err = capsys.readouterr().err
    assert f"{stub.base_url}: server could not use the input: HTTP 500: {message}" in err
    assert len(stub.requests) == 1  # a client mistake: not retried


def test_vllm_500_for_bad_input_does_not_stop_a_batch(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_wav(folder / f"{i}.wav", tone(1, 300 + 100 * i))
    bad = (500, {"error": {"message": "Error opening <_io.BytesIO object>: Format not recognised."}})
    with StubServer(replies=[bad]) as stub:
        code = call(str(folder), "--base-url", stub.base_url, "--concurrency", "1")
    assert code == ExitCode.FAILURES and len(stub.requests) == 3


@pytest.mark.parametrize(
    ("config", "argv", "windows"),
    [
        ("MAX_AUDIO_SECONDS=7\n", [], [(0, 7), (7, 14), (14, 20)]),
        ("MAX_AUDIO_SECONDS=600\n", [], [(0, 20)]),
        ("MAX_AUDIO_SECONDS=7\n", ["--segment-seconds", "10"], [(0, 10), (10, 20)]),
        ("", [], [(0, 20)]),
    ],
    ids=["cap-below-30", "cap-above-30", "flag-wins", "no-cap"],
)  # fmt: skip
def test_default_windows_are_no_longer_than_the_servers_max_audio_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    config: str, argv: list[str], windows: list[tuple[int, int]],
) -> None:  # fmt: skip
    clip = write_wav(tmp_path / "long.wav", tone(20))
    (tmp_path / "config.env").write_text(config)
    monkeypatch.setenv("CAPTIONER_CONFIG", str(tmp_path / "config.env"))
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url, "-f", "json", *argv) == ExitCode.OK
    record = json.loads(capsys.readouterr().out)
    record = record[0] if isinstance(record, list) else record
    assert [(s["start"], s["end"]) for s in record["segments"]] == windows
    assert len(stub.requests) == len(windows)


def test_max_audio_seconds_from_the_environment_wins_over_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(20))
    (tmp_path / "config.env").write_text("MAX_AUDIO_SECONDS=600\n")
    monkeypatch.setenv("CAPTIONER_CONFIG", str(tmp_path / "config.env"))
    monkeypatch.setenv("MAX_AUDIO_SECONDS", "12")
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url) == ExitCode.OK
    assert len(stub.requests) == 2


def test_a_kept_alive_connection_the_server_reset_is_resent_once_even_with_retries_0() -> None:
    with IdleClosingServer() as server:
        client = CaptionClient(server.base_url, retries=0)
        first = client.caption("data:audio/wav;base64,AAAA", "m")
        second = client.caption("data:audio/wav;base64,AAAA", "m")  # on the kept-alive connection
    assert first.text == second.text == "fresh answer"
    assert (server.requests, server.connections) == (3, 2)  # reset once, resent on a new one


def test_a_fresh_connection_reset_before_an_answer_is_not_resent_with_retries_0(clip: Path) -> None:
    with StubServer(drops=["reset"]) as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--retries", "0") == ExitCode.CONNECTION
    assert len(stub.requests) == 1


def test_a_base_url_ending_in_v1_is_the_same_server(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer() as stub:
        assert call(str(clip), "--base-url", stub.base_url + "/v1/") == ExitCode.OK
    assert capsys.readouterr().out == "a stub caption\n" and len(stub.requests) == 1


# --- the small things of issue #20 (item 5) ---------------------------------------------------------


def test_a_negative_retries_is_a_usage_error(clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        call(str(clip), "--retries", "-5")
    assert caught.value.code == ExitCode.USAGE
    assert "argument --retries: must be 0 or more, got -5" in capsys.readouterr().err


def piped(command: str) -> subprocess.CompletedProcess[str]:
    """`test_client.py ... | head ...` under bash with pipefail: the pipeline's status is the client's."""
    client = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'test_client.py'))}"
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {client} {command}"],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_batch_piped_into_head_ends_quietly_with_exit_0(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 6)
    with StubServer(delay=0.2) as stub:  # records come one at a time, after head has gone
        result = piped(f"{folder} --base-url {stub.base_url} -c 1 -f jsonl | head -1")
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["source"] == str(folder / "00.wav")
    assert len(stub.requests) < 6  # the batch stopped: nobody reads the rest


def test_a_stream_piped_into_head_ends_quietly_with_exit_0(clip: Path) -> None:
    with StubServer(caption="one two three four five six", chunk_delay=0.2) as stub:
        result = piped(f"{clip} --base-url {stub.base_url} --stream | head -c 7")
    assert (result.returncode, result.stdout, result.stderr) == (0, "one two", "")


def test_control_characters_of_a_streamed_caption_and_of_a_servers_error_are_shown_escaped(
    clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with StubServer(caption="Rain\x1b[2J \x1b]0;owned\x07falls\r.") as stub:
        assert call(str(clip), "--base-url", stub.base_url, "--stream") == ExitCode.OK
    bad = (400, {"error": {"message": "bad audio \x1b[31mred\x9b"}})
    with StubServer(replies=[bad]) as stub:
        assert call(str(clip), "--base-url", stub.base_url) == ExitCode.HTTP_4XX
    captured = capsys.readouterr()
    assert captured.out == "Rain\\x1b[2J \\x1b]0;owned\\x07falls\\r.\n"
    assert "HTTP 400: bad audio \\x1b[31mred\\x9b" in captured.err and "\x1b" not in captured.err


@pytest.mark.parametrize("retries", [0, 1, 7, 10, 12])
def test_the_help_computes_the_pauses_as_urllib3_takes_them(retries: int) -> None:
    from captioner.api import retry_pauses
    from captioner.options import backoff_pauses

    assert backoff_pauses(retries) == retry_pauses(retries)  # --help has no urllib3 to ask
