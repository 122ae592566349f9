"""Decoding, MIME detection and long-audio windows (no server)."""

from __future__ import annotations

import io
import itertools
import subprocess
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

import captioner.audio
from captioner.audio import decode, plan_windows, prepare, probe
from captioner.errors import InputError
from captioner.payload import wav_bytes
from tests.test_client_support import SR, convert, tone, write_wav


def seconds(ranges: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(a / SR, b / SR) for a, b in ranges]


def test_75s_without_pauses_splits_at_30_60_75() -> None:
    assert seconds(plan_windows(tone(75), 30)) == [(0, 30), (30, 60), (60, 75)]


def test_cut_moves_back_to_a_quiet_gap_before_the_limit() -> None:
    samples = tone(75)
    samples[round(26.0 * SR) : round(26.6 * SR)] = 0  # a pause in the last fifth
    windows = seconds(plan_windows(samples, 30))
    assert len(windows) == 3
    assert 26.0 <= windows[0][1] <= 26.6
    assert all(end - start <= 30 + 1e-9 for start, end in windows)
    assert windows[-1][1] == 75


def test_pause_too_early_in_the_window_is_not_used() -> None:
    samples = tone(45)
    samples[round(10 * SR) : round(11 * SR)] = 0  # outside the last fifth of 30 s
    assert seconds(plan_windows(samples, 30)) == [(0, 30), (30, 45)]


def test_windows_tile_the_audio_without_gaps_or_overlap() -> None:
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(SR * 200) * 0.1).astype(np.float32)
    samples[:: SR * 7] = 0
    ranges = plan_windows(samples, 30)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(0 < end - start <= 30 * SR for start, end in ranges)


@pytest.mark.parametrize("limit", [0.5, 1, 1.9])
def test_windows_shorter_than_the_cut_search_span_tile_the_audio(limit: float) -> None:
    samples = tone(5)
    samples[round(2.2 * SR) : round(2.4 * SR)] = 0  # a pause early in a later window
    ranges = plan_windows(samples, limit)  # MAX_AUDIO_SECONDS=1 once raised ValueError here
    assert ranges[0][0] == 0 and ranges[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(0 < end - start <= round(limit * SR) for start, end in ranges)


@pytest.mark.parametrize(("extension", "mime"), [("flac", "audio/flac"), ("mp3", "audio/mpeg"),
                                                 ("ogg", "audio/ogg"), ("opus", "audio/ogg")])
def test_audio_at_or_under_the_limit_that_libsndfile_reads_is_sent_as_the_original_bytes(
        tmp_path: Path, extension: str, mime: str) -> None:
    path = convert(write_wav(tmp_path / "a.wav", tone(5)), tmp_path / f"a.{extension}")
    data = path.read_bytes()
    prepared = prepare(data, path.name, 30)
    assert len(prepared.windows) == 1
    assert prepared.windows[0].data == data
    assert prepared.windows[0].mime == mime
    assert prepared.duration == pytest.approx(5, abs=0.15)  # mp3 pads a little


@pytest.mark.parametrize("extension", ["m4a", "webm", "aac"])
def test_short_audio_libsndfile_cannot_read_goes_as_one_16k_wav_window(
        tmp_path: Path, extension: str) -> None:
    # The service's vLLM decodes with libsndfile alone (start_service.sh), which reads no AAC or WebM.
    path = convert(write_wav(tmp_path / "a.wav", tone(5)), tmp_path / f"a.{extension}")
    [window] = prepare(path.read_bytes(), path.name, 30).windows
    assert window.mime == "audio/wav" and (window.start, window.end) == (0, pytest.approx(5, abs=0.15))
    with wave.open(io.BytesIO(window.data)) as f:
        assert (f.getnchannels(), f.getframerate(), f.getsampwidth()) == (1, SR, 2)


def test_long_audio_becomes_16k_mono_wav_windows(tmp_path: Path) -> None:
    stereo_44k = tmp_path / "long.wav"
    convert(write_wav(tmp_path / "mono.wav", tone(75)), tmp_path / "x.wav")
    subprocess.run(["sox", str(tmp_path / "x.wav"), "-r", "44100", "-c", "2", str(stereo_44k)], check=True)
    prepared = prepare(stereo_44k.read_bytes(), "long.wav", 30)
    assert [(w.start, w.end) for w in prepared.windows] == [(0, 30), (30, 60), (60, 75)]
    for w in prepared.windows:
        assert w.mime == "audio/wav"
        with wave.open(io.BytesIO(w.data)) as f:
            assert (f.getnchannels(), f.getframerate(), f.getsampwidth()) == (1, SR, 2)
            assert f.getnframes() == round((w.end - w.start) * SR)


@pytest.mark.parametrize(
    ("extension", "mime"),
    [
        ("wav", "audio/wav"),
        ("mp3", "audio/mpeg"),
        ("flac", "audio/flac"),
        ("ogg", "audio/ogg"),
        ("m4a", "audio/mp4"),
    ],
)
def test_decode_reads_each_format_and_names_its_mime_type(tmp_path: Path, extension: str, mime: str) -> None:
    path = convert(write_wav(tmp_path / "src.wav", tone(3)), tmp_path / f"a.{extension}")
    decoded = decode(path.read_bytes(), path.name)
    assert decoded.mime == mime
    assert decoded.duration == pytest.approx(3, abs=0.1)  # mp3/aac pad a little


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8ffff3f0005fe02fea7d6a4f40000000049454e44ae426082"
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4, "cannot decode audio"),
        (PNG, "no audio stream"),
    ],
    ids=["empty", "corrupt", "png"],
)
def test_undecodable_input_is_an_input_error_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        decode(data, "bad.wav")
    assert str(caught.value).startswith("bad.wav: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4, "cannot decode audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)), "cannot decode audio"),
        (PNG, "no audio stream"),
        (wav_bytes(b""), "no audio samples decoded"),  # a valid header, no samples
    ],
    ids=["empty", "corrupt", "corrupt-fmt-chunk", "png", "valid-wav-header-no-samples"],
)
def test_short_path_rejects_non_audio_as_decode_does(
    monkeypatch: pytest.MonkeyPatch, data: bytes, message: str
) -> None:
    monkeypatch.setattr(captioner.audio, "decode_to_spool", _no_full_decode)
    with pytest.raises(InputError, match=message) as caught:
        prepare(data, "bad.wav", 30)
    assert str(caught.value).startswith("bad.wav: ")


