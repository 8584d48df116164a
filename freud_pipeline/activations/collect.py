"""Collect Whisper encoder activations for a dataset manifest into Arrow shards.

Audio is decoded in background threads while the encoder runs, windows are batched, the encoder stops after
the deepest block a hook needs, and only real frames are stored. Re-running with the same spec and input
does nothing; a killed run resumes where its last complete shard ended.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from freud_pipeline.activations.schema import ShardSpec
from freud_pipeline.activations.writer import MANIFEST, ShardWriter, is_complete
from freud_pipeline.audio.decode import load_audio
from freud_pipeline.errors import AudioError
from freud_pipeline.settings import data_dir
from freud_pipeline.whisper.hooks import (
    WINDOW_FRAMES,
    EncoderCapture,
    hook_width,
    log_mel,
    n_real_frames,
    split_windows,
)
from freud_pipeline.whisper.models import load_model, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Window:
    clip_id: str
    index: int  # window number within the clip; frame positions are offset by index * 1500
    mel: torch.Tensor
    n_frames: int
    last: bool


def input_fingerprint(manifest: pd.DataFrame) -> str:
    """Changes whenever the clips (ids, files, durations) change."""
    cols = [c for c in ("clip_id", "path", "duration_s") if c in manifest.columns]
    payload = manifest[cols].to_csv(index=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _windows(audio: np.ndarray, clip_id: str, n_mels: int, mode: str) -> list[Window]:
    pieces = split_windows(audio)
    windows = []
    for i, piece in enumerate(pieces):
        frames = n_real_frames(len(piece))
        if mode == "trimmed":
            mel = log_mel(piece, n_mels, pad=False)[:, : 2 * frames]
            mel = torch.nn.functional.pad(mel, (0, 2 * frames - mel.shape[1]))
        else:
            mel = log_mel(piece, n_mels)
        windows.append(Window(clip_id, i, mel, frames, i == len(pieces) - 1))
    return windows


def _batches(windows: Iterable[Window], batch_size: int, mode: str) -> Iterator[list[Window]]:
    batch: list[Window] = []
    for window in windows:
        # Trimmed windows only batch with windows of the same length (no padding re-enters the encoder).
        if batch and (len(batch) == batch_size or (mode == "trimmed" and batch[0].n_frames != window.n_frames)):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


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
    frames_per_shard: int = 50_000,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Write activations of `hooks` for the manifest's clips; returns the shard manifest (with skipped clips)."""
    if window_mode == "packed":
        raise NotImplementedError("packed window mode is not available yet; use 'padded' or 'trimmed'")
    data_root = Path(data_root or data_dir())
    rows = manifest.head(collect_max) if collect_max else manifest
    whisper_model = load_model(model, device=resolve_device(device))
    if whisper_model.device.type == "cuda":
        whisper_model = whisper_model.half()
    capture = EncoderCapture(whisper_model, hooks)
    spec = ShardSpec(
        model=whisper_model.freud_name,
        model_sha256=whisper_model.freud_checkpoint.sha256,
        hooks=tuple(capture.hooks),
        widths=tuple(hook_width(whisper_model, h) for h in capture.hooks),
        dtype=dtype,
        window_mode=window_mode,
        source="whisper",
    )
    fingerprint = input_fingerprint(rows)
    if is_complete(out_dir, spec, fingerprint):
        log.info("activations in %s are up to date: nothing to do", out_dir)
        import json

        return json.loads((Path(out_dir) / MANIFEST).read_text()) | {"reused": True}

    writer = ShardWriter(out_dir, spec, frames_per_shard=frames_per_shard, input_fingerprint=fingerprint)
    todo = rows[~rows["clip_id"].isin(writer.done)]
    skipped: list[dict] = []
    n_mels = whisper_model.dims.n_mels

    def decode(row) -> list[Window]:
        try:
            audio = load_audio(data_root / row.path)
        except (AudioError, FileNotFoundError) as exc:
            skipped.append({"clip_id": row.clip_id, "reason": str(exc)})
            return []
        return _windows(audio, row.clip_id, n_mels, window_mode)

    def all_windows() -> Iterator[Window]:
        with ThreadPoolExecutor(decode_workers) as pool:
            # map() keeps order and runs ahead of the encoder: decoding overlaps compute.
            for windows in pool.map(decode, todo.itertuples(index=False)):
                yield from windows

    pending: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
    started, audio_seconds, clips_done = time.perf_counter(), 0.0, 0
    bar = tqdm(total=len(todo), unit="clip", desc=f"collect {Path(out_dir).name}", mininterval=2.0)
    param = next(whisper_model.parameters())
    for batch in _batches(all_windows(), batch_size, window_mode):
        mels = torch.stack([w.mel for w in batch]).to(param.device, param.dtype)
        captured = capture.capture(mels)
        for i, window in enumerate(batch):
            frames = np.arange(window.n_frames, dtype=np.int32) + window.index * WINDOW_FRAMES
            acts = {h: captured[h][i, : window.n_frames].float().cpu().numpy() for h in capture.hooks}
            pending.setdefault(window.clip_id, []).append((frames, acts))
            if window.last:
                parts = pending.pop(window.clip_id)
                writer.add(
                    window.clip_id,
                    np.concatenate([f for f, _ in parts]),
                    {h: np.concatenate([a[h] for _, a in parts]) for h in capture.hooks},
                )
                clips_done += 1
                audio_seconds += sum(len(f) for f, _ in parts) * 0.02
                bar.update(1)
                if on_progress:
                    on_progress(clips_done, len(todo), audio_seconds / max(time.perf_counter() - started, 1e-9))
    bar.close()
    elapsed = time.perf_counter() - started
    return writer.close(
        extra_metadata={
            "skipped": skipped,
            "elapsed_s": round(elapsed, 2),
            "audio_seconds_per_s": round(audio_seconds / max(elapsed, 1e-9), 2),
            "reused": False,
        }
    )
