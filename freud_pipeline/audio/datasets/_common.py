"""Helpers shared by the dataset builders: conversion to 16 kHz WAV, cheap durations, parallel alignment."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import subprocess
import wave
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from freud_pipeline.audio.decode import SAMPLE_RATE, input_limits, load_audio, timeout_from_env, write_wav
from freud_pipeline.audio.datasets.manifest import ALIGNMENTS_FILE, MANIFEST_FILE, load_alignments, load_manifest
from freud_pipeline.errors import AudioError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset(
    ".wav .flac .mp3 .ogg .oga .opus .webm .m4a .mp4 .aac .aif .aiff .wma .mka .g722 .au .amr".split()
)
# Spawning an alignment worker loads pocketsphinx's model anew; only worth it for bigger batches.
_MIN_CLIPS_FOR_WORKERS = 32
_BATCH = 64  # files per ffmpeg process when converting known-mono sources


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def slug(text: str) -> str:
    """A clip-id-safe form of a relative name: "digits/1" -> "digits-1"."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def flac_info(path: Path) -> tuple[int, int, float] | None:
    """(sample rate, channels, duration s) from a FLAC STREAMINFO block without decoding; None if not FLAC."""
    with open(path, "rb") as fh:
        head = fh.read(42)
    if len(head) < 42 or head[:4] != b"fLaC":
        return None
    bits = int.from_bytes(head[18:26], "big")  # 20 bits rate, 3 channels-1, 5 bits/sample-1, 36 total samples
    rate, channels, total = bits >> 44, ((bits >> 41) & 0x7) + 1, bits & ((1 << 36) - 1)
    return (rate, channels, total / rate) if rate and total else None


def wav_duration(path: Path) -> float | None:
    """Duration of a complete 16 kHz mono PCM WAV from its header (None if not one, or cut short)."""
    try:
        with wave.open(str(path), "rb") as wav:
            ok = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, SAMPLE_RATE)
            n_frames = wav.getnframes()
    except (OSError, wave.Error, EOFError, RuntimeError):
        return None
    complete = path.stat().st_size >= 44 + 2 * n_frames
    return n_frames / SAMPLE_RATE if ok and complete and n_frames else None


def convert_to_wav(src: Path, dst: Path, fmt: str | None = None) -> float:
    """Decode `src` to 16 kHz mono 16-bit WAV at `dst` unless already there; returns the duration in seconds.

    WAV rather than FLAC: clips are read many times downstream and a plain WAV loads without ffmpeg.
    """
    if duration := wav_duration(dst):
        return duration
    audio = load_audio(src, fmt=fmt)
    tmp = dst.with_name(f".{dst.stem}.partial.wav")  # renamed when complete, so a crash leaves no half file
    write_wav(tmp, audio, SAMPLE_RATE)
    os.replace(tmp, dst)
    return len(audio) / SAMPLE_RATE


def _convert_mono_batch(jobs: Sequence[tuple[Path, Path, str | None]]) -> bool:
    """Convert known-mono sources in one ffmpeg process (starting ffmpeg dominates for short clips)."""
    cmd = ["ffmpeg", "-hide_banner", "-v", "error", "-nostdin", "-y"]
    for src, _, fmt in jobs:
        cmd += input_limits("file") + (["-f", fmt] if fmt else []) + ["-i", f"file:{src}"]
    tmps = [dst.with_name(f".{dst.stem}.partial.wav") for _, dst, _ in jobs]
    for i, tmp in enumerate(tmps):
        cmd += ["-map", f"{i}:a:0", "-af", f"aresample={SAMPLE_RATE}:resampler=soxr", "-ac", "1",
                "-c:a", "pcm_s16le", "-map_metadata", "-1", "-fflags", "+bitexact", str(tmp)]
    try:
        ok = subprocess.run(cmd, capture_output=True, timeout=timeout_from_env() * len(jobs)).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    for tmp, (_, dst, _) in zip(tmps, jobs):
        if ok and wav_duration(tmp):
            os.replace(tmp, dst)
        else:
            tmp.unlink(missing_ok=True)  # the per-file path will redo it and name the culprit
    return ok


