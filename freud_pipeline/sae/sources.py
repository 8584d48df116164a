"""Frame sources for training: the protocol, an in-memory adapter, and a replayable stream.

A frame source is anything with `random_frames(hook, batch_size, seed) -> Iterator[Tensor[batch, d]]` and
`width(hook)` (e.g. `ActivationReader`). Exact resume relies on a source replaying the same batches for the same
seed; `FrameStream` counts what it consumed so a resumed run can skip to the same place.
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


class FrameStream:
    """Batches from a source, restarted with a new seed if it runs dry, with a count of batches consumed."""

    def __init__(self, source: FrameSource, hook: str, batch_size: int, seed: int, skip: int = 0):
        self.source, self.hook, self.batch_size, self.seed = source, hook, batch_size, seed
        self.consumed = 0
        self._passes = 0
        self._iterator = iter(source.random_frames(hook, batch_size, seed))
        for _ in range(skip):  # replay rather than seek: the protocol has no seek, and this is exact
            next(self)

    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> Tensor:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._passes += 1
            self._iterator = iter(self.source.random_frames(self.hook, self.batch_size, self.seed + self._passes))
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"frame source yields no batches for hook {self.hook!r}") from None
        self.consumed += 1
        return torch.as_tensor(batch)
