"""Memory-mapped reading of activation shards: per-clip iteration and shuffled random frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from freud_pipeline.activations.schema import ShardSpec, column_name, sparse_columns
from freud_pipeline.activations.writer import MANIFEST, shard_files
from freud_pipeline.errors import HookError


class ActivationReader:
    """Read a shard directory without loading it: arrays are zero-copy float16/float32 views of the files."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.paths = shard_files(self.directory)
        if not self.paths:
            raise FileNotFoundError(f"no activation shards in {self.directory}")
        self._batches: list[pa.RecordBatch] = []
        for path in self.paths:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            self._batches.extend(reader.get_batch(i) for i in range(reader.num_record_batches))
        self.spec = ShardSpec.from_schema(self._batches[0].schema)
        self.hooks = list(self.spec.hooks)
        self._sizes = np.array([b.num_rows for b in self._batches])
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)])

    @property
    def manifest(self) -> dict:
        path = self.directory / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def n_frames(self) -> int:
        return int(self._starts[-1])

    def width(self, hook: str) -> int:
        return self.spec.widths[self._hook_position(hook)]

    def _hook_position(self, hook: str) -> int:
        if hook not in self.spec.hooks:
            raise HookError(f"hook {hook!r} not in these shards; they hold {', '.join(self.spec.hooks)}")
        return self.spec.hooks.index(hook)

    def batch_array(self, batch_index: int, hook: str) -> np.ndarray:
        """One shard batch's activations as a zero-copy [frames, width] view of the mapped file
        (sparse shards: a dense float32 copy, see `batch_sparse`)."""
        width = self.width(hook)
        if self.spec.sparse_k:
            values, indices = self.batch_sparse(batch_index, hook)
            dense = np.zeros((len(values), width), dtype=np.float32)
            np.put_along_axis(dense, indices.astype(np.int64), values.astype(np.float32), axis=1)
            return dense
        column = self._batches[batch_index].column(column_name(hook))
        return column.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)

    def batch_sparse(self, batch_index: int, hook: str) -> tuple[np.ndarray, np.ndarray]:
        """Sparse shards: zero-copy (values [frames, k], int32 indices [frames, k])."""
        self._hook_position(hook)
        k = self.spec.sparse_k
        batch = self._batches[batch_index]
        return tuple(batch.column(name).flatten().to_numpy(zero_copy_only=True).reshape(-1, k)
                     for name in sparse_columns(hook))

    def clip_ids(self) -> list[str]:
        ids: list[str] = []
        for batch in self._batches:
            ids.extend(batch.column("clip_id").unique().to_pylist())
        return ids

    def _clip_runs(self, batch: pa.RecordBatch) -> list[tuple[str, int, int]]:
        """(clip_id, start, stop) row runs; a writer stores each clip's frames contiguously."""
        ids = batch.column("clip_id").to_numpy(zero_copy_only=False)
        if len(ids) == 0:
            return []
        cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(ids)]])
        return [(ids[s], int(s), int(e)) for s, e in zip(starts, stops)]

    def iter_clips(self, hook: str, dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(clip_id, activations[frames, width]) for every stored clip, real frames only, in storage order.

        With dtype None the arrays are read-only views of the mapped files; otherwise converted copies.
        """
        for b, batch in enumerate(self._batches):
            if self.spec.sparse_k:  # densify clip by clip: never a whole shard of dense latents in memory
                values, indices = self.batch_sparse(b, hook)
                for clip_id, start, stop in self._clip_runs(batch):
                    dense = np.zeros((stop - start, self.width(hook)), dtype=dtype or np.float32)
                    np.put_along_axis(dense, indices[start:stop].astype(np.int64), values[start:stop], axis=1)
                    yield clip_id, dense
                continue
            acts = self.batch_array(b, hook)
            for clip_id, start, stop in self._clip_runs(batch):
                view = acts[start:stop]
                yield clip_id, view if dtype is None else view.astype(dtype)

    def clip_frames(self, clip_id: str) -> np.ndarray:
        for batch in self._batches:
            for cid, start, stop in self._clip_runs(batch):
                if cid == clip_id:
                    return batch.column("frame").to_numpy()[start:stop]
        raise KeyError(clip_id)

    def random_frames(
        self, hook: str, batch_size: int, seed: int = 0, epochs: int | None = None, device: str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """Shuffled frames across all shards as float32 tensors [batch_size, width]; endless when epochs is None.

        Each epoch is one permutation of every stored frame, so all shards are covered and none repeats within
        an epoch. Sorting each batch's indices before the gather keeps reads local in the mapped files. A shard
        set smaller than one batch gives batches of all its frames (never an endless loop yielding nothing).
        """
        for batch in self.random_frames_multi([hook], batch_size, seed, epochs, device):
            yield batch[hook]

    def random_frames_multi(
        self, hooks: list[str], batch_size: int, seed: int = 0, epochs: int | None = None, device: str = "cpu"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`random_frames` of several hooks at once: each batch is one draw of frame positions, read for every
        hook ({hook: [batch_size, width]}, the same rows); for each hook, exactly the batches `random_frames`
        gives with the same seed."""
        if self.n_frames == 0:
            raise ValueError(f"{self.directory} holds no frames to draw batches from")
        batch_size = min(batch_size, self.n_frames)
        rng = np.random.default_rng(seed)
        arrays = {hook: [self.batch_array(b, hook) for b in range(len(self._batches))] for hook in hooks}
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(self.n_frames)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                rows = np.sort(order[start : start + batch_size])
                yield {hook: torch.from_numpy(self._gather(arrays[hook], rows)).to(device) for hook in hooks}
            epoch += 1

    def frames_at(self, hook: str, indices: np.ndarray) -> np.ndarray:
        arrays = [self.batch_array(b, hook) for b in range(len(self._batches))]
        return self._gather(arrays, np.asarray(indices))

    def _gather(self, arrays: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty((len(indices), arrays[0].shape[1]), dtype=np.float32)
        for b in np.unique(which):
            mask = which == b
            out[mask] = arrays[b][indices[mask] - self._starts[b]]
        return out