def test_flac_cut_inside_its_first_frame_is_an_input_error_without_a_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = convert(write_wav(tmp_path / "a.wav", tone(3)), tmp_path / "a.flac").read_bytes()[:100]
    monkeypatch.setattr(captioner.audio, "decode_to_spool", _no_full_decode)
    with pytest.raises(InputError, match="cannot decode audio"):
        prepare(data, "cut.flac", 30)


def _no_full_decode(
    data: object, name: str, limit_seconds: float | None = None, formats: str | None = None
) -> captioner.audio.Spooled:
    raise AssertionError(f"{name} was fully decoded")


@pytest.mark.parametrize("extension", ["wav", "mp3", "flac", "ogg", "opus"])
def test_a_short_file_libsndfile_reads_is_not_fully_decoded_and_goes_out_as_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extension: str
) -> None:
    path = convert(write_wav(tmp_path / "src.wav", tone(29)), tmp_path / f"a.{extension}")
    decoded_seconds = decode(path.read_bytes(), path.name).duration
    monkeypatch.setattr(captioner.audio, "decode_to_spool", _no_full_decode)
    prepared = prepare(path.read_bytes(), path.name, 30)
    assert [w.data for w in prepared.windows] == [path.read_bytes()]
    assert prepared.duration == pytest.approx(decoded_seconds, abs=0.1)


def test_a_file_exactly_as_long_as_the_window_is_not_fully_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_wav(tmp_path / "a.wav", tone(30))
    monkeypatch.setattr(captioner.audio, "decode_to_spool", _no_full_decode)
    assert prepare(path.read_bytes(), path.name, 30).duration == 30