def convert_all(
    jobs: Sequence[tuple[Path, Path, str | None]],
    workers: int | None = None,
    desc: str = "converting",
    mono_sources: bool = False,
) -> tuple[dict[Path, float], list[tuple[str, str]]]:
    """Convert (src, dst, fmt) jobs to 16 kHz WAV; returns durations by dst and (src, reason) failures.

    `mono_sources=True` (e.g. G.722 prompts) converts in batches of one ffmpeg process each; otherwise every
    file goes through load_audio (true channel mean, specific errors).
    """
    for _, dst, _ in jobs:
        dst.parent.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not wav_duration(job[1])]
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:
        if mono_sources and todo:
            size = max(1, min(_BATCH, -(-len(todo) // workers)))
            list(pool.map(_convert_mono_batch, [todo[i : i + size] for i in range(0, len(todo), size)]))

        def run(job):
            src, dst, fmt = job
            try:
                return src, dst, convert_to_wav(src, dst, fmt), None
            except (AudioError, OSError) as exc:
                return src, dst, None, f"{type(exc).__name__}: {exc}"

        durations, failed = {}, []
        for src, dst, duration, error in tqdm(pool.map(run, jobs), total=len(jobs), desc=desc, leave=False):
            if error:
                log.warning("skipping %s: %s", src, error)
                failed.append((str(src), error))
            else:
                durations[dst] = duration
    return durations, failed


def _align_job(job: tuple[str, str, str]) -> tuple[str, list[dict] | str]:
    from freud_pipeline.audio.alignment import AlignmentError, align_file

    clip_id, path, transcript = job
    try:
        return clip_id, align_file(path, transcript).rows(clip_id)
    except (AlignmentError, AudioError) as exc:
        return clip_id, str(exc)


def align_all(
    jobs: Sequence[tuple[str, Path, str]], workers: int | None = None, desc: str = "aligning"
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Force-align (clip_id, audio path, transcript) jobs; returns alignment rows and (clip_id, reason) failures."""
    jobs = [(clip_id, str(path), text) for clip_id, path, text in jobs]
    workers = workers or default_workers()
    if workers > 1 and len(jobs) >= _MIN_CLIPS_FOR_WORKERS:
        # spawn, not fork: the caller may hold threads (Dagster) or a pocketsphinx decoder
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_align_job, jobs, chunksize=8)
    else:
        pool, results = None, map(_align_job, jobs)
    rows, failed = [], []
    try:
        for clip_id, result in tqdm(results, total=len(jobs), desc=desc, leave=False):
            if isinstance(result, str):
                log.info("no alignment for %s: %s", clip_id, result)
                failed.append((clip_id, result))
            else:
                rows.extend(result)
    finally:
        if pool is not None:
            pool.shutdown()
    return rows, failed


def previous_alignments(out_dir: Path) -> dict[tuple[str, str], list[dict]]:
    """Alignment rows of an earlier build in out_dir, keyed by (clip_id, transcript), to skip re-aligning."""
    if not (out_dir / MANIFEST_FILE).exists() or not (out_dir / ALIGNMENTS_FILE).exists():
        return {}
    try:
        manifest, alignments = load_manifest(out_dir), load_alignments(out_dir)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable earlier build in %s: %s", out_dir, exc)
        return {}
    transcripts = dict(zip(manifest.clip_id, manifest.transcript))
    grouped: dict[str, list[dict]] = {}
    for row in alignments.to_dict("records"):
        grouped.setdefault(row["clip_id"], []).append(row)
    return {(cid, transcripts[cid]): rows for cid, rows in grouped.items() if cid in transcripts}


def align_with_cache(
    jobs: Sequence[tuple[str, Path, str]], out_dir: Path, workers: int | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """align_all, reusing the alignment of any clip whose transcript is unchanged since the last build."""
    cached = previous_alignments(out_dir)
    rows = [row for clip_id, _, text in jobs for row in cached.get((clip_id, text), [])]
    todo = [job for job in jobs if (job[0], job[2]) not in cached]
    new_rows, failed = align_all(todo, workers)
    log.info("aligned %d clips, reused %d, %d failed", len(todo) - len(failed), len(jobs) - len(todo), len(failed))
    return rows + new_rows, failed
