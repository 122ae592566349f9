"""captioner_server/request_policy.py, the guard's allow-list by shape (issue #21), without a server:
every key of an audio part, every request field with vLLM's own rules (checked against vLLM's own
validation code), the WAV headers a decoder cannot read, and what a client's text may put into a
log line."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from captioner.payload import audio_part, chat_request, data_url, wav_bytes
from captioner_server.request_policy import (
    FIELD_RULES,
    Limits,
    audio_only_problem,
    escape,
)

CLIP = wav_bytes(b"\x00\x01" * 1600)
LIMITS = Limits(vocab_size=1000, served_model="captioner", max_tokens=64, max_model_len=4096,
                max_audio_seconds=30)


def body(**fields: Any) -> dict[str, Any]:
    """The kit's caption request with `fields` set as given (None included)."""
    return {**chat_request(data_url(CLIP), "captioner"), **fields}


def problem(b: dict[str, Any]) -> str | None:
    return audio_only_problem(b, LIMITS)


# Each admitted field: values vLLM accepts (the guard must pass them) and values vLLM rejects, or
# the kit refuses (the guard must refuse them, naming the field).
GOOD: dict[str, list[Any]] = {
    "model": ["captioner", None],
    "max_tokens": [1, 64, 10**6, None], "max_completion_tokens": [1, 4000],
    "min_tokens": [0, 10], "temperature": [0, 0.6, 2, 2.0], "top_p": [1e-9, 0.95, 1],
    "top_k": [-1, 0, 1, 20, 10**6], "min_p": [0, 0.5, 1], "presence_penalty": [-2, 0, 2],
    "frequency_penalty": [-2.0, 1.5], "repetition_penalty": [0.01, 1, 2], "n": [1],
    "seed": [0, -(2**63), 2**63 - 1], "stop": ["x", ["a", "bc"], []],
    "stop_token_ids": [[], [0, 999]], "stream": [True, False],
    "logprobs": [True, False], "top_logprobs": [0], "user": ["alice@example"],
    "request_id": ["job-1:clip_2.wav"], "priority": [0], "skip_special_tokens": [True, False],
    "include_stop_str_in_output": [False], "ignore_eos": [True], "return_token_ids": [True],
    "stream_options": [None],
}  # fmt: skip
BAD: dict[str, list[Any]] = {
    "model": ["x" * 8_000_000, "other-model", "", "a\nb", 7],
    "max_tokens": [0, -1, 1.5, "8", True, 2**63], "max_completion_tokens": [0, "x"],
    "min_tokens": [-1, 0.5, 65, 10**6], "temperature": [9, -0.1, float("nan"), "hot", True],
    "top_p": [0, 1.01, -1], "top_k": [-2, 1.5, "20"], "min_p": [-0.1, 1.1],
    "presence_penalty": [2.5, -3], "frequency_penalty": [3], "repetition_penalty": [0, -1, 2.5],
    "n": [0, 2, 17, 16384], "seed": [2**63, -(2**63) - 1, 1.5],
    "stop": ["", [""], ["x"] * 17, ["y" * 257], [1], {"a": 1}],
    "stop_token_ids": [[1000], [-1], [2**40], ["1"], [1.5], list(range(65)), 5],
    "stream": ["yes", 1], "logprobs": [1, "true"], "top_logprobs": [21, 1000, -1, 1.5],
    "user": ["u" * 257, "\x1b[31m"], "request_id": ["a\nb", "\x1b]0;x", "r" * 129, "", 5, "a b"],
    "priority": [1, -1], "skip_special_tokens": ["no"], "include_stop_str_in_output": [0],
    "ignore_eos": ["true"], "return_token_ids": [1], "stream_options": [{"include_usage": True}],
}  # fmt: skip


def test_every_admitted_field_has_good_and_bad_cases_here() -> None:
    assert set(GOOD) == set(FIELD_RULES) == set(BAD)


@pytest.mark.parametrize("field", sorted(FIELD_RULES))
def test_each_field_passes_what_vllm_takes_and_refuses_the_rest_by_name(field: str) -> None:
    for value in GOOD[field]:
        extra = {"logprobs": True} if field == "top_logprobs" else {}
        assert problem(body(**{field: value}, **extra)) is None, (field, value)
    for value in BAD[field]:
        found = problem(body(**{field: value}))
        assert found is not None, (field, value)
        assert field in found or "model" in found, (field, found)
        assert len(found) < 300 and escape(found) == found, found  # bounded, one printable line


def test_fields_between_them_top_logprobs_needs_logprobs_stream_options_needs_stream() -> None:
    assert "top_logprobs needs logprobs" in str(problem(body(top_logprobs=5)))
    assert problem(body(top_logprobs=5, logprobs=True)) is None
    assert "stream_options needs stream" in str(problem(body(stream_options={"include_usage": True})))
    assert problem(body(stream=True)) is None  # the kit's own streamed request
    assert "min_tokens must be at most 10" in str(problem(body(max_tokens=10, min_tokens=20)))
    # A max_tokens above MAX_TOKENS is lowered to it by vLLM: so is min_tokens' cap.
    assert "min_tokens must be at most 64" in str(problem(body(max_tokens=30000, min_tokens=20000)))
    # No max_tokens: the server's MAX_TOKENS is the cap; a context that leaves less room lowers it.
    assert "at most 64" in str(problem(body(min_tokens=65)))
    short = Limits(max_tokens=16384, max_model_len=4096, max_audio_seconds=600)
    assert "at most 0" in str(audio_only_problem(body(min_tokens=1), short))
    assert problem(body(model=None)) is None and audio_only_problem(body(model="any"), Limits()) is None


