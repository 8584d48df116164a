"""Compute Whisper encoder activations for a manifest: into Arrow shards, or streamed without disk.

Audio is decoded in background threads while the encoder runs, windows are batched, the encoder stops after
the deepest block a hook needs, and only real frames leave this module. Window modes:
- `padded` (default, faithful): each clip in its own 30 s window padded with silence, as Whisper runs it;
  clips longer than 30 s run as consecutive windows and keep their frame offsets.
- `trimmed`: the encoder runs on the clip's own length (positional embedding sliced). Much faster on short
  clips, but attention no longer sees the padding Whisper was trained with: fidelity is measured, not assumed.
- `packed`: several short clips share one 30 s window. Also faster; also measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from freud_pipeline.activations.schema import ShardSpec
from freud_pipeline.activations.writer import MANIFEST, ShardWriter, is_complete
from freud_pipeline.audio.decode import load_audio
from freud_pipeline.devices import resolve_device
from freud_pipeline.errors import AudioError
from freud_pipeline.frames import FRAME_SECONDS, SAMPLES_PER_FRAME
from freud_pipeline.settings import data_dir
from freud_pipeline.whisper.hooks import (
    WINDOW_FRAMES,
    EncoderCapture,
    hook_width,
    log_mel,
    n_real_frames,
    split_windows,
)
from freud_pipeline.whisper.models import load_model
from whisper.audio import N_SAMPLES

log = logging.getLogger(__name__)

ClipActivations = tuple[str, np.ndarray, dict[str, np.ndarray]]  # clip_id, frame positions, {hook: [n, width]}


@dataclass
class Segment:
    """Where one clip's frames sit inside an encoder window."""

    clip_id: str
    first_frame: int  # position of the clip's first frame within the clip (window index * 1500)
    window_offset: int  # first encoder position of this piece inside the window
    n_frames: int
    last: bool  # the clip's final piece


@dataclass
class Window:
    mel: torch.Tensor
    segments: list[Segment] = field(default_factory=list)


def input_fingerprint(manifest: pd.DataFrame) -> str:
    """Changes whenever the clips (ids, files, durations) change."""
    cols = [c for c in ("clip_id", "path", "duration_s") if c in manifest.columns]
    return hashlib.sha256(manifest[cols].to_csv(index=False).encode()).hexdigest()[:16]


def clip_windows(audio: np.ndarray, clip_id: str, n_mels: int, mode: str) -> list[Window]:
    """A clip's own windows (padded or trimmed)."""
    pieces = split_windows(audio)
    windows = []
    for i, piece in enumerate(pieces):
        frames = n_real_frames(len(piece))
        if mode == "trimmed":
            mel = log_mel(piece, n_mels, pad=False)[:, : 2 * frames]
            mel = torch.nn.functional.pad(mel, (0, 2 * frames - mel.shape[1]))
        else:
            mel = log_mel(piece, n_mels)
        windows.append(Window(mel, [Segment(clip_id, i * WINDOW_FRAMES, 0, frames, i == len(pieces) - 1)]))
    return windows


def packed_windows(clips: Iterable[tuple[str, np.ndarray]], n_mels: int) -> Iterator[Window]:
    """Pack consecutive short clips into shared 30 s windows, each clip starting on a frame boundary."""
    pending: list[tuple[str, np.ndarray]] = []
    used = 0

    def emit() -> Window:
        audio = np.zeros(N_SAMPLES, dtype=np.float32)
        window, offset = Window(mel=None), 0
        for clip_id, clip in pending:
            audio[offset * SAMPLES_PER_FRAME : offset * SAMPLES_PER_FRAME + len(clip)] = clip
            frames = n_real_frames(len(clip))
            window.segments.append(Segment(clip_id, 0, offset, frames, True))
            offset += frames
        window.mel = log_mel(audio, n_mels)
        return window

    for clip_id, audio in clips:
        frames = n_real_frames(len(audio))
        if len(audio) > N_SAMPLES:  # long clips are not packable: their own padded windows
            yield from clip_windows(audio, clip_id, n_mels, "padded")
            continue
        if used + frames > WINDOW_FRAMES:
            yield emit()
            pending, used = [], 0
        pending.append((clip_id, audio))
        used += frames
    if pending:
        yield emit()


def _batches(windows: Iterable[Window], batch_size: int, mode: str) -> Iterator[list[Window]]:
    batch: list[Window] = []
    for window in windows:
        # Trimmed windows batch only with windows of the same length: no padding may re-enter the encoder.
        if batch and (len(batch) == batch_size or (mode == "trimmed" and batch[0].mel.shape != window.mel.shape)):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def iter_clip_activations(
    rows: pd.DataFrame,
    capture: EncoderCapture,
    *,
    window_mode: str = "padded",
    batch_size: int = 8,
    data_root: Path | None = None,
    decode_workers: int = 2,
    skipped: list | None = None,
) -> Iterator[ClipActivations]:
    """(clip_id, frames, {hook: float32 [frames, width]}) per clip, in manifest order; bad audio is skipped."""
    data_root = Path(data_root or data_dir())
    n_mels = capture.model.dims.n_mels
    skipped = skipped if skipped is not None else []

    def decode(row) -> tuple[str, np.ndarray | None]:
        try:
            return row.clip_id, load_audio(data_root / row.path)
        except (AudioError, FileNotFoundError) as exc:
            skipped.append({"clip_id": row.clip_id, "reason": str(exc)})
            return row.clip_id, None

    def decoded() -> Iterator[tuple[str, np.ndarray]]:
        with ThreadPoolExecutor(decode_workers) as pool:
            # map() keeps order and runs ahead of the encoder, so decoding overlaps compute.
            for clip_id, audio in pool.map(decode, rows.itertuples(index=False)):
                if audio is not None:
                    yield clip_id, audio

    if window_mode == "packed":
        windows = packed_windows(decoded(), n_mels)
    else:
        windows = (w for clip_id, audio in decoded() for w in clip_windows(audio, clip_id, n_mels, window_mode))

    param = next(capture.model.parameters())
    pending: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
    for batch in _batches(windows, batch_size, window_mode):
        mels = torch.stack([w.mel for w in batch]).to(param.device, param.dtype)
        captured = {h: t.float().cpu().numpy() for h, t in capture.capture(mels).items()}
        for i, window in enumerate(batch):
            for seg in window.segments:
                span = slice(seg.window_offset, seg.window_offset + seg.n_frames)
                frames = np.arange(seg.n_frames, dtype=np.int32) + seg.first_frame
                pending.setdefault(seg.clip_id, []).append((frames, {h: a[i, span] for h, a in captured.items()}))
                if seg.last:
                    parts = pending.pop(seg.clip_id)
                    yield (
                        seg.clip_id,
                        np.concatenate([f for f, _ in parts]),
                        {h: np.concatenate([a[h] for _, a in parts]) for h in capture.hooks},
                    )


