"""What a caption request may be: the request guard's policy, as pure functions (no I/O).

Allow-list by shape (../shared/STYLE.md): a request passes only when every key at every level is
one named here, with the type and range vLLM itself accepts, so that vLLM never rejects (and never
acts on) anything the guard passed. That matters beyond tidiness: vLLM validates sampling fields
*after* it has hashed and processed the request's audio, and a request rejected there leaves its
multimodal cache out of step (the same clip sent again got a 500; on vLLM 0.26 such bugs killed
the engine). Everything here is decided before vLLM sees the media.

The shape: one user message whose content is exactly one audio part,
  {"type": "audio_url", "audio_url": {"url": STR}} or
  {"type": "input_audio", "input_audio": {"data": STR, "format": STR}},
nothing else at any level (vLLM also reads a part's "uuid" as its cache key: one user could store
their clip under the key of a colleague's), and the sampling and output fields of FIELD_RULES.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AUDIO_PART_KEYS = {"audio_url": ("url",), "input_audio": ("data", "format")}
AUDIO_PART_TYPES = frozenset(AUDIO_PART_KEYS)

NO_AUDIO = (
    "this server captions audio: the request holds no audio part (send one audio_url or "
    "input_audio part; the Captioner takes no text prompt)"
)
AUDIO_ONLY = (
    "this server captions audio only: send one user message whose content is audio parts "
    "and nothing else"
)

# Fields accepted only at vLLM's default value: vllm-router (deploy/router.sh) adds all of these
# to every request it forwards; at these values none changes the prompt.
DEFAULT_ONLY_FIELDS: dict[str, bool] = {
    "no_stop_trim": False, "continue_final_message": False, "return_hidden_states": False,
    "separate_reasoning": True, "stream_reasoning": True, "include_reasoning": True,
}  # fmt: skip

INT64 = 2**63
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_TEXT_FIELD = 256  # model, user: echoed in logs and errors, so bounded
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PRINTABLE = re.compile(r"[\x20-\x7e]+")
FORMAT = re.compile(r"[a-z0-9]{1,16}")
# Audio tokens per second of the Captioner (12.5-13) with room, and the chat template's own tokens:
# the longest prompt MAX_AUDIO_SECONDS of audio can make.
PROMPT_TOKENS_PER_SECOND = 14
TEMPLATE_TOKENS = 64


@dataclass(frozen=True)
class Limits:
    """What the served model and the service settings allow (start_service.sh exports them)."""

    vocab_size: int | None = None  # stop_token_ids must be below it
    served_model: str | None = None  # the only `model` accepted
    max_tokens: int | None = None  # the server's default caption length (MAX_TOKENS)
    max_model_len: int | None = None
    max_audio_seconds: int | None = None

    def min_tokens_cap(self, max_tokens: int | None) -> int | None:
        """The most min_tokens vLLM can honour: min_tokens above the caption's length limit, which
        vLLM lowers to the room the prompt leaves, is rejected after the audio was processed."""
        # vLLM lowers the client's max_tokens to MAX_TOKENS (--override-generation-config) too.
        caps = [c for c in (max_tokens, self.max_tokens) if c is not None]
        if self.max_model_len is not None and self.max_audio_seconds is not None:
            longest_prompt = self.max_audio_seconds * PROMPT_TOKENS_PER_SECOND + TEMPLATE_TOKENS
            caps.append(max(0, self.max_model_len - longest_prompt))
        return min(caps) if caps else None


# --- the fields --------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # An int is compared by range as it is: math.isfinite(10**400) raises OverflowError.
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def integer(low: int, high: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and low <= v <= high else f"an integer from {low} to {high}"
    return check


def number(low: float, high: float, low_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and (low < v if low_open else low <= v) and v <= high
        return None if ok else f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v: Any) -> str | None:
    ok = isinstance(v, str) and len(v) <= MAX_TEXT_FIELD and PRINTABLE.fullmatch(v) is not None
    return None if ok else f"printable ASCII text of 1 to {MAX_TEXT_FIELD} characters"


def stop(v: Any) -> str | None:
    items = [v] if isinstance(v, str) else v
    ok = isinstance(items, list) and len(items) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_TEXT_FIELD for s in items)
    return None if ok else (f"a non-empty string, or a list of at most {MAX_STOP_STRINGS} of them, "
                            f"each at most {MAX_TEXT_FIELD} characters")


def request_id(v: Any) -> str | None:
    ok = isinstance(v, str) and REQUEST_ID.fullmatch(v) is not None
    return None if ok else "1 to 128 letters, digits and . _ : -"


def stream_options(v: Any) -> str | None:
    ok = isinstance(v, dict) and set(v) <= {"include_usage", "continuous_usage_stats"} and all(
        isinstance(x, bool) for x in v.values())
    return None if ok else "an object with include_usage and continuous_usage_stats, true or false"


# Every field a caption request may carry, with the values vLLM accepts (or fewer). null means
# "the default" for all of them, as in vLLM.
FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    "model": text,
    "max_tokens": integer(1, INT64 - 1),
    "max_completion_tokens": integer(1, INT64 - 1),
    "min_tokens": integer(0, INT64 - 1),
    "temperature": number(0, 2),
    "top_p": number(0, 1, low_open=True),
    "top_k": integer(-1, INT64 - 1),
    "min_p": number(0, 1),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0, 2, low_open=True),
    "n": integer(1, 1),  # one caption per request; vLLM allows more, the kit has no use for them
    "seed": integer(-INT64, INT64 - 1),
    "stop": stop,
    "stop_token_ids": lambda v: None if isinstance(v, list) and len(v) <= MAX_STOP_TOKEN_IDS and all(
        map(_is_int, v)) else f"a list of at most {MAX_STOP_TOKEN_IDS} token ids",
    "stream": boolean,
    "stream_options": stream_options,
    "logprobs": boolean,
    "top_logprobs": integer(0, MAX_LOGPROBS),
    "user": text,
    "request_id": request_id,
    "priority": integer(0, 0),  # anything else is an error unless vLLM schedules by priority
    "skip_special_tokens": boolean,
    "include_stop_str_in_output": boolean,
    "ignore_eos": boolean,
    "return_token_ids": boolean,
}


def field_problem(body: dict[str, Any], limits: Limits) -> str | None:
    """The first field of a caption request that vLLM would reject, or that the kit does not take."""
    for name, value in body.items():
        if name == "messages":
            continue
        if name in DEFAULT_ONLY_FIELDS:
            if value is not DEFAULT_ONLY_FIELDS[name]:
                default = str(DEFAULT_ONLY_FIELDS[name]).lower()
                return f"{AUDIO_ONLY}; the request field {name} is accepted only as {default}"
            continue
        rule = FIELD_RULES.get(name)
        if rule is None:
            return f"{AUDIO_ONLY}; the request field {shown(name)} is not accepted"
        if value is None:
            continue
        wanted = rule(value)
        if wanted:
            return f"the request field {name} must be {wanted}"
    return relation_problem(body, limits)


def relation_problem(body: dict[str, Any], limits: Limits) -> str | None:
    """Rules between fields, and against the served model."""
    model = body.get("model")
    if model is not None and limits.served_model and model != limits.served_model:
        return f"unknown model: this server serves {limits.served_model!r} (or leave model out)"
    ids = body.get("stop_token_ids") or []
    if limits.vocab_size is not None and any(not 0 <= i < limits.vocab_size for i in ids):
        return f"stop_token_ids must be token ids from 0 to {limits.vocab_size - 1} (the model's vocabulary)"
    if body.get("top_logprobs") and not body.get("logprobs"):
        return "top_logprobs needs logprobs: true"
    if body.get("stream_options") and not body.get("stream"):
        return "stream_options needs stream: true"
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    cap = limits.min_tokens_cap(max_tokens)
    if body.get("min_tokens") and cap is not None and body["min_tokens"] > cap:
        return (f"min_tokens must be at most {cap}: the caption's length limit (max_tokens, the server's "
                "MAX_TOKENS, or the room the context leaves after the longest audio the server takes)")
    return None


# --- the headers vLLM reads ---------------------------------------------------------------------

# Headers vLLM acts on as it would on a request field (vllm/entrypoints/generate/base/serving.py):
# each would set what the body rules keep at vLLM's default, and a rank out of range fails only
# after the audio was processed.
REFUSED_HEADERS = {
    b"x-vllm-priority": "the priority field must be 0 here",
    b"x-data-parallel-rank": "the server picks the engine",
    b"x-session-id": "the request field session_id is not accepted either",
}
# Its value becomes vLLM's request id and appears in vLLM's log lines: the request_id field's rule.
REQUEST_ID_HEADER = b"x-request-id"


def header_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's headers would make vLLM do what the body rules refuse (None when they don't)."""
    for name, value in headers:
        name = name.lower()
        if name in REFUSED_HEADERS:
            return (f"the header {name.decode()} is not accepted ({REFUSED_HEADERS[name]}): "
                    "send the request without it")
        if name == REQUEST_ID_HEADER and REQUEST_ID.fullmatch(value.decode("latin-1")) is None:
            return f"the header x-request-id must be {request_id('')} (or leave it out)"
    return None


