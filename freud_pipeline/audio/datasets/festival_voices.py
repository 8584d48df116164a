"""Synthetic English speech from every English Festival voice in Debian main, with exact word and phone timings.

Each clip is several sentences of public-domain prose (texts.py) read by one voice, so a 30 s window is mostly
speech. Timings come from Festival's own Segment and Word relations. The diphone voices (kal, ked) write ~20-30 ms
of silence after the end of their last segment (a final pause); the clip is cut to that end, so every clip's
last segment ends at its last sample. A clip whose timings do not fit its audio fails the build.

The `speaker` column is the voice; `split` puts whole held-out voices in "test" and the other voices' clips in
train/dev, so phone labels can be scored on a voice they never saw. Voices read disjoint sentences.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from freud_pipeline.audio.datasets._common import convert_to_wav, default_workers
from freud_pipeline.audio.datasets.festival import parse_segments, run_festival
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.datasets.texts import load_corpus_sentences
from freud_pipeline.audio.decode import SAMPLE_RATE, write_wav
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

SOURCE = "festival_voices"
# voice id (the manifest's speaker) -> (Festival voice function, Debian package, description)
VOICES = {
    "slt": ("voice_cmu_us_slt_arctic_hts", "festvox-us-slt-hts", "US female, HTS"),
    "kal": ("voice_kal_diphone", "festvox-kallpc16k", "US male, diphone"),
    "ked": ("voice_ked_diphone", "festvox-kdlpc16k", "US male, diphone"),
}
DEFAULT_HOLDOUT = ("ked",)
_VOICE_DIRS = {"slt": "us/cmu_us_slt_arctic_hts", "kal": "english/kal_diphone", "ked": "english/ked_diphone"}
_FESTIVAL_VOICES = Path("/usr/share/festival/voices")
_CHUNK = 16  # clips per Festival process: a crash costs at most one chunk, a rerun resumes after the last one


class TimingError(RuntimeError):
    """Festival's segment timings do not fit the audio it wrote."""


def available_voices() -> list[str]:
    return [v for v in VOICES if (_FESTIVAL_VOICES / _VOICE_DIRS[v]).is_dir()]


def require_voices(voices: tuple[str, ...]) -> None:
    if unknown := [v for v in voices if v not in VOICES]:
        raise ValueError(f"unknown voice(s) {unknown}; known: {', '.join(VOICES)}")
    if shutil.which("festival") is None:
        raise DatasetUnavailableError("Festival is not installed: apt-get install festival")
    if missing := [v for v in voices if v not in available_voices()]:
        raise DatasetUnavailableError(f"Festival voice(s) {missing} not installed: apt-get install "
                                      + " ".join(VOICES[v][1] for v in missing))


def plan_clips(sentences: list[str], n_voices: int, clips_per_voice: int, clip_words: int, seed: int) -> list[list[str]]:
    """Sentence groups of at least `clip_words` words (shuffled by seed), n_voices x clips_per_voice of them; group
    g goes to voice g % n_voices, so voices read disjoint text."""
    order = random.Random(seed).sample(sentences, len(sentences))
    groups, current = [], []
    for sentence in order:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= clip_words:
            groups.append(current)
            current = []
    needed = n_voices * clips_per_voice
    if needed > len(groups):
        raise ValueError(f"{needed} clips of >= {clip_words} words asked for, but the text gives only {len(groups)}; "
                         "ask for fewer clips per voice or fewer words per clip")
    return groups[:needed]


def read_segments(lab_path: Path) -> list[tuple[str, float, float]]:
    """(phone, start, end) of every segment, pauses included, from a freud_dump file."""
    rows = [line.split("\t") for line in lab_path.read_text(encoding="utf-8").splitlines() if line]
    return [(r[2].strip('"'), float(r[3]), float(r[4])) for r in rows]


def check_timings(segments: list[tuple[str, float, float]], n_samples: int, what: str) -> None:
    """Segments tile the clip: start at 0, each starts where the previous ended, end at the last sample."""
    tol = 1.0 / SAMPLE_RATE
    if not segments or abs(segments[0][1]) > tol:
        raise TimingError(f"{what}: segments do not start at 0")
    for (_, _, prev_end), (phone, start, end) in zip(segments, segments[1:]):
        if end < start or abs(start - prev_end) > tol:
            raise TimingError(f"{what}: segment {phone} at {start:.4f}-{end:.4f} s breaks the sequence")
    if abs(segments[-1][2] - n_samples / SAMPLE_RATE) > tol:
        raise TimingError(f"{what}: last segment ends at {segments[-1][2]:.5f} s, audio at {n_samples / SAMPLE_RATE:.5f} s")


