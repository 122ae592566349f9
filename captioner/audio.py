"""Decode audio, measure it, and split long audio into windows.

Decoding uses PyAV (FFmpeg) rather than soundfile: libsndfile reads WAV, FLAC and
Ogg but not AAC/M4A, WebM/Opus-in-Matroska or AMR, which operators do have, and
FFmpeg probes the container from the bytes, so stdin and extension-less URLs work.
PyAV also resamples and downmixes in the same pass (`av.AudioResampler`). The
server's own loader (vLLM: torchcodec, then soundfile, then PyAV) reads whatever
FFmpeg reads, so a file short enough to go out untouched is one it can decode.

Audio no longer than the window is sent as the original bytes with its MIME type,
after a probe that reads the duration without decoding the whole file: from the
header for containers that record it, else by counting packets (still no decode);
the first audio frame is decoded, so non-audio input still fails here and not on
the server. Only longer audio (or audio whose length neither gives) is decoded in
full. Longer audio is cut into windows of at most `max_seconds`, each cut placed at the
quietest moment of the window's last stretch when that moment is really quiet,
else exactly at the limit; windows are sent as 16 kHz mono 16-bit WAV, the rate the
model's audio encoder works at.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import numpy.typing as npt

from captioner.errors import InputError
from captioner.payload import SAMPLE_RATE, WAV_MIME, wav_bytes

FRAME_SECONDS = 0.05  # loudness is measured over 50 ms frames
QUIET_FLOOR = 10 ** (-45 / 20)  # below -45 dBFS RMS counts as quiet whatever the rest
QUIET_RATIO = 0.1  # or 20 dB below the file's median frame loudness
CUT_SEARCH_SECONDS = 2.0  # a cut is looked for in the window's last 2 s,
CUT_SEARCH_DIVISOR = 5  # or its last fifth when that is longer
MAX_WINDOW_SECONDS = 30.0  # the longest window by default: the model is at its best on 30 s or less
LIMIT_SLACK_SECONDS = 0.1  # over a length limit by less (codec padding, resampling) is not over

# First matching FFmpeg demuxer name → MIME type for the data: URL.
_MIME_BY_FORMAT = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mov": "audio/mp4",
    "mp4": "audio/mp4",
    "matroska": "audio/webm",
    "webm": "audio/webm",
    "aiff": "audio/aiff",
    "aac": "audio/aac",
    "amr": "audio/amr",
    "asf": "audio/x-ms-wma",
}

# Demuxers whose duration FFmpeg reads from the file itself (a header, an index, the last
# page's granule). For the rest (raw MP3 without a Xing header, ADTS AAC, AMR, ...) it
# estimates from the bitrate: 26.9 s for a 31.4 s VBR MP3 in a test. Those are measured by
# counting packets instead.
_HEADER_DURATION_FORMATS = {"wav", "aiff", "flac", "ogg", "mov", "mp4", "matroska", "webm", "asf"}

# A full decode is CPU-bound and holds the whole file as float32 while its windows are
# cut: no more at once than there are cores, however many inputs wait on the server.
_FULL_DECODE_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 2)

Samples = npt.NDArray[np.float32]


class AudioTooLong(InputError):
    """Audio longer than a caller's limit: `seconds` long (`exact`), or at least that long (the
    decode stopped there)."""

    def __init__(self, name: str, seconds: float, limit: float, exact: bool) -> None:
        super().__init__(f"{name}: {'' if exact else 'more than '}{seconds:.1f} s of audio, "
                         f"over the limit of {limit:g} s")
        self.seconds, self.limit, self.exact = seconds, limit, exact


@dataclass(frozen=True)
class Decoded:
    samples: Samples  # mono float32 at SAMPLE_RATE
    mime: str
    container: str  # FFmpeg's demuxer name, for messages

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class Probed:
    duration: float | None  # seconds; None when neither header nor packets tell
    mime: str
    container: str


@dataclass(frozen=True)
class Window:
    start: float  # seconds into the input
    end: float
    data: bytes
    mime: str


class PreparedAudio:
    """What to send for one input: its windows, made one at a time.

    Short audio is one window, the input's own bytes. Long audio keeps its decoded
    samples as 16-bit PCM (half the float32) and the planned cuts; each window's WAV
    is encoded only when asked for (`window(i)`), so a 7-minute file holds 13 MB, not
    its 14 encoded windows as well, and `release()` lets it go once the last window
    is out.
    """

    def __init__(
        self,
        duration: float,
        mime: str,
        windows: list[Window] | None = None,
        pcm: npt.NDArray[np.int16] | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        self.duration = duration
        self.mime = mime
        self._windows = windows
        self._pcm = pcm
        self.spans = (
            [(w.start, w.end) for w in windows]
            if windows is not None
            else [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in ranges or []]
        )
        self._ranges = ranges or []

    @property
    def count(self) -> int:
        return len(self.spans)

    def window(self, index: int) -> Window:
        if self._windows is not None:
            return self._windows[index]
        if self._pcm is None:
            raise RuntimeError("window() after release()")
        start, end = self._ranges[index]
        wav = wav_bytes(self._pcm[start:end].tobytes())
        return Window(start / SAMPLE_RATE, end / SAMPLE_RATE, wav, WAV_MIME)

    @property
    def windows(self) -> list[Window]:
        return [self.window(i) for i in range(self.count)]

    def release(self) -> None:
        """Drop the audio (the spans stay): every window has been made."""
        self._windows = None if self._windows is None else []
        self._pcm = None


@contextlib.contextmanager
def _open_audio(data: bytes, name: str) -> Iterator[tuple[av.container.InputContainer, av.AudioStream]]:
    """The container and its first audio stream; `InputError` for empty input or no audio stream.
    FFmpeg errors pass through for the caller to word."""
    if not data:
        raise InputError(f"{name}: empty input (0 bytes)")
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise InputError(f"{name}: no audio stream ({container.format.name} data, not audio)")
        yield container, container.streams.audio[0]


def probe(data: bytes, name: str) -> Probed:
    """Check that `data` is audio (its first frame decodes) and read its duration cheaply.

    The same `InputError`s as `decode` for input that is not audio, without decoding
    more than the first frame.
    """
    try:
        with _open_audio(data, name) as (container, stream):
            container_name = container.format.name
            duration = None
            if _HEADER_DURATION_FORMATS.intersection(container_name.split(",")):
                duration = _header_duration(container, stream)
            count_packets = duration is None
            first: int | None = None
            end: int | None = None
            has_samples = False
            for packet in container.demux(stream):
                if not has_samples:
                    has_samples = any(frame.samples for frame in packet.decode())
                if count_packets and packet.pts is not None and packet.duration:
                    first = packet.pts if first is None else min(first, packet.pts)
                    end = max(end or packet.pts, packet.pts + packet.duration)
                if has_samples and not count_packets:
                    break
    except av.FFmpegError as exc:
        raise InputError(f"{name}: cannot decode audio: {_ffmpeg_reason(exc)}") from exc
    if not has_samples:
        raise InputError(f"{name}: no audio samples decoded (empty or truncated file)")
    if duration is None and first is not None and end is not None and end > first and stream.time_base:
        duration = float((end - first) * stream.time_base)
    return Probed(duration, mime_for_container(container_name), container_name)


def _header_duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return None
    return seconds if seconds > 0 else None


def decode(data: bytes, name: str, limit_seconds: float | None = None) -> Decoded:
    """Decode any FFmpeg-readable audio to mono float32 at 16 kHz; `InputError` if not audio.
    With `limit_seconds`, `AudioTooLong` as soon as more than that has been decoded: a small
    file that decodes to hours (a header that lies, silence compressed to nothing) costs no more
    memory than the limit."""
    try:
        with _open_audio(data, name) as (container, stream):
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            chunks: list[Samples] = []
            decoded = 0
            cap = None if limit_seconds is None else (limit_seconds + LIMIT_SLACK_SECONDS) * SAMPLE_RATE
            for frame in container.decode(stream):
                for f in resampler.resample(frame):
                    chunks.append(_mono(f))
                    decoded += len(chunks[-1])
                if cap is not None and limit_seconds is not None and decoded > cap:
                    raise AudioTooLong(name, decoded / SAMPLE_RATE, limit_seconds, exact=False)
            chunks.extend(_mono(f) for f in resampler.resample(None))
            container_name = container.format.name
    except av.FFmpegError as exc:
        raise InputError(f"{name}: cannot decode audio: {_ffmpeg_reason(exc)}") from exc
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    del chunks
    if samples.size == 0:
        raise InputError(f"{name}: no audio samples decoded (empty or truncated file)")
    return Decoded(samples, mime_for_container(container_name), container_name)


def _mono(frame: av.AudioFrame) -> Samples:
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(-1)


def mime_for_container(container_name: str) -> str:
    for part in container_name.split(","):
        if part in _MIME_BY_FORMAT:
            return _MIME_BY_FORMAT[part]
    return "audio/wav" if not container_name else f"audio/{container_name.split(',')[0]}"


def _ffmpeg_reason(exc: av.FFmpegError) -> str:
    return str(getattr(exc, "strerror", None) or exc).strip() or type(exc).__name__


def plan_windows(samples: Samples, max_seconds: float) -> list[tuple[int, int]]:
    """Sample ranges of at most `max_seconds` covering `samples`, cut at quiet points.

    Each cut is searched for in the last fifth of its window (at least 2 s): the
    quietest 50 ms frame there, if it is quiet (see QUIET_FLOOR, QUIET_RATIO), else
    the cut lands exactly at the limit. Sound with no pause is therefore cut at
    0-30, 30-60, 60-75 s; speech is cut between words.
    """
    total = len(samples)
    limit = round(max_seconds * SAMPLE_RATE)
    if limit <= 0:
        raise ValueError("max_seconds must be positive")
    if total <= limit:
        return [(0, total)]
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
    n_frames = total // frame
    rms = np.sqrt(np.mean(np.square(samples[: n_frames * frame].reshape(n_frames, frame)), axis=1))
    threshold = max(QUIET_FLOOR, QUIET_RATIO * float(np.median(rms)))
    search = max(round(CUT_SEARCH_SECONDS * SAMPLE_RATE), limit // CUT_SEARCH_DIVISOR)

    ranges: list[tuple[int, int]] = []
    start = 0
    while total - start > limit:
        cut = start + limit
        # Frames [first, last) lie within the search span that ends at the cut.
        first = max(0, -(-(cut - search) // frame))  # windows under 2 s: the span starts at 0
        last = cut // frame
        if last > first:
            window_rms = rms[first:last]
            quietest = float(window_rms.min())
            if quietest <= threshold:
                # Latest of the quietest frames: keeps windows as long as allowed.
                index = first + int(np.flatnonzero(window_rms == quietest)[-1])
                cut = min(index * frame + frame // 2, start + limit)
        if cut <= start:  # cannot happen with a positive search span; guard anyway
            cut = start + limit
        ranges.append((start, cut))
        start = cut
    ranges.append((start, total))
    return ranges


def window_seconds(max_audio_seconds: float | None) -> float:
    """The longest window: MAX_WINDOW_SECONDS, or the server's MAX_AUDIO_SECONDS where that is
    lower (the server refuses longer audio, so longer windows would all be refused)."""
    if max_audio_seconds is not None and max_audio_seconds > 0:
        return min(MAX_WINDOW_SECONDS, max_audio_seconds)
    return MAX_WINDOW_SECONDS


def to_pcm16(samples: Samples) -> npt.NDArray[np.int16]:
    scaled = np.clip(samples, -1.0, 1.0)  # one float32 temporary, scaled in place
    scaled *= 32767.0
    return scaled.astype("<i2")


def _check_length(name: str, seconds: float, limit_seconds: float) -> None:
    if seconds > limit_seconds + LIMIT_SLACK_SECONDS:
        raise AudioTooLong(name, seconds, limit_seconds, exact=True)


def prepare(
    data: bytes, name: str, max_seconds: float, *, limit_seconds: float | None = None
) -> PreparedAudio:
    """What to send for `data`: the original bytes, or WAV windows.

    Only audio longer than `max_seconds` by its probed duration (or of unknown
    duration) is decoded in full; the decoded length then decides. With `limit_seconds`
    (the service's own route: MAX_AUDIO_SECONDS), longer audio is `AudioTooLong`, from the
    probed duration when it tells, else while decoding.
    """
    probed = probe(data, name)
    if limit_seconds is not None and probed.duration is not None:
        _check_length(name, probed.duration, limit_seconds)
    if probed.duration is not None and probed.duration <= max_seconds:
        return PreparedAudio(probed.duration, probed.mime, [Window(0.0, probed.duration, data, probed.mime)])
    with _FULL_DECODE_SLOTS:
        decoded = decode(data, name, limit_seconds)
        if limit_seconds is not None:
            _check_length(name, decoded.duration, limit_seconds)
        if decoded.duration <= max_seconds:
            window = Window(0.0, decoded.duration, data, decoded.mime)
            return PreparedAudio(decoded.duration, decoded.mime, [window])
        ranges = plan_windows(decoded.samples, max_seconds)
        pcm = to_pcm16(decoded.samples)
        duration, mime = decoded.duration, decoded.mime
        del decoded  # the float32 samples: twice the PCM
    return PreparedAudio(duration, mime, pcm=pcm, ranges=ranges)