def measure_fidelity(rows: pd.DataFrame, capture: EncoderCapture, shard_dir: Path, *, sample: int = 24,
                     batch_size: int = 8, data_root: Path | None = None) -> dict:
    """A fast mode's fidelity: its stored activations of a sample of clips against the faithful padded mode."""
    from freud_pipeline.activations.fidelity import compare_modes
    from freud_pipeline.activations.reader import ActivationReader

    chosen = rows.sample(n=min(sample, len(rows)), random_state=0)
    wanted = set(chosen["clip_id"])
    stored_reader = ActivationReader(shard_dir)
    report = {}
    for hook in capture.hooks:
        reference = {cid: acts[hook] for cid, _, acts in
                     iter_clip_activations(chosen, capture, window_mode="padded", batch_size=batch_size,
                                           data_root=data_root)}
        stored = {cid: a for cid, a in stored_reader.iter_clips(hook, dtype=np.float32) if cid in wanted}
        report[hook] = {k: round(v, 4) for k, v in compare_modes(reference, stored).items()}
    return report


def prepare_capture(model: str, hooks: list[str], device: str = "auto") -> EncoderCapture:
    whisper_model = load_model(model, device=resolve_device(device))
    if whisper_model.device.type == "cuda":
        whisper_model = whisper_model.half()  # fp16 on CUDA; CPU stays fp32
    return EncoderCapture(whisper_model, hooks)


def collect_activations(
    manifest: pd.DataFrame,
    out_dir: Path,
    *,
    model: str = "tiny.en",
    hooks: list[str],
    dtype: str = "float16",
    window_mode: str = "padded",
    batch_size: int = 8,
    device: str = "auto",
    collect_max: int | None = None,
    data_root: Path | None = None,
    decode_workers: int = 2,
    frames_per_shard: int = 20_000,
    on_progress: Callable[[int, int, float], None] | None = None,
    fidelity_sample: int = 24,
) -> dict:
    """Write activations of `hooks` for the manifest's clips; returns the shard manifest (with skipped clips).

    A fast window mode (trimmed, packed) also runs the faithful mode on `fidelity_sample` clips and records its
    fidelity in the manifest (0 skips it: a fixed cost, which dominates on small sets)."""
    rows = manifest.head(collect_max) if collect_max else manifest
    capture = prepare_capture(model, hooks, device)
    spec = ShardSpec(
        model=capture.model.freud_name,
        model_sha256=capture.model.freud_checkpoint.sha256,
        hooks=tuple(capture.hooks),
        widths=tuple(hook_width(capture.model, h) for h in capture.hooks),
        dtype=dtype,
        window_mode=window_mode,
        source="whisper",
    )
    fingerprint = input_fingerprint(rows)
    if is_complete(out_dir, spec, fingerprint):
        log.info("activations in %s are up to date: nothing to do", out_dir)
        return json.loads((Path(out_dir) / MANIFEST).read_text()) | {"reused": True}

    writer = ShardWriter(out_dir, spec, frames_per_shard=frames_per_shard, input_fingerprint=fingerprint)
    todo = rows[~rows["clip_id"].isin(writer.done)]
    skipped: list[dict] = []
    started, audio_seconds, done = time.perf_counter(), 0.0, 0
    bar = tqdm(total=len(todo), unit="clip", desc=f"collect {Path(out_dir).name}", mininterval=2.0)
    clips = iter_clip_activations(todo, capture, window_mode=window_mode, batch_size=batch_size,
                                  data_root=data_root, decode_workers=decode_workers, skipped=skipped)
    for clip_id, frames, acts in clips:
        writer.add(clip_id, frames, acts)
        done += 1
        audio_seconds += len(frames) * FRAME_SECONDS
        bar.update(1)
        if on_progress:
            on_progress(done, len(todo), audio_seconds / max(time.perf_counter() - started, 1e-9))
    bar.close()
    elapsed = time.perf_counter() - started
    writer.flush()  # every clip on disk before the fidelity sample reads it back
    fidelity = None
    if window_mode != "padded" and writer.done and fidelity_sample > 0:
        fidelity = measure_fidelity(rows[rows["clip_id"].isin(writer.done)], capture, out_dir,
                                    sample=fidelity_sample, batch_size=batch_size, data_root=data_root)
    return writer.close(extra_metadata={
        "fidelity_vs_padded": fidelity,
        "skipped": skipped,
        "elapsed_s": round(elapsed, 2),
        "audio_seconds_per_s": round(audio_seconds / max(elapsed, 1e-9), 2),
        "reused": False,
    })
