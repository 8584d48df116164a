"""Decode any audio ffmpeg reads into float32 mono 16 kHz, with specific errors for bad input.

Channels are averaged with an explicit `pan` matrix (a true mean, unlike `-ac 1`, which weights
surround channels unequally) and resampled band-limited with soxr, all inside one ffmpeg process so a
long multichannel file never has to sit in memory at its native rate.

How bad input is classified (first rule that applies wins):
- zero bytes, or a container whose audio stream has no samples -> EmptyAudioError;
- ffprobe cannot open the input: CorruptAudioError if it starts with a known audio signature
  (RIFF/WAVE, fLaC, OggS, ID3/MPEG sync, EBML/WebM, ISO-BMFF `ftyp`, AIFF, CAF, AMR), else NotAudioError;
- ffprobe opens it but finds no audio stream (text, images, video only) -> NotAudioError;
- the file is truncated -> CorruptAudioError: a WAV whose data chunk declares more bytes than are
  present, or any input whose decoded length falls short of the duration its header declares by more
  than 2 % + 0.1 s (a FLAC/MP3/WebM cut short, a FLAC damaged in the middle). Durations that ffmpeg only
  estimates from the bit rate are not trusted for this check;
- ffmpeg exits with an error while decoding -> CorruptAudioError.
Decoder warnings about a few bad frames are tolerated when the length still matches the header.

Plain 16-bit mono 16 kHz WAV files (what the dataset builders write) are read without ffmpeg: same result, faster.

Limits of our own, whatever the ffmpeg build or its defaults (input may come from an untrusted upload):
- only the protocol the input needs is allowed (`file` for a path, `pipe` for bytes), so no demuxer can open a
  URL or, for bytes, any file;
- only the demuxers in `ALLOWED_DEMUXERS` (audio containers and common audio/video containers) may open the
  input: playlists and lists of other files (HLS, DASH, concat/ffconcat, IMF, image sequences, SDP) are refused
  with RefusedAudioError before anything they name is opened;
- every ffprobe/ffmpeg run has a time limit (`timeout_s`, default env FREUD_FFMPEG_TIMEOUT_S, else
  DEFAULT_TIMEOUT_S) and raises AudioTimeoutError when it is hit;
- a path that is a directory or cannot be read raises UnreadableAudioError (a missing one FileNotFoundError).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freud_pipeline.errors import (
    AudioTimeoutError,
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    FreudError,
    NotAudioError,
    RefusedAudioError,
    UnreadableAudioError,
)
from freud_pipeline.frames import SAMPLE_RATE

log = logging.getLogger(__name__)

ACCEPTED = (
    "Accepted: any audio ffmpeg decodes (WAV, FLAC, MP3, OGG Vorbis/Opus, WebM, M4A, ...) "
    "and raw G.722 (a .g722 file or fmt='g722')."
)
# Raw formats carry no header, so ffmpeg must be told what they are.
_RAW_FORMAT_BY_SUFFIX = {".g722": "g722"}
_AUDIO_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"\x1a\x45\xdf\xa3", b"FORM", b"caff", b"#!AMR")
_HEADER_BYTES = 1 << 16
_SHORTFALL_FRACTION = 0.02
_SHORTFALL_SECONDS = 0.1

TIMEOUT_ENV = "FREUD_FFMPEG_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0
# Demuxers that may open the input (ffmpeg's -format_whitelist): none of them opens another file or URL.
ALLOWED_DEMUXERS = (
    "wav", "w64", "flac", "mp3", "ogg", "matroska", "webm", "mov", "mp4", "m4a", "3gp", "3g2", "aac", "loas",
    "ac3", "eac3", "dts", "dtshd", "truehd", "mlp", "aiff", "caf", "amr", "amrnb", "amrwb", "au", "ape", "wv",
    "tta", "tak", "mpc", "mpc8", "shn", "oma", "voc", "xwma", "dsf", "ircam", "sox", "asf", "avi", "flv", "mpeg",
    "mpegts", "nut", "rm", "g722", "g723_1", "g726", "g726le", "g729", "gsm", "alaw", "mulaw",
)
# What the refused demuxers that read other files or URLs are, for the message.
_REFERENCING_DEMUXERS = {
    "hls": "an HLS playlist (.m3u8)", "dash": "a DASH manifest", "concat": "a concat/ffconcat list",
    "imf": "an IMF composition", "image2": "an image sequence", "sdp": "an SDP session description",
    "webm_dash_manifest": "a WebM DASH manifest", "rtsp": "an RTSP session", "rtp": "an RTP stream",
}
_NOT_ON_WHITELIST = re.compile(r"\[([\w,]+) @ [^\]]*\] Format not on whitelist")


def timeout_from_env() -> float:
    """The ffmpeg/ffprobe time limit in seconds: env FREUD_FFMPEG_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise FreudError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}")
    return value


