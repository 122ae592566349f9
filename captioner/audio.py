"""Decode audio, measure it, and split long audio into windows.

Decoding uses PyAV (FFmpeg) rather than soundfile: libsndfile reads WAV, FLAC and
Ogg but not AAC/M4A, WebM/Opus-in-Matroska or AMR, which operators do have, and
FFmpeg probes the container from the bytes, so stdin and extension-less URLs work.
PyAV also resamples and downmixes in the same pass (`av.AudioResampler`). The
service's vLLM decodes with libsndfile alone (start_service.sh: FFmpeg's concat, HLS and
DASH demuxers open the files and URLs that the bytes name, so the server never runs FFmpeg
on a request's audio), and the service's own upload route reads only `SAFE_FORMATS`.

Audio no longer than the window, in a form libsndfile reads (`SNDFILE_READS`: PCM WAV or
AIFF, FLAC, MP3, Ogg Vorbis or Opus), is sent as the original bytes with its MIME type,
after a probe that reads the duration without decoding the whole file: from the
header for containers that record it, else by counting packets (still no decode);
the first audio frame is decoded, so non-audio input still fails here and not on
the server. Other audio (M4A, WebM, a video's sound track, ...), longer audio and audio
whose length neither gives are decoded in full and sent as WAV.
Longer audio is cut into windows of at most `max_seconds`, each cut placed at the
quietest moment of the window's last stretch when that moment is really quiet,
else exactly at the limit; windows are sent as 16 kHz mono 16-bit WAV, the rate the
model's audio encoder works at.

Memory does not grow with the length of the audio: the full decode streams its 16-bit
samples into an unnamed temporary file (`PcmSpool`) and keeps only the loudness of each
50 ms frame (what the cuts are planned from); a window's WAV is made from the file only when
its `data` is asked for (when its request goes out), and the file goes when the last window
is dropped. Files are read by FFmpeg from their path, not loaded: a long file is never in
memory whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
import numpy.typing as npt

from captioner.errors import InputError
from captioner.options import MAX_WINDOW_SECONDS
from captioner.payload import SAMPLE_RATE, WAV_MIME, wav_bytes

__all__ = ["MAX_WINDOW_SECONDS", "SAMPLE_RATE", "prepare", "probe"]

FRAME_SECONDS = 0.05  # loudness is measured over 50 ms frames
QUIET_FLOOR = 10 ** (-45 / 20)  # below -45 dBFS RMS counts as quiet whatever the rest
QUIET_RATIO = 0.1  # or 20 dB below the file's median frame loudness
CUT_SEARCH_SECONDS = 2.0  # a cut is looked for in the window's last 2 s,
CUT_SEARCH_DIVISOR = 5  # or its last fifth when that is longer
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

# What the service's decoder (libsndfile) reads, by FFmpeg's demuxer and decoder names: audio
# in these goes out as it is; anything else as WAV.
SNDFILE_READS: dict[str, tuple[str, ...]] = {
    "wav": ("pcm_",),
    "aiff": ("pcm_",),
    "flac": ("flac",),
    "mp3": ("mp3",),
    "ogg": ("vorbis", "opus", "flac"),
}

# The demuxers the service's upload route lets FFmpeg use: audio and audio-in-video containers,
# none of which opens a file or URL named inside the bytes (FFmpeg's concat, HLS, DASH and
# image2 do, from a text file sent as "audio").
SAFE_FORMATS = "wav,w64,aiff,flac,mp3,ogg,mov,matroska,aac,amr,asf,caf"
CONTAINERS_TOLD = "WAV, FLAC, MP3, Ogg, Opus, M4A/MP4, WebM/Matroska, AIFF, AAC, AMR, WMA or CAF"

# Demuxers whose duration FFmpeg reads from the file itself (a header, an index, the last
# page's granule). For the rest (raw MP3 without a Xing header, ADTS AAC, AMR, ...) it
# estimates from the bitrate: 26.9 s for a 31.4 s VBR MP3 in a test. Those are measured by
# counting packets instead.
_HEADER_DURATION_FORMATS = {"wav", "aiff", "flac", "ogg", "mov", "mp4", "matroska", "webm", "asf"}

# Full decodes (and window encodes, batch.py) at once: CPU-bound work, a few at a time whatever
# the core count or the concurrency.
DECODE_WORKERS = min(4, os.cpu_count() or 1)
_FULL_DECODE_SLOTS = threading.BoundedSemaphore(DECODE_WORKERS)

Samples = npt.NDArray[np.float32]
Media = str | bytes | BinaryIO  # a file's path, the bytes themselves, or a seekable binary file


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
    as_is: bool = False  # libsndfile reads it (SNDFILE_READS): it may go out untouched


def sndfile_reads(container: str, codec: str) -> bool:
    """Whether libsndfile (the service's decoder) reads `codec` audio in `container` (FFmpeg's
    names: `mov,mp4,m4a,...`, `mp3float`)."""
    codecs = SNDFILE_READS.get(container.split(",")[0])
    return codecs is not None and codec.startswith(codecs)


class PcmSpool:
    """A long input's decoded audio, 16-bit mono samples at SAMPLE_RATE, in an unnamed temporary
    file: written once by the decode, then read a window at a time from any thread. The file is
    closed when the spool is garbage (its last window sent or dropped), or by `close()`."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="captioner-pcm-")
        self._closer = weakref.finalize(self, self._file.close)
        self.samples = 0

    def append(self, samples: Samples) -> None:
        self._file.write(to_pcm16(samples).tobytes())
        self.samples += len(samples)

    def done(self) -> None:
        self._file.flush()

    def read(self, start: int, end: int) -> bytes:
        """Samples [start, end) as little-endian 16-bit PCM."""
        want, offset, parts = (end - start) * 2, start * 2, []
        while want > 0:
            part = os.pread(self._file.fileno(), want, offset)
            if not part:
                break
            parts.append(part)
            want, offset = want - len(part), offset + len(part)
        return b"".join(parts)

    def close(self) -> None:
        self._closer()