def fit_to_segments(wav_path: Path, segments: list[tuple[str, float, float]]) -> int:
    """Cut (or pad with zeros) a 16 kHz clip to its last segment's end, within that final pause; returns samples."""
    phone, start, end = segments[-1]
    with wave.open(str(wav_path), "rb") as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    n = round(end * SAMPLE_RATE)
    if phone != "pau" or abs(len(audio) - n) > 0.1 * SAMPLE_RATE:
        raise TimingError(f"{wav_path}: {len(audio)} samples but the segments end at {end:.4f} s ({phone})")
    if len(audio) != n:
        audio = np.concatenate([audio, np.zeros(max(0, n - len(audio)), dtype="<i2")])[:n]
        write_wav(wav_path, audio.astype(np.float32) / 32768.0)
    return n


def _synthesise(voice: str, items: list[tuple[str, str]], audio_dir: Path) -> None:
    """One Festival process for (clip_id, text) items of one voice; writes <clip>.wav (16 kHz, fitted) and .lab."""
    with tempfile.TemporaryDirectory(prefix=f"festival-{voice}-") as tmp:
        work = Path(tmp)
        run_festival(items, work, voice=VOICES[voice][0])
        for clip_id, _ in items:
            segments = read_segments(work / f"{clip_id}.lab")
            wav = audio_dir / f".{clip_id}.fitting.wav"
            convert_to_wav(work / f"{clip_id}.wav", wav)
            check_timings(segments, fit_to_segments(wav, segments), f"{voice} {clip_id}")
            shutil.copyfile(work / f"{clip_id}.lab", audio_dir / f"{clip_id}.lab")
            wav.replace(audio_dir / f"{clip_id}.wav")  # last: a clip with a .wav is complete


def voice_split(clip_id: str, voice: str, holdout: tuple[str, ...]) -> str:
    """'test' for every clip of a held-out voice; the other voices' clips train (~90%) or dev (~10%)."""
    if voice in holdout:
        return "test"
    return "dev" if assign_split(clip_id) == "dev" else "train"


def build_festival_voices(
    out_dir: Path,
    voices: tuple[str, ...] = tuple(VOICES),
    clips_per_voice: int = 200,
    clip_words: int = 45,
    holdout_voices: tuple[str, ...] = DEFAULT_HOLDOUT,
    seed: int = 0,
    *,
    data_root: Path | None = None,
    sentences: list[str] | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Synthesise clips_per_voice clips of >= clip_words words per voice, with exact word/phone timings.

    Re-running resumes: clips already written (a .wav beside its .lab) are kept."""
    voices = tuple(voices)
    require_voices(voices)
    if bad := [v for v in holdout_voices if v not in voices]:
        raise ValueError(f"held-out voice(s) {bad} are not among the voices built {list(voices)}")
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    groups = plan_clips(sentences or load_corpus_sentences(), len(voices), clips_per_voice, clip_words, seed)
    items = {v: [] for v in voices}
    for g, group in enumerate(groups):
        voice = voices[g % len(voices)]
        items[voice].append((f"{voice}-s{seed}-g{g:05d}", " ".join(group)))

    todo = [(v, [it for it in its[i : i + _CHUNK] if not (audio_dir / f"{it[0]}.wav").exists()])
            for v, its in items.items() for i in range(0, len(its), _CHUNK)]
    todo = [(v, chunk) for v, chunk in todo if chunk]
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        list(pool.map(lambda job: _synthesise(job[0], job[1], audio_dir), todo))

    rows, alignment_rows = [], []
    for voice, its in items.items():
        for clip_id, _ in its:
            lab, wav = audio_dir / f"{clip_id}.lab", audio_dir / f"{clip_id}.wav"
            segments = read_segments(lab)
            with wave.open(str(wav), "rb") as w:
                n_samples = w.getnframes()
            check_timings(segments, n_samples, f"{voice} {clip_id}")
            clip_rows = parse_segments(lab.read_text(encoding="utf-8"), clip_id)
            transcript = " ".join(r["label"] for r in clip_rows if r["tier"] == "word")
            rows.append({
                "clip_id": clip_id, "path": relative_path(wav, data_root), "duration_s": n_samples / SAMPLE_RATE,
                "sample_rate": SAMPLE_RATE, "transcript": transcript, "speaker": voice, "source": SOURCE,
                "split": voice_split(clip_id, voice, tuple(holdout_voices)), "language": "en",
            })
            alignment_rows += clip_rows
    build = finish_build(SOURCE, out_dir, rows, alignment_rows)
    log.info("festival voices %s: %d clips (%.0f s)", ",".join(voices), build.n_clips, build.total_seconds)
    return build