@dataclass(frozen=True)
class _Probe:
    channels: int
    declared_s: float | None  # None when the header gives no trustworthy length


def input_limits(protocol: str) -> list[str]:
    """ffmpeg/ffprobe options, placed before an `-i`, that confine that input to `protocol` ("file" or "pipe")
    and to ALLOWED_DEMUXERS."""
    return ["-protocol_whitelist", protocol, "-format_whitelist", ",".join(ALLOWED_DEMUXERS)]


def _ffmpeg_tool(cmd: list[str], data: bytes | None, what: str, timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run ffmpeg/ffprobe; killed after `timeout_s` (None: timeout_from_env()) with AudioTimeoutError."""
    timeout_s = timeout_from_env() if timeout_s is None else timeout_s
    try:
        return subprocess.run(cmd, input=data, capture_output=True, timeout=timeout_s,
                              stdin=None if data is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{cmd[0]} is not installed; install FFmpeg (Debian package 'ffmpeg').") from exc
    except subprocess.TimeoutExpired:
        raise AudioTimeoutError(f"{what}: {cmd[0]} did not finish within {timeout_s:g} s, the limit (env "
                                f"{TIMEOUT_ENV}); the input may be damaged or too long.") from None


def _looks_like_audio(head: bytes) -> bool:
    if head.startswith(_AUDIO_SIGNATURES) or head[4:8] == b"ftyp":
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0  # MPEG audio frame sync


def _wav_truncated(head: bytes, total_size: int) -> bool:
    """True if a RIFF/WAVE header declares more sample bytes than the input holds."""
    if not (head.startswith(b"RIFF") and head[8:12] == b"WAVE"):
        return False
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            # 0 and 0xFFFFFFFF mean "unknown length" (streamed WAV); trust those.
            return 0 < size < 0xFFFFFFFF and pos + 8 + size > total_size
        pos += 8 + size + (size & 1)
    return False


def _describe(source: str | Path | bytes) -> str:
    return f"{len(source)} bytes of input" if isinstance(source, bytes) else str(source)


def _stderr_tail(proc: subprocess.CompletedProcess, lines: int = 3) -> str:
    text = proc.stderr.decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def _refused(proc: subprocess.CompletedProcess, what: str) -> None:
    """Raise a clear error when ffprobe detected a demuxer outside ALLOWED_DEMUXERS (it opened nothing then)."""
    match = _NOT_ON_WHITELIST.search(proc.stderr.decode(errors="replace"))
    if match is None:
        return
    name = match.group(1)
    kind = _REFERENCING_DEMUXERS.get(name)
    if kind is not None:
        raise RefusedAudioError(f"{what} is {kind}, which names other files or URLs; such input is refused. "
                                f"{ACCEPTED}")
    raise NotAudioError(f"{what} is not an audio format FREUD accepts (ffmpeg reads it as {name!r}). {ACCEPTED}")


def _probe(input_args: list[str], data: bytes | None, head: bytes, what: str, timeout_s: float | None = None) -> _Probe:
    cmd = ["ffprobe", "-hide_banner", "-v", "warning", *input_args,
           "-show_entries", "stream=codec_type,channels,duration:format=duration", "-of", "json"]
    proc = _ffmpeg_tool(cmd, data, what, timeout_s)
    if proc.returncode != 0:
        _refused(proc, what)
        if _looks_like_audio(head):
            raise CorruptAudioError(f"{what} looks like audio but cannot be opened ({_stderr_tail(proc)}). {ACCEPTED}")
        raise NotAudioError(f"{what} is not a recognised audio format ({_stderr_tail(proc)}). {ACCEPTED}")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if audio is None:
        found = ", ".join(sorted({s.get("codec_type", "?") for s in streams})) or "nothing"
        raise NotAudioError(f"{what} has no audio stream (found: {found}). {ACCEPTED}")
    estimated = b"duration from bitrate" in proc.stderr
    duration = audio.get("duration") or info.get("format", {}).get("duration")
    declared = None if estimated or duration in (None, "N/A") else float(duration)
    return _Probe(int(audio.get("channels") or 1), declared)


def _input_args(source: str | Path | bytes, fmt: str | None) -> tuple[list[str], bytes | None, bytes, int, str]:
    """ffmpeg input arguments, stdin data, the first bytes and the total size of the input."""
    what = _describe(source)
    if isinstance(source, bytes):
        data, head, size, target, protocol = source, source[:_HEADER_BYTES], len(source), "pipe:0", "pipe"
    else:
        path = Path(source)
        fmt = fmt or _RAW_FORMAT_BY_SUFFIX.get(path.suffix.lower())
        head, size = _read_head(path)
        # "file:" so that a name with a colon is never taken for another protocol
        data, target, protocol = None, f"file:{path}", "file"
    if size == 0:
        raise EmptyAudioError(f"{what} is empty (zero bytes). {ACCEPTED}")
    return input_limits(protocol) + (["-f", fmt] if fmt else []) + ["-i", target], data, head, size, what


def _read_head(path: Path) -> tuple[bytes, int]:
    """The first bytes and the size of a file; UnreadableAudioError for a directory or an unreadable file."""
    try:
        with path.open("rb") as fh:
            return fh.read(_HEADER_BYTES), os.fstat(fh.fileno()).st_size
    except IsADirectoryError:
        raise UnreadableAudioError(f"{path} is a directory, not an audio file. {ACCEPTED}") from None
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such audio file", str(path)) from None
    except PermissionError:
        raise UnreadableAudioError(f"{path} cannot be read: permission denied.") from None
    except OSError as exc:
        raise UnreadableAudioError(f"{path} cannot be read: {exc.strerror or exc}.") from None


def audio_duration(path: str | Path, fmt: str | None = None, timeout_s: float | None = None) -> float:
    """Duration in seconds from the container header (ffprobe); decodes only when the header is silent."""
    input_args, data, head, size, what = _input_args(path, fmt)
    probe = _probe(input_args, data, head, what, timeout_s)
    if probe.declared_s is not None:
        return probe.declared_s
    return len(load_audio(path, max_seconds=None, fmt=fmt, timeout_s=timeout_s)) / SAMPLE_RATE


def load_audio(source: str | Path | bytes, *, max_seconds: float | None = 1800.0, fmt: str | None = None,
               timeout_s: float | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to float32 mono 16 kHz. Never truncates: longer input raises.
    `timeout_s`: the limit for each ffprobe/ffmpeg run (None: env FREUD_FFMPEG_TIMEOUT_S, else DEFAULT_TIMEOUT_S)."""
    input_args, data, head, size, what = _input_args(source, fmt)
    if _wav_truncated(head, size):
        raise CorruptAudioError(f"{what} is a truncated WAV: its data chunk declares more bytes than it holds. {ACCEPTED}")
    if data is None and not fmt and (audio := _read_plain_wav(Path(source))) is not None:
        return _checked(audio, what, max_seconds)
    probe = _probe(input_args, data, head, what, timeout_s)
    if max_seconds is not None and probe.declared_s is not None and probe.declared_s > max_seconds:
        raise AudioTooLongError(f"{what} lasts {probe.declared_s:.1f} s; the limit is {max_seconds:g} s.")

    gain = f"{1.0 / probe.channels:.12g}"
    mix = "+".join(f"{gain}*c{i}" for i in range(probe.channels))
    filters = f"aformat=sample_fmts=flt,pan=mono|c0={mix},aresample={SAMPLE_RATE}:resampler=soxr"
    cmd = ["ffmpeg", "-hide_banner", "-v", "error", *input_args, "-map", "0:a:0", "-af", filters]
    if max_seconds is not None:
        cmd += ["-t", f"{max_seconds + 1.0:.3f}"]  # stop early, but decode enough to see it is too long
    cmd += ["-f", "f32le", "-c:a", "pcm_f32le", "-ar", str(SAMPLE_RATE), "-ac", "1", "pipe:1"]
    proc = _ffmpeg_tool(cmd, data, what, timeout_s)
    audio = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)

    if proc.returncode != 0:
        raise CorruptAudioError(f"{what} could not be decoded ({_stderr_tail(proc)}). {ACCEPTED}")
    decoded_s = len(audio) / SAMPLE_RATE
    if probe.declared_s is not None and decoded_s < probe.declared_s * (1 - _SHORTFALL_FRACTION) - _SHORTFALL_SECONDS:
        raise CorruptAudioError(
            f"{what} is truncated or damaged: decoded {decoded_s:.2f} s of the {probe.declared_s:.2f} s its header "
            f"declares ({_stderr_tail(proc) or 'no decoder message'}). {ACCEPTED}"
        )
    if proc.stderr:
        log.debug("ffmpeg warnings for %s: %s", what, _stderr_tail(proc))
    return _checked(audio, what, max_seconds)


