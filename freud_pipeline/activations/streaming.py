"""Activations computed on the fly from audio, with the reader's API: training and search without a cache.

This is the original FREUD's `from_disk: false`. It is slower than reading shards (the encoder runs on every
pass) but needs no disk, and any consumer of `ActivationReader` accepts it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from freud_pipeline.activations.collect import iter_clip_activations, prepare_capture
from freud_pipeline.whisper.hooks import hook_width


class StreamingActivations:
    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        model: str = "tiny.en",
        hooks: list[str],
        window_mode: str = "padded",
        batch_size: int = 8,
        device: str = "auto",
        data_root: Path | None = None,
        shuffle_buffer_frames: int = 200_000,
    ):
        self.manifest = manifest.reset_index(drop=True)
        self.capture = prepare_capture(model, hooks, device)
        self.hooks = list(self.capture.hooks)
        self.model_name = self.capture.model.freud_name  # as ActivationReader's spec.model: what SAE runs record
        self.window_mode = window_mode
        self.batch_size = batch_size
        self.data_root = data_root
        self.shuffle_buffer_frames = shuffle_buffer_frames

    def width(self, hook: str) -> int:
        return hook_width(self.capture.model, hook)

    def clip_ids(self) -> list[str]:
        return list(self.manifest["clip_id"])

    def _clips(self, rows: pd.DataFrame) -> Iterator[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
        return iter_clip_activations(rows, self.capture, window_mode=self.window_mode, batch_size=self.batch_size,
                                     data_root=self.data_root)

    def iter_clips(self, hook: str, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
        for clip_id, _, acts in self._clips(self.manifest):
            yield clip_id, acts[hook] if dtype is None else acts[hook].astype(dtype)

    def random_frames(self, hook: str, batch_size: int, seed: int = 0, epochs: int | None = None,
                      device: str = "cpu") -> Iterator[torch.Tensor]:
        """Clips in a fresh random order each epoch; frames mixed through a bounded shuffle buffer."""
        for batch in self.random_frames_multi([hook], batch_size, seed, epochs, device):
            yield batch[hook]

    def random_frames_multi(self, hooks: list[str], batch_size: int, seed: int = 0, epochs: int | None = None,
                            device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """`random_frames` of several hooks from one encoder pass per clip: {hook: [batch_size, width]}, the same
        frames for every hook (one permutation of the buffer for all); for each hook, `random_frames`' batches."""
        rng = np.random.default_rng(seed)
        epoch = 0
        buffer: dict[str, list[np.ndarray]] = {hook: [] for hook in hooks}
        buffered = 0

        def drain(final: bool):
            nonlocal buffered
            pools = {hook: np.concatenate(parts) for hook, parts in buffer.items()}
            order = rng.permutation(buffered)  # as rng.shuffle(pool) would reorder one hook's frames
            usable = (buffered // batch_size) * batch_size
            for start in range(0, usable, batch_size):
                rows = order[start : start + batch_size]
                yield {hook: torch.from_numpy(pool[rows]).to(device) for hook, pool in pools.items()}
            if not final:
                for hook, pool in pools.items():
                    buffer[hook] = [pool[order[usable:]]]
                buffered -= usable

        while epochs is None or epoch < epochs:
            order = self.manifest.iloc[rng.permutation(len(self.manifest))]
            for _, _, acts in self._clips(order):
                for hook in hooks:
                    buffer[hook].append(acts[hook])
                buffered += len(acts[hooks[0]])
                if buffered >= self.shuffle_buffer_frames:
                    yield from drain(final=False)
            epoch += 1
        if buffered >= batch_size:  # the tail of the last epoch
            yield from drain(final=True)