def shown(value: str, limit: int = 60) -> str:
    """A client's string as it may appear in an error or a log line: printable, bounded."""
    out = escape(value[:limit])
    return repr(out + ("..." if len(value) > limit else ""))


def escape(value: str) -> str:
    """Control and non-ASCII characters as \\xNN / \\uNNNN: nothing a client sends can start a new
    log line or drive a terminal."""
    return value.encode("ascii", "backslashreplace").decode().translate(_CONTROL)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


# --- the messages ----------------------------------------------------------------------------


def has_audio_part(body: Any) -> bool:
    """True when some message's content list holds an audio part (or the body is not a chat
    request we understand: vLLM's own validation answers that one)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return True
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if part_type(part) in AUDIO_PART_TYPES:
                    return True
    return False


def part_type(part: Any) -> str | None:
    """A content part's "type" when it is a string (a list or an object there is no type)."""
    kind = part.get("type") if isinstance(part, dict) else None
    return kind if isinstance(kind, str) else None


def audio_part_problem(part: dict[str, Any]) -> str | None:
    """Why an audio part is not exactly one of the two shapes (module docstring)."""
    kind = part["type"]
    extra = sorted(set(part) - {"type", kind})
    if extra:
        return f"{AUDIO_ONLY}; an {kind} part takes only type and {kind}, not {shown(extra[0])}"
    inner = part.get(kind)
    keys = AUDIO_PART_KEYS[kind]
    if not isinstance(inner, dict):
        return f"{AUDIO_ONLY}; {kind} must be an object with {' and '.join(keys)}"
    extra = sorted(set(inner) - set(keys))
    if extra:
        return f"{AUDIO_ONLY}; {kind} takes only {' and '.join(keys)}, not {shown(extra[0])}"
    for key in keys:
        if not isinstance(inner.get(key), str) or not inner[key]:
            return f"{kind}.{key} must be a non-empty string"
    if kind == "input_audio" and not FORMAT.fullmatch(inner["format"]):
        return "input_audio.format must be a file type such as wav, mp3 or flac"
    if kind == "audio_url" and url_scheme(inner["url"]) not in URL_SCHEMES:
        scheme = shown(url_scheme(inner["url"]) + ":")
        return (f"audio_url.url must be an http(s) or a data:audio/...;base64, URL, not a {scheme} one: "
                "the server reads no local file (send the audio inline)")
    return None


