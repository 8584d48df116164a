"""load_audio on real encoded audio made with ffmpeg: formats, channel mean, band-limited resampling, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from freud_pipeline.audio.decode import SAMPLE_RATE, audio_duration, load_audio, write_wav
from freud_pipeline.errors import AudioTooLongError, CorruptAudioError, EmptyAudioError, NotAudioError

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

require_extra(shutil.which("ffmpeg") is not None, "the ffmpeg command", module_level=True)

DURATION = 2.0
# Output name -> encoder options; a 2 s 440 Hz tone at 44.1 kHz is encoded into each in one ffmpeg run.
FORMATS = {
    "s16.wav": ["-c:a", "pcm_s16le"],
    "s24.wav": ["-c:a", "pcm_s24le"],
    "s32.wav": ["-c:a", "pcm_s32le"],
    "f32.wav": ["-c:a", "pcm_f32le"],
    "tone.flac": [],
    "tone.mp3": ["-c:a", "libmp3lame"],
    "tone.ogg": ["-c:a", "libvorbis"],
    "browser.webm": ["-c:a", "libopus", "-ar", "48000"],  # what Chrome's MediaRecorder produces
    "phone.g722": ["-f", "g722", "-ar", "16000"],
}


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-v", "error", "-y", *args], input=stdin, check=True)


def encode_raw(path: Path, samples: np.ndarray, rate: int, *codec: str) -> Path:
    """Encode float samples [n] or [n, channels] with ffmpeg."""
    samples = samples.reshape(len(samples), -1).astype("<f4")
    ffmpeg("-f", "f32le", "-ar", str(rate), "-ac", str(samples.shape[1]), "-i", "pipe:0", *codec, str(path),
           stdin=samples.tobytes())
    return path


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("formats")
    args = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={DURATION}:sample_rate=44100"]
    for name, options in FORMATS.items():
        args += [*options, str(out / name)]
    ffmpeg(*args)
    return {name: out / name for name in FORMATS}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_decodes_to_its_duration(encoded, name):
    audio = load_audio(encoded[name])
    assert audio.dtype == np.float32 and audio.ndim == 1
    # mp3/opus/vorbis add a few ms of codec padding at most
    assert abs(len(audio) / SAMPLE_RATE - DURATION) < 0.06
    assert rms(audio) == pytest.approx(0.125 / np.sqrt(2), rel=0.1)  # lavfi's sine is 1/8 of full scale

@pytest.mark.parametrize("name", ["s16.wav", "browser.webm", "tone.flac"])
def test_bytes_decode_like_files(encoded, name):
    from_bytes = load_audio(encoded[name].read_bytes())
    from_file = load_audio(encoded[name])
    assert abs(len(from_bytes) - len(from_file)) < 0.03 * SAMPLE_RATE


def test_raw_g722_bytes_need_the_format(encoded):
    data = encoded["phone.g722"].read_bytes()
    assert abs(len(load_audio(data, fmt="g722")) / SAMPLE_RATE - DURATION) < 0.01
    with pytest.raises(NotAudioError):
        load_audio(data)  # headerless: nothing says it is G.722


def test_stereo_is_the_mean_of_left_and_right(tmp_path):
    left, right = tone(440, 1.0, SAMPLE_RATE, 0.5), tone(1000, 1.0, SAMPLE_RATE, 0.3)
    path = encode_raw(tmp_path / "stereo.wav", np.stack([left, right], axis=1), SAMPLE_RATE, "-c:a", "pcm_f32le")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-5)


def test_multichannel_is_a_true_mean(tmp_path):
    channels = np.stack([tone(300 * (i + 1), 1.0, SAMPLE_RATE, 0.1 * (i + 1)) for i in range(6)], axis=1)
    path = encode_raw(tmp_path / "surround.wav", channels, SAMPLE_RATE, "-c:a", "pcm_f32le")
    np.testing.assert_allclose(load_audio(path), channels.mean(axis=1), atol=1e-5)


def test_resampling_is_band_limited(tmp_path):
    above_nyquist = encode_raw(tmp_path / "12k.wav", tone(12000, 1.0, 44100), 44100, "-c:a", "pcm_f32le")
    in_band = encode_raw(tmp_path / "1k.wav", tone(1000, 1.0, 44100), 44100, "-c:a", "pcm_f32le")
    edge = slice(1600, -1600)  # ignore the filter's ramp at both ends
    assert rms(load_audio(above_nyquist)[edge]) < 1e-3 * rms(tone(12000, 1.0, 44100))  # > 60 dB down
    assert rms(load_audio(in_band)[edge]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_long_clip_is_not_truncated(tmp_path):
    path = tmp_path / "long.flac"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=45:sample_rate=16000", str(path))
    assert len(load_audio(path)) == 45 * SAMPLE_RATE
    assert audio_duration(path) == pytest.approx(45.0)


def test_too_long_raises(encoded):
    with pytest.raises(AudioTooLongError, match="limit"):
        load_audio(encoded["tone.flac"], max_seconds=1.0)  # the header says 2 s
    with pytest.raises(AudioTooLongError):
        load_audio(encoded["phone.g722"].read_bytes(), fmt="g722", max_seconds=1.0)  # no header: decoded length
    assert len(load_audio(encoded["tone.flac"], max_seconds=None)) == DURATION * SAMPLE_RATE


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(EmptyAudioError):
        load_audio(empty)
    with pytest.raises(EmptyAudioError):
        load_audio(b"")
    no_samples = tmp_path / "no_samples.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-t", "0", str(no_samples))
    with pytest.raises(EmptyAudioError):
        load_audio(no_samples)


def test_not_audio(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("This is a shopping list, not a recording.\n" * 20)
    with pytest.raises(NotAudioError, match="Accepted"):
        load_audio(text)
    png_like = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(600)
    with pytest.raises(NotAudioError):
        load_audio(png_like)
    with pytest.raises(NotAudioError):
        load_audio(np.random.default_rng(0).integers(0, 256, 8000, dtype=np.uint8).tobytes())


def test_truncated_or_damaged_audio(encoded, tmp_path):
    wav = encoded["s16.wav"].read_bytes()
    with pytest.raises(CorruptAudioError, match="truncated"):
        load_audio(wav[: len(wav) // 2])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(wav[:30] + b"this is not the rest of a wav file")
    with pytest.raises(CorruptAudioError):
        load_audio(garbage)
    flac = encoded["tone.flac"].read_bytes()
    half = tmp_path / "half.flac"
    half.write_bytes(flac[: len(flac) // 2])
    with pytest.raises(CorruptAudioError):
        load_audio(half)
    with pytest.raises(CorruptAudioError):
        load_audio(flac[:100])  # a FLAC header and nothing else


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        load_audio(missing)


def test_write_wav_round_trip(tmp_path):
    audio = tone(440, 0.5, SAMPLE_RATE, 0.25)
    path = write_wav(tmp_path / "out" / "clip.wav", audio)
    np.testing.assert_allclose(load_audio(path), audio, atol=1 / 32768)
    assert audio_duration(path) == pytest.approx(0.5)
