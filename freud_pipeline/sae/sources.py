"""Frame sources for training: the protocol, an in-memory adapter, a replayable stream, and frames of several
shard directories (optionally some clips of each) as one source.

A frame source is anything with `random_frames(hook, batch_size, seed) -> Iterator[Tensor[batch, d]]` and
`width(hook)` (e.g. `ActivationReader`); sources of several hooks also have `random_frames_multi(hooks, batch_size,
seed) -> Iterator[{hook: Tensor}]`, one draw of rows read for every hook (what `sae.multi.train_saes` steps on).
Exact resume relies on a source replaying the same batches for the same seed; `FrameStream` counts what it
consumed so a resumed run can skip to the same place.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@runtime_checkable
class FrameSource(Protocol):
    def random_frames(self, hook: str, batch_size: int, seed: int) -> Iterator[Tensor]: ...

    def width(self, hook: str) -> int: ...


class TensorFrameSource:
    """Frames [N, d] held in memory, served in endless reshuffled passes (every batch is full)."""

    def __init__(self, frames: Tensor | np.ndarray, hook: str | None = None):
        frames = torch.as_tensor(frames)
        if frames.dim() != 2 or frames.shape[0] == 0:
            raise ValueError(f"frames must be a non-empty 2-D array [frames, width]; got shape {tuple(frames.shape)}")
        self.frames = frames
        self.hook = hook  # None: serve these frames for any hook name

    def _check(self, hook: str) -> None:
        if self.hook is not None and hook != self.hook:
            raise ValueError(f"this source holds frames of hook {self.hook!r}, not {hook!r}")

    def width(self, hook: str) -> int:
        self._check(hook)
        return self.frames.shape[1]

    def random_frames(self, hook: str, batch_size: int, seed: int) -> Iterator[Tensor]:
        self._check(hook)
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        while True:
            while len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(self.frames), generator=generator)])
            take, order = order[:batch_size], order[batch_size:]
            yield self.frames[take]


def as_frame_source(source, hook: str | None = None) -> FrameSource:
    if isinstance(source, (Tensor, np.ndarray)):
        return TensorFrameSource(source, hook)
    if not isinstance(source, FrameSource):
        raise TypeError(
            f"{type(source).__name__} is not a frame source: pass a 2-D tensor/array of frames or an object with "
            f"random_frames(hook, batch_size, seed) and width(hook)"
        )
    return source


def multi_frames(source, hooks: list[str], batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Batches of several hooks for the same frames: the source's `random_frames_multi` (one read of each batch's
    positions for all hooks) when it has one; else its per-hook `random_frames` side by side (a reader of one
    hook, such as TensorFrameSource, or any source whose batches depend only on the seed)."""
    if hasattr(source, "random_frames_multi"):
        return iter(source.random_frames_multi(list(hooks), batch_size, seed))
    iterators = {hook: iter(source.random_frames(hook, batch_size, seed)) for hook in hooks}
    return ({hook: batch for hook, batch in zip(iterators, batches)} for batches in zip(*iterators.values()))


class FrameStream:
    """Batches from a source, restarted with a new seed if it runs dry, with a count of batches consumed. With a
    list of hooks (`hook=[...]`) each batch is {hook: frames} of the same rows (`multi_frames`)."""

    def __init__(self, source: FrameSource, hook: str | list[str], batch_size: int, seed: int, skip: int = 0):
        self.source, self.hook, self.batch_size, self.seed = source, hook, batch_size, seed
        self.consumed = 0
        self._passes = 0
        self._iterator = self._draw(seed)
        for _ in range(skip):  # replay rather than seek: the protocol has no seek, and this is exact
            next(self)

    def _draw(self, seed: int):
        if isinstance(self.hook, str):
            return iter(self.source.random_frames(self.hook, self.batch_size, seed))
        return multi_frames(self.source, self.hook, self.batch_size, seed)

    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> Tensor | dict[str, Tensor]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._passes += 1
            self._iterator = self._draw(self.seed + self._passes)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"frame source yields no batches for hook {self.hook!r}") from None
        self.consumed += 1
        if isinstance(batch, dict):
            return {hook: torch.as_tensor(frames) for hook, frames in batch.items()}
        return torch.as_tensor(batch)


class ShardFrameSource:
    """Frames of several shard directories (ActivationReaders) as one source, each reader optionally restricted to
    the clips `keep(clip_id)` accepts. Every epoch is one permutation of all eligible frames, drawn exactly as
    `ActivationReader.random_frames` draws them (one unrestricted reader gives the very same batches), so the same
    seed replays the same batches: exact resume holds."""

    def __init__(self, parts):
        """parts: (reader, keep) pairs; keep None takes every frame. Readers left with no frame are dropped."""
        self.readers, self._rows = [], []
        for reader, keep in parts:
            rows = np.arange(reader.n_frames) if keep is None else _kept_rows(reader, keep)
            if len(rows):
                self.readers.append(reader)
                self._rows.append(rows)
        if not self.readers:
            raise ValueError("no frames to draw from: every shard directory is empty or all its clips left out")
        self._starts = np.concatenate([[0], np.cumsum([len(rows) for rows in self._rows])])
        self.model_name = self.readers[0].spec.model

    @property
    def n_frames(self) -> int:
        return int(self._starts[-1])

    def width(self, hook: str) -> int:
        widths = {reader.width(hook) for reader in self.readers}
        if len(widths) > 1:
            raise ValueError(f"hook {hook!r} has different widths in these shard directories: {sorted(widths)}")
        return widths.pop()

    def random_frames(self, hook: str, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
        for batch in self.random_frames_multi([hook], batch_size, seed):
            yield batch[hook]

    def random_frames_multi(self, hooks: list[str], batch_size: int, seed: int = 0) -> Iterator[dict[str, Tensor]]:
        """One draw of frame positions per batch, read for every hook: {hook: [batch, width]}, the same rows (for
        each hook exactly `random_frames`' batches)."""
        widths, n = {hook: self.width(hook) for hook in hooks}, self.n_frames
        batch_size = min(batch_size, n)
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(n)
            for start in range(0, n - batch_size + 1, batch_size):
                chosen = np.sort(order[start : start + batch_size])
                which = np.searchsorted(self._starts, chosen, side="right") - 1
                out = {hook: np.empty((len(chosen), widths[hook]), dtype=np.float32) for hook in hooks}
                for r in np.unique(which):
                    mask = which == r
                    rows = self._rows[r][chosen[mask] - self._starts[r]]
                    for hook in hooks:
                        out[hook][mask] = self.readers[r].frames_at(hook, rows)
                yield {hook: torch.from_numpy(array) for hook, array in out.items()}


def _kept_rows(reader, keep) -> np.ndarray:
    """Row positions of the frames of the clips `keep` accepts (clips are stored contiguously, in order)."""
    rows, position = [], 0
    for clip_id, frames in reader.iter_clips(reader.hooks[0]):
        if keep(clip_id):
            rows.append(np.arange(position, position + len(frames)))
        position += len(frames)
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