def test_a_long_file_is_fully_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_wav(tmp_path / "a.wav", tone(31))
    calls: list[str] = []
    real = captioner.audio.decode_to_spool

    def counting_decode(data: object, name: str, limit_seconds: float | None = None,
                        formats: str | None = None) -> Any:
        calls.append(name)
        return real(data, name, limit_seconds, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(captioner.audio, "decode_to_spool", counting_decode)
    assert len(prepare(path.read_bytes(), path.name, 30).windows) == 2
    assert calls == [path.name]


@pytest.mark.parametrize("extension", ["wav", "mp3", "m4a"])
def test_a_streamed_decode_cuts_and_encodes_exactly_as_a_whole_one(tmp_path: Path, extension: str) -> None:
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal(SR * 100) * 0.2).astype(np.float32)
    for second in (27.3, 55.1, 83.9):  # pauses where cuts go
        samples[round(second * SR) : round((second + 0.4) * SR)] = 0
    path = convert(write_wav(tmp_path / "src.wav", samples), tmp_path / f"a.{extension}")
    whole = decode(path.read_bytes(), path.name).samples
    prepared = prepare(str(path), path.name, 30)  # by path: FFmpeg reads the file itself
    ranges = plan_windows(whole, 30)
    assert [(w.start, w.end) for w in prepared.windows] == [(a / SR, b / SR) for a, b in ranges]
    assert len(ranges) == 4 and ranges[0][1] != 30 * SR  # cut at a pause, not at the limit
    for window, (a, b) in zip(prepared.windows, ranges, strict=True):
        assert window.data == wav_bytes(captioner.audio.to_pcm16(whole[a:b]).tobytes())


def test_a_long_files_windows_hold_no_audio_until_asked_and_the_spool_goes_with_them(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", tone(95))
    prepared = prepare(str(path), path.name, 30)
    windows = prepared.windows
    prepared.release()
    spool = windows[0]._spool
    assert spool is not None and spool._file.tell() == 95 * SR * 2  # the PCM is on disk, not in memory
    assert all(w._data is None for w in windows)
    assert len(windows[3].data) == 5 * SR * 2 + 44
    closer = spool._closer
    del spool, windows
    assert not closer.alive  # the last window gone: the temporary file is closed


@pytest.mark.parametrize("extension", ["wav", "mp3", "flac", "ogg", "m4a", "webm", "aac", "opus", "aiff"])
def test_the_probed_duration_is_within_0_1_s_of_the_decoded_one(tmp_path: Path, extension: str) -> None:
    path = convert(write_wav(tmp_path / "src.wav", tone(7.3)), tmp_path / f"a.{extension}")
    data = path.read_bytes()
    probed = probe(data, path.name)
    assert probed.duration == pytest.approx(decode(data, path.name).duration, abs=0.1)
    assert probed.mime == decode(data, path.name).mime


def test_a_vbr_mp3_without_a_xing_header_is_measured_by_its_packets(tmp_path: Path) -> None:
    # FFmpeg estimates such a file's length from the bitrate: loud first, quiet after, it
    # reads as far shorter than it is. The probe counts packets instead.
    src = write_wav(tmp_path / "src.wav", np.concatenate([tone(10), np.zeros(SR * 21, np.float32)]))
    path = tmp_path / "vbr.mp3"
    ffmpeg = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src)]
    subprocess.run([*ffmpeg, "-q:a", "5", "-write_xing", "0", str(path)], check=True)
    data = path.read_bytes()
    with av.open(io.BytesIO(data)) as container:
        assert container.duration / av.time_base < 30  # the estimate
    assert probe(data, path.name).duration == pytest.approx(decode(data, path.name).duration, abs=0.1)
    assert len(prepare(data, path.name, 30).windows) == 2


@pytest.mark.parametrize("fmt", ["flac", "webm"])
def test_a_piped_file_whose_header_has_no_length_is_measured_by_its_packets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    src = write_wav(tmp_path / "src.wav", tone(12))
    piped = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src), "-f", fmt, "-"],
        check=True,
        capture_output=True,
    ).stdout
    monkeypatch.setattr(captioner.audio, "decode_to_spool", _no_full_decode)
    assert probe(piped, f"piped.{fmt}").duration == pytest.approx(12, abs=0.1)