class Window:
    """One request's audio: `start` and `end` in seconds, its MIME type, and `data`, the bytes
    to send: the input's own, or a WAV made from the spool when asked (as its request goes
    out), so a window waiting to be sent holds no audio."""

    def __init__(
        self,
        start: float,
        end: float,
        data: bytes | None,
        mime: str,
        spool: PcmSpool | None = None,
        samples: tuple[int, int] = (0, 0),
    ) -> None:
        self.start, self.end, self.mime = start, end, mime
        self._data, self._spool, self._samples = data, spool, samples

    @property
    def size(self) -> int:
        """The length of `data`, known without making it."""
        if self._data is not None:
            return len(self._data)
        return (self._samples[1] - self._samples[0]) * 2 + 44  # 16-bit samples and the WAV header

    @property
    def data(self) -> bytes:
        if self._data is not None:
            return self._data
        if self._spool is None:
            raise RuntimeError("a window without audio")
        return wav_bytes(self._spool.read(*self._samples))


class PreparedAudio:
    """What to send for one input: its windows.

    Short audio is one window, the input's own bytes. Long audio is a `PcmSpool` and the planned
    cuts; each window's WAV is made only when its `data` is asked for, and `release()` drops this
    object's hold on the spool (windows already handed out keep theirs).
    """

    def __init__(
        self,
        duration: float,
        mime: str,
        windows: list[Window] | None = None,
        spool: PcmSpool | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        self.duration = duration
        self.mime = mime
        self._windows = windows
        self._spool = spool
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
        if self._spool is None:
            raise RuntimeError("window() after release()")
        start, end = self._ranges[index]
        return Window(start / SAMPLE_RATE, end / SAMPLE_RATE, None, WAV_MIME, self._spool, (start, end))

    @property
    def windows(self) -> list[Window]:
        return [self.window(i) for i in range(self.count)]

    def release(self) -> None:
        """Every window has been handed out: drop the audio held here (the spans stay)."""
        self._windows = None if self._windows is None else []
        self._spool = None


def media_bytes(media: Media, name: str) -> bytes:
    """All the bytes of `media`; `InputError` if they cannot be read."""
    if isinstance(media, bytes):
        return media
    try:
        if isinstance(media, str):
            with open(media, "rb") as f:
                return f.read()
        media.seek(0)
        return media.read()
    except OSError as exc:
        raise InputError(f"{name}: {exc.strerror or exc}") from exc


def _media_size(media: Media, name: str) -> int:
    if isinstance(media, bytes):
        return len(media)
    try:
        if isinstance(media, str):
            return os.stat(media).st_size
        return media.seek(0, os.SEEK_END)
    except OSError as exc:
        raise InputError(f"{name}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _open_audio(
    media: Media, name: str, formats: str | None = None
) -> Iterator[tuple[av.container.InputContainer, av.AudioStream]]:
    """The container and its first audio stream; `InputError` for empty or unreadable input, no
    audio stream, or (with `formats`, FFmpeg's demuxer names) a container not among them. Other
    FFmpeg errors pass through for the caller to word."""
    if not _media_size(media, name):
        raise InputError(f"{name}: empty input (0 bytes)")
    if isinstance(media, bytes):
        source: str | BinaryIO = io.BytesIO(media)
    elif isinstance(media, str):
        source = "file:" + os.path.abspath(media)  # FFmpeg reads it: no protocol but file's
    else:
        media.seek(0)
        source = media
    try:
        container = av.open(source, mode="r", options={"format_whitelist": formats} if formats else None)
    except av.FFmpegError as exc:
        if formats and exc.errno == errno.EINVAL:  # FFmpeg: "Format ... not on whitelist"
            raise InputError(f"{name}: not an audio file this server reads ({CONTAINERS_TOLD})") from exc
        raise
    with container:
        if not container.streams.audio:
            raise InputError(f"{name}: no audio stream ({container.format.name} data, not audio)")
        yield container, container.streams.audio[0]


def probe(data: Media, name: str, formats: str | None = None) -> Probed:
    """Check that `data` is audio (its first frame decodes) and read its duration cheaply.

    The same `InputError`s as `decode` for input that is not audio, without decoding
    more than the first frame.
    """
    try:
        with _open_audio(data, name, formats) as (container, stream):
            container_name = container.format.name
            as_is = sndfile_reads(container_name, stream.codec_context.name)
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
    return Probed(duration, mime_for_container(container_name), container_name, as_is)


def _header_duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return None
    return seconds if seconds > 0 else None


def _resampled(
    container: av.container.InputContainer, stream: av.AudioStream, name: str, limit_seconds: float | None
) -> Iterator[Samples]:
    """The stream decoded to mono float32 at SAMPLE_RATE, a chunk at a time. With `limit_seconds`,
    `AudioTooLong` as soon as more than that has been decoded: a small file that decodes to hours
    (a header that lies, silence compressed to nothing) costs no more than the limit."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    decoded = 0
    cap = None if limit_seconds is None else (limit_seconds + LIMIT_SLACK_SECONDS) * SAMPLE_RATE
    for frame in container.decode(stream):
        for f in resampler.resample(frame):
            chunk = _mono(f)
            decoded += len(chunk)
            yield chunk
        if cap is not None and limit_seconds is not None and decoded > cap:
            raise AudioTooLong(name, decoded / SAMPLE_RATE, limit_seconds, exact=False)
    yield from (_mono(f) for f in resampler.resample(None))


def decode(data: Media, name: str, limit_seconds: float | None = None) -> Decoded:
    """Decode any FFmpeg-readable audio to mono float32 at 16 kHz, whole; `InputError` if not
    audio, `AudioTooLong` past `limit_seconds` (see `_resampled`). `prepare` does not hold long
    audio whole: it streams it to a `PcmSpool` (`decode_to_spool`)."""
    try:
        with _open_audio(data, name) as (container, stream):
            chunks = list(_resampled(container, stream, name, limit_seconds))
            container_name = container.format.name
    except av.FFmpegError as exc:
        raise InputError(f"{name}: cannot decode audio: {_ffmpeg_reason(exc)}") from exc
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    del chunks
    if samples.size == 0:
        raise InputError(f"{name}: no audio samples decoded (empty or truncated file)")
    return Decoded(samples, mime_for_container(container_name), container_name)


@dataclass(frozen=True)
class Spooled:
    spool: PcmSpool
    loudness: Samples  # RMS of each FRAME_SECONDS frame (`frame_rms`)
    mime: str

    @property
    def duration(self) -> float:
        return self.spool.samples / SAMPLE_RATE


class _Loudness:
    """RMS per frame of samples that arrive in chunks: the same numbers as `frame_rms` of them
    all at once (each frame's mean is taken over the same 800 values in the same way)."""

    def __init__(self) -> None:
        self.frame = int(FRAME_SECONDS * SAMPLE_RATE)
        self._carry: Samples = np.zeros(0, np.float32)
        self._parts: list[Samples] = []

    def add(self, chunk: Samples) -> None:
        data = np.concatenate([self._carry, chunk]) if self._carry.size else chunk
        whole = len(data) // self.frame * self.frame
        if whole:
            self._parts.append(frame_rms(data[:whole], self.frame))
        self._carry = data[whole:].copy()

    def result(self) -> Samples:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)


def frame_rms(samples: Samples, frame: int) -> Samples:
    """RMS of each whole `frame` of `samples` (a tail shorter than a frame is left out)."""
    n_frames = len(samples) // frame
    return np.sqrt(np.mean(np.square(samples[: n_frames * frame].reshape(n_frames, frame)), axis=1))


def decode_to_spool(
    data: Media, name: str, limit_seconds: float | None = None, formats: str | None = None
) -> Spooled:
    """Decode `data` as `decode` does, into a `PcmSpool` and the loudness of its frames, holding
    no more than a chunk of samples at a time."""
    spool = PcmSpool()
    loudness = _Loudness()
    try:
        with _open_audio(data, name, formats) as (container, stream):
            for chunk in _resampled(container, stream, name, limit_seconds):
                loudness.add(chunk)
                spool.append(chunk)
            container_name = container.format.name
    except av.FFmpegError as exc:
        spool.close()
        raise InputError(f"{name}: cannot decode audio: {_ffmpeg_reason(exc)}") from exc
    except BaseException:
        spool.close()
        raise
    spool.done()
    if spool.samples == 0:
        spool.close()
        raise InputError(f"{name}: no audio samples decoded (empty or truncated file)")
    return Spooled(spool, loudness.result(), mime_for_container(container_name))


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
    return plan_cuts(frame_rms(samples, int(FRAME_SECONDS * SAMPLE_RATE)), len(samples), max_seconds)


def plan_cuts(rms: Samples, total: int, max_seconds: float) -> list[tuple[int, int]]:
    """`plan_windows` from what a streamed decode keeps: the loudness of each frame (`frame_rms`)
    and the number of samples."""
    limit = round(max_seconds * SAMPLE_RATE)
    if limit <= 0:
        raise ValueError("max_seconds must be positive")
    if total <= limit:
        return [(0, total)]
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
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
    data: Media,
    name: str,
    max_seconds: float,
    *,
    limit_seconds: float | None = None,
    formats: str | None = None,
) -> PreparedAudio:
    """What to send for `data` (bytes, a file's path, or a seekable file): the original bytes,
    or WAV windows made from a `PcmSpool` as they are sent.

    Only audio libsndfile reads and no longer than `max_seconds` by its probed duration goes
    out as it is; the rest is decoded in full and the decoded length decides. With
    `limit_seconds` (the service's own route: MAX_AUDIO_SECONDS), longer audio is
    `AudioTooLong`, from the probed duration when it tells, else while decoding. `formats`
    (the service's route: `SAFE_FORMATS`) limits the demuxers FFmpeg may use.
    """
    probed = probe(data, name, formats)
    if limit_seconds is not None and probed.duration is not None:
        _check_length(name, probed.duration, limit_seconds)
    if probed.as_is and probed.duration is not None and probed.duration <= max_seconds:
        window = Window(0.0, probed.duration, media_bytes(data, name), probed.mime)
        return PreparedAudio(probed.duration, probed.mime, [window])
    with _FULL_DECODE_SLOTS:
        spooled = decode_to_spool(data, name, limit_seconds, formats)
    if limit_seconds is not None:
        try:
            _check_length(name, spooled.duration, limit_seconds)
        except AudioTooLong:
            spooled.spool.close()
            raise
    if probed.as_is and spooled.duration <= max_seconds:
        spooled.spool.close()
        window = Window(0.0, spooled.duration, media_bytes(data, name), spooled.mime)
        return PreparedAudio(spooled.duration, spooled.mime, [window])
    ranges = plan_cuts(spooled.loudness, spooled.spool.samples, max_seconds)
    return PreparedAudio(spooled.duration, spooled.mime, spool=spooled.spool, ranges=ranges)