URL_SCHEMES = ("http", "https", "data")


def url_scheme(url: str) -> str:
    return url.split(":", 1)[0].strip().lower()


def audio_only_problem(body: Any, limits: Limits = Limits()) -> str | None:
    """Why a parsed chat request is not a caption request the service takes (None when it is, or
    when it is no chat request at all: vLLM's own validation answers that one)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    if not has_audio_part(body):
        return NO_AUDIO
    problem = field_problem(body, limits)
    if problem:
        return problem
    messages = body["messages"]
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        return f"{AUDIO_ONLY} (no system, assistant or other messages)"
    unknown = sorted(set(messages[0]) - {"role", "content"})
    if unknown:
        return f"{AUDIO_ONLY}; the message field {shown(unknown[0])} is not accepted"
    content = messages[0]["content"]
    for part in content:
        if part_type(part) not in AUDIO_PART_TYPES:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            return f"{AUDIO_ONLY} (this one holds a part of type {escape(str(kind)[:60])})"
        problem = audio_part_problem(part)
        if problem:
            return problem
    if len(content) != 1:
        return f"{AUDIO_ONLY}: exactly one audio part per request (this one holds {len(content)})"
    return wav_problem(audio_bytes_head(content[0]))


def remote_audio_urls(body: Any) -> list[str]:
    """The http(s) URLs of a chat request's audio_url parts (an audio-only request)."""
    urls = []
    for part in body["messages"][0]["content"]:
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if isinstance(url, str) and url_scheme(url) in ("http", "https"):
            urls.append(url)
    return urls


