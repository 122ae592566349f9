"""What a caption request carries, made in one place: a mono 16-bit WAV, its `data:` URL, and the
chat-completions body around it.

The body is the one shape the service takes (captioner_server/request_policy.py): one user message holding one
audio part and no text, the model, and sampling fields. The Captioner is trained on audio alone;
a text part would be off its training distribution, so no request the kit sends carries one.

Standard library only: tools/warm_up.py imports this module with the Python that runs vLLM, where
the client's own dependencies (requests, PyAV, numpy) may be missing.
"""

from __future__ import annotations

import base64
import io
import json
import wave
from typing import Any

SAMPLE_RATE = 16_000  # what the Captioner's audio encoder takes; the client resamples to it
WAV_MIME = "audio/wav"


def wav_bytes(pcm: bytes, rate: int = SAMPLE_RATE) -> bytes:
    """A mono WAV file holding `pcm`: 16-bit little-endian samples."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = WAV_MIME) -> str:
    """`data:audio/wav;base64,...`: audio inline in the request, as it is."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def audio_part(url: str) -> dict[str, Any]:
    """vLLM's audio part: a `data:` URL, or an http(s) URL the server may fetch."""
    return {"type": "audio_url", "audio_url": {"url": url}}


def chat_request(
    audio_url: str, model: str, max_tokens: int | None = None, stream: bool = False, **fields: Any
) -> dict[str, Any]:
    """The chat request for one clip. `fields` are further sampling fields (`ignore_eos`,
    `temperature`, ...); without them the server's defaults apply. A stream ends with the
    usage."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": [audio_part(audio_url)]}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(fields)
    return body


_PLACEHOLDER = "\x00audio\x00"  # no data: URL holds a NUL, so the split finds only this


def chat_request_bytes(
    audio: bytes | str,
    model: str,
    max_tokens: int | None = None,
    stream: bool = False,
    mime: str = WAV_MIME,
    **fields: Any,
) -> bytes:
    """`chat_request`'s body as the bytes sent, built once: `audio` is the audio itself (sent as a
    `data:` URL of `mime`) or a URL. The base64 goes straight into the bytes, without the str
    copies of a `data:` URL inside a dict inside `json.dumps`: what a batch holds per request in
    flight is this body and nothing else."""
    if isinstance(audio, str):
        return json.dumps(chat_request(audio, model, max_tokens, stream, **fields)).encode()
    body = json.dumps(chat_request(_PLACEHOLDER, model, max_tokens, stream, **fields))
    before, after = body.split(json.dumps(_PLACEHOLDER)[1:-1])
    return b"".join(
        (before.encode(), f"data:{mime};base64,".encode(), base64.b64encode(audio), after.encode())
    )
