"""Atomic shard writing and resume bookkeeping."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from freud_pipeline.activations.schema import DTYPES, ShardSpec, column_name, sparse_columns

SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.arrow$")
MANIFEST = "shards.json"


def shard_files(directory: Path) -> list[Path]:
    """Complete shards only: a half-written file still has its temporary name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardWriter:
    """Buffers whole clips and writes them as shards of about `frames_per_shard` frames.

    Reopening a directory written with the same spec resumes: `done` holds the clips already stored, and new
    shards continue the numbering. A different spec (other model, hooks, dtype, mode or input) starts afresh.
    """

    def __init__(self, directory: Path, spec: ShardSpec, frames_per_shard: int = 20_000, input_fingerprint: str = ""):
        self.directory = Path(directory)
        self.spec = spec
        self.schema = spec.schema()
        self.frames_per_shard = frames_per_shard
        self.input_fingerprint = input_fingerprint
        self._buffer: list[tuple[str, np.ndarray, dict[str, np.ndarray]]] = []
        self._buffered_frames = 0
        self.done: set[str] = set()
        self._prepare()

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".shard-*.tmp-*"):
            stale.unlink()
        existing = shard_files(self.directory)
        manifest = self.directory / MANIFEST
        previous = json.loads(manifest.read_text()) if manifest.exists() else None
        same = previous is not None and previous.get("spec") == self.spec.to_json()
        if existing and not same:
            shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            existing = []
        self._next_index = 1 + max((int(SHARD_PATTERN.match(p.name).group(1)) for p in existing), default=-1)
        for path in existing:
            with pa.memory_map(str(path)) as source:
                ids = pa.ipc.open_file(source).read_all().column("clip_id").unique()
            self.done.update(ids.to_pylist())
        self._write_manifest(complete=False)

    def add(self, clip_id: str, frames: np.ndarray, activations: dict) -> None:
        """Queue one clip: `frames` are its frame positions, `activations` one [n, width] array per hook
        (for sparse specs a (values [n, k], indices [n, k]) pair per hook)."""
        if clip_id in self.done:
            return
        np_dtype = np.dtype(self.spec.dtype)
        for hook, width in zip(self.spec.hooks, self.spec.widths):
            acts = activations[hook]
            expected = (len(frames), self.spec.sparse_k or width)
            shapes = [a.shape for a in acts] if self.spec.sparse_k else [acts.shape]
            if any(shape != expected for shape in shapes):
                raise ValueError(f"{clip_id}: {hook} has shape {shapes}, expected {expected}")
        # Held in the stored dtype: the buffer (one shard) is the writer's whole memory footprint.
        if self.spec.sparse_k:
            activations = {h: (activations[h][0].astype(np_dtype, copy=False), activations[h][1].astype(np.int32))
                           for h in self.spec.hooks}
        else:
            activations = {h: activations[h].astype(np_dtype, copy=False) for h in self.spec.hooks}
        self._buffer.append((clip_id, frames, activations))
        self._buffered_frames += len(frames)
        if self._buffered_frames >= self.frames_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        np_dtype = np.dtype(self.spec.dtype)
        n = self._buffered_frames
        columns = {
            "clip_id": pa.array([cid for cid, frames, _ in self._buffer for _ in range(len(frames))], pa.string()),
            "frame": pa.array(np.concatenate([f for _, f, _ in self._buffer]).astype(np.int32)),
        }
        for hook, width in zip(self.spec.hooks, self.spec.widths):
            if self.spec.sparse_k:
                k = self.spec.sparse_k
                values = np.concatenate([acts[hook][0] for _, _, acts in self._buffer]).reshape(-1)
                indices = np.concatenate([acts[hook][1] for _, _, acts in self._buffer]).reshape(-1)
                val_col, idx_col = sparse_columns(hook)
                columns[val_col] = pa.FixedSizeListArray.from_arrays(pa.array(values, DTYPES[self.spec.dtype]), k)
                columns[idx_col] = pa.FixedSizeListArray.from_arrays(pa.array(indices, pa.int32()), k)
                continue
            flat = np.concatenate([acts[hook] for _, _, acts in self._buffer]).astype(np_dtype, copy=False)
            values = pa.array(flat.reshape(-1), type=DTYPES[self.spec.dtype])
            columns[column_name(hook)] = pa.FixedSizeListArray.from_arrays(values, width)
        batch = pa.record_batch(list(columns.values()), schema=self.schema)
        assert batch.num_rows == n
        path = self.directory / f"shard-{self._next_index:06d}.arrow"
        tmp = self.directory / f".{path.name}.tmp-{os.getpid()}"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(batch)
        os.replace(tmp, path)  # the shard appears whole or not at all
        self.done.update(cid for cid, _, _ in self._buffer)
        self._next_index += 1
        self._buffer, self._buffered_frames = [], 0

    def close(self, extra_metadata: dict | None = None) -> dict:
        self.flush()
        return self._write_manifest(complete=True, extra=extra_metadata)

    def _write_manifest(self, complete: bool, extra: dict | None = None) -> dict:
        shards = []
        for path in shard_files(self.directory):
            with pa.memory_map(str(path)) as source:
                reader = pa.ipc.open_file(source)
                rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            shards.append({"file": path.name, "frames": rows, "bytes": path.stat().st_size})
        manifest = {
            "spec": self.spec.to_json(),
            "input_fingerprint": self.input_fingerprint,
            "complete": complete,
            "n_clips": len(self.done),
            "n_frames": sum(s["frames"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
            **(extra or {}),
        }
        atomic_write_bytes(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest


def is_complete(directory: Path, spec: ShardSpec, input_fingerprint: str) -> bool:
    """True when the directory already holds every clip for this exact spec and input: nothing to do."""
    manifest = Path(directory) / MANIFEST
    if not manifest.exists():
        return False
    data = json.loads(manifest.read_text())
    return bool(data.get("complete")) and data.get("spec") == spec.to_json() and data.get(
        "input_fingerprint"
    ) == input_fingerprint