def _checked(audio: np.ndarray, what: str, max_seconds: float | None) -> np.ndarray:
    if max_seconds is not None and len(audio) > max_seconds * SAMPLE_RATE:
        raise AudioTooLongError(f"{what} lasts more than {max_seconds:g} s, the limit.")
    if len(audio) == 0:
        raise EmptyAudioError(f"{what} holds an audio stream with no samples. {ACCEPTED}")
    return audio


def _read_plain_wav(path: Path) -> np.ndarray | None:
    """Fast path without ffmpeg for what the dataset builders write: 16-bit PCM mono 16 kHz WAV."""
    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as wav:
            if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getcomptype()) != (1, 2, SAMPLE_RATE, "NONE"):
                return None
            n_frames = wav.getnframes()
            frames = wav.readframes(n_frames)
    except (wave.Error, EOFError, RuntimeError, struct.error):  # the wave module's ways of saying "malformed"
        return None  # let ffmpeg decide what is wrong with it
    if len(frames) != 2 * n_frames:
        return None
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0  # the scale ffmpeg uses


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV (the most widely readable form)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float32) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sr)
        out.writeframes(pcm.tobytes())
    return path


def write_audio(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """Write mono float audio; the suffix picks the format (.wav natively, anything else through ffmpeg, e.g. .flac)."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        return write_wav(path, audio, sr)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.asarray(audio, dtype="<f4"), -1.0, 1.0).tobytes()
    cmd = ["ffmpeg", "-hide_banner", "-v", "error", "-y", "-f", "f32le", "-ar", str(sr), "-ac", "1", "-i", "pipe:0"]
    if path.suffix.lower() == ".flac":
        cmd += ["-sample_fmt", "s16"]  # 16-bit FLAC: lossless for our 16-bit sources, half the size of 32-bit
    cmd.append(str(path))
    proc = _ffmpeg_tool(cmd, pcm, str(path))
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {_stderr_tail(proc)}")
    return path