def test_the_fields_the_guard_passes_are_ones_vllms_own_validation_accepts() -> None:
    """vLLM's ChatCompletionRequest and SamplingParams (which run after the audio is processed)
    accept every good value above: the guard passes nothing vLLM would reject."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    for field, values in GOOD.items():
        for value in values:
            if value is None:
                continue
            b = body(**{field: value}, **({"logprobs": True} if field == "top_logprobs" else {}))
            request = ChatCompletionRequest.model_validate(b)
            request.to_sampling_params(max_tokens=64, default_sampling_params={})
    for field, value in (("temperature", 9), ("n", 0), ("min_tokens", 65), ("top_logprobs", 1000)):
        with pytest.raises((ValueError, VLLMValidationError)):  # vLLM's own errors, after the media
            request = ChatCompletionRequest.model_validate(body(**{field: value}, logprobs=True))
            params = request.to_sampling_params(max_tokens=64, default_sampling_params={})
            if field == "top_logprobs" and params.logprobs and params.logprobs > 20:
                raise ValueError("Requested sample logprobs over max allowed (20), as vLLM's verify says")


def test_an_audio_part_is_exactly_one_of_two_shapes_and_any_other_key_is_named() -> None:
    url = data_url(CLIP)
    b64 = base64.b64encode(CLIP).decode()
    assert problem(body()) is None
    inline = body()
    inline["messages"][0]["content"] = [{"type": "input_audio",
                                         "input_audio": {"data": b64, "format": "wav"}}]
    assert problem(inline) is None
    parts: list[tuple[str, dict[str, Any]]] = [  # (the key the error must name, the part)
        ("uuid", {**audio_part(url), "uuid": "a" * 64}),
        ("uuid", {"type": "audio_url", "audio_url": None, "uuid": "x"}),  # the cache oracle
        ("tool_reference", {"type": "audio_url", "tool_reference": "t", "uuid": "x"}),
        ("name", {"type": "audio_url", "audio_url": {"url": url}, "name": "x"}),
        ("detail", {"type": "audio_url", "audio_url": {"url": url, "detail": "high"}}),
        ("uuid", {"type": "audio_url", "audio_url": {"url": url, "uuid": "x"}}),
        ("uuid", {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}, "uuid": "x"}),
        ("x", {"type": "input_audio", "input_audio": {"data": b64, "format": "wav", "x": 1}}),
    ]
    for key, part in parts:
        b = body()
        b["messages"][0]["content"] = [part]
        found = problem(b)
        assert found is not None and repr(key) in found, (part, found)
    for name, part in {
        "audio_url null": {"type": "audio_url", "audio_url": None},
        "url missing": {"type": "audio_url", "audio_url": {}},
        "url not a string": {"type": "audio_url", "audio_url": {"url": 5}},
        "string audio_url": {"type": "audio_url", "audio_url": url},
        "format missing": {"type": "input_audio", "input_audio": {"data": b64}},
        "format odd": {"type": "input_audio", "input_audio": {"data": b64, "format": "../x"}},
    }.items():
        b = body()
        b["messages"][0]["content"] = [part]
        assert problem(b) is not None, name


def wav_header(channels: int = 1, rate: int = 16000, bits: int = 16, frames: int = 100) -> bytes:
    block = channels * bits // 8
    data = b"\x00" * (frames * block)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block % 2**32, block % 2**16, bits)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


@pytest.mark.parametrize(("wav", "words"), [
    (wav_header(rate=0), "sample rate is 0 Hz"),
    (wav_header(channels=65535, frames=1), "65535 channels"),
    (wav_header(channels=0), "0 channels"),
    (wav_header(frames=0), "zero frames"),
    (wav_header(bits=0), "0 bits"),
])
def test_a_wav_whose_header_cannot_be_decoded_is_refused_in_one_line(wav: bytes, words: str) -> None:
    inline = {"data": base64.b64encode(wav).decode(), "format": "wav"}
    for part in ({"type": "audio_url", "audio_url": {"url": data_url(wav)}},
                 {"type": "input_audio", "input_audio": inline}):
        b = body()
        b["messages"][0]["content"] = [part]
        found = problem(b)
        assert found is not None and words in found and "\n" not in found


def test_ordinary_and_unusual_but_valid_audio_passes_the_header_check() -> None:
    for wav in (wav_header(), wav_header(channels=2, rate=44100), wav_header(bits=24, rate=48000), CLIP):
        assert problem(body(**{})) is None
        b = body()
        b["messages"][0]["content"] = [audio_part(data_url(wav))]
        assert problem(b) is None
    listed = wav_header()[:12] + b"LIST" + struct.pack("<I", 5) + b"abcde\x00" + wav_header()[12:]
    b = body()
    b["messages"][0]["content"] = [audio_part(data_url(listed))]
    assert problem(b) is None  # an odd-sized chunk before fmt (padded) is walked over
    for other in (b"ID3\x04" + b"\x00" * 100, b"fLaC" + b"\x00" * 100, b"not base64 at all!"):
        b = body()
        url = "data:audio/mpeg;base64," + base64.b64encode(other).decode()
        b["messages"][0]["content"] = [audio_part(url)]
        assert problem(b) is None  # not a WAV: the decoder judges it


def test_escape_leaves_nothing_that_starts_a_line_or_drives_a_terminal() -> None:
    assert escape("a\nb\r\x1b[31m\x7f\u2028é") == "a\\x0ab\\x0d\\x1b[31m\\x7f\\u2028\\xe9"
    assert escape("/v1/chat/completions") == "/v1/chat/completions"