# --- the audio's own header: what would make the decoder fail -----------------------------------

HEAD_CHARS = 8192  # base64 characters decoded to read a WAV header: 6 KB


def audio_bytes_head(part: dict[str, Any]) -> tuple[bytes, int] | None:
    """(the first bytes, the total size) of an inline clip: a base64 data: URL or input_audio."""
    if part["type"] == "input_audio":
        data = part["input_audio"]["data"]
    else:
        url = part["audio_url"]["url"]
        head, sep, data = url.partition(",")
        if not (sep and head.lower().startswith("data:") and head.lower().endswith(";base64")):
            return None
    chunk = re.sub(r"\s", "", data[:HEAD_CHARS])
    chunk = chunk[: len(chunk) // 4 * 4]
    try:
        decoded = base64.b64decode(chunk, validate=True)
    except (binascii.Error, ValueError):
        return None  # vLLM answers bad base64 itself (400)
    stripped = data.rstrip("= \n\r\t")
    return decoded, len(stripped) * 3 // 4


def wav_problem(head: tuple[bytes, int] | None) -> str | None:
    """Why a WAV's header describes no audio that can be decoded (sample rate 0, thousands of
    channels, no frames): vLLM's decoder answers those with a 500 and a traceback."""
    if head is None:
        return None
    data, total = head
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return None  # not a WAV: the decoder judges it
    at, fmt = 12, None
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        if chunk == b"fmt " and at + 24 <= len(data):
            fmt = struct.unpack_from("<HHIIHH", data, at + 8)
        elif chunk == b"data":
            if fmt is None:
                return "the WAV file has no fmt chunk before its audio: not a WAV a decoder can read"
            _, channels, rate, _, block, bits = fmt
            if not 1 <= channels <= 32:
                return f"the WAV file says it has {channels} channels: not audio a decoder can read"
            if not 1000 <= rate <= 768000:
                return f"the WAV file says its sample rate is {rate} Hz: not audio a decoder can read"
            if bits not in (8, 16, 24, 32, 64) or block == 0:
                return f"the WAV file says {bits} bits a sample: not audio a decoder can read"
            if total <= at + 8:
                return "the WAV file holds no audio (zero frames)"
            return None
        at += 8 + size + (size & 1)
    return None
