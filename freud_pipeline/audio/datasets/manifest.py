"""Manifest and alignment tables (Parquet) shared by every dataset builder.

Layout of a built dataset: <out_dir>/manifest.parquet, <out_dir>/alignments.parquet (when any clip has one),
<out_dir>/audio/<clip file>. Manifest paths are relative to the data root (settings.data_dir() by default).
Required columns come first, in contract order; source-specific extra columns (e.g. `labels`) may follow.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from freud_pipeline import settings

MANIFEST_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("path", pa.string()),
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
    ("transcript", pa.string()),
    ("speaker", pa.string()),
    ("source", pa.string()),
    ("split", pa.string()),
])
ALIGNMENT_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("tier", pa.string()),
    ("label", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
])
SPLITS = ("train", "dev", "test")
MANIFEST_FILE = "manifest.parquet"
ALIGNMENTS_FILE = "alignments.parquet"


@dataclass
class DatasetBuild:
    name: str
    manifest_path: Path
    alignments_path: Path | None
    n_clips: int
    total_seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out of the manifest
    unaligned: list[tuple[str, str]] = field(default_factory=list)  # (clip_id, reason): in the manifest, no alignment

    @classmethod
    def from_paths(cls, manifest_path: str | Path, alignments_path: str | Path | None = None, name: str | None = None):
        """Describe an existing build from its files (skip reasons are not stored, so `skipped` is empty)."""
        manifest = load_manifest(manifest_path)
        return cls(
            name=name or Path(manifest_path).parent.name,
            manifest_path=Path(manifest_path),
            alignments_path=Path(alignments_path) if alignments_path else None,
            n_clips=len(manifest),
            total_seconds=float(manifest["duration_s"].sum()),
        )


def assign_split(key: str) -> str:
    """Deterministic ~80/10/10 train/dev/test split from a stable hash of `key` (a clip id, or a group id)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def resolve_data_root(data_root: Path | None) -> Path:
    return Path(data_root).resolve() if data_root is not None else settings.data_dir()


def relative_path(path: Path, data_root: Path) -> str:
    """Path of a clip as stored in the manifest: relative to the data root, with forward slashes."""
    try:
        return Path(path).resolve().relative_to(Path(data_root).resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not under the data root {data_root}; build datasets inside it.") from None


def _write_table(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic: readers never see a half-written file
    return path


def write_manifest(rows: pd.DataFrame | Iterable[dict], path: Path) -> Path:
    """Validate and write a manifest atomically (temporary file, then rename)."""
    frame = pd.DataFrame(rows if isinstance(rows, pd.DataFrame) else list(rows))
    missing = [c for c in MANIFEST_SCHEMA.names if c not in frame.columns]
    if missing and len(frame):
        raise ValueError(f"manifest rows lack columns {missing}; required: {MANIFEST_SCHEMA.names}")
    if frame.empty:
        frame = pd.DataFrame({c: pd.Series(dtype=object) for c in MANIFEST_SCHEMA.names})
    if frame["clip_id"].duplicated().any():
        raise ValueError(f"duplicate clip_id in manifest: {sorted(set(frame.loc[frame.clip_id.duplicated(), 'clip_id']))[:5]}")
    if bad := set(frame["split"]) - set(SPLITS):
        raise ValueError(f"unknown split(s) {sorted(bad)}; expected {SPLITS}")
    extras = [c for c in frame.columns if c not in MANIFEST_SCHEMA.names]
    schema = MANIFEST_SCHEMA
    for name in extras:
        schema = schema.append(pa.field(name, pa.Table.from_pandas(frame[[name]], preserve_index=False).schema.field(name).type))
    return _write_table(pa.Table.from_pandas(frame[MANIFEST_SCHEMA.names + extras], schema=schema, preserve_index=False), path)


def write_alignments(rows: pd.DataFrame | Iterable[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows if isinstance(rows, pd.DataFrame) else list(rows), columns=ALIGNMENT_SCHEMA.names)
    if bad := set(frame["tier"]) - {"word", "phone"}:
        raise ValueError(f"unknown alignment tier(s) {sorted(bad)}; expected 'word' or 'phone'")
    return _write_table(pa.Table.from_pandas(frame, schema=ALIGNMENT_SCHEMA, preserve_index=False), path)


def load_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    frame = pq.read_table(path).to_pandas()
    if missing := [c for c in MANIFEST_SCHEMA.names if c not in frame.columns]:
        raise ValueError(f"{path} is not a FREUD manifest: missing columns {missing}")
    return frame


def load_alignments(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pq.read_table(path / ALIGNMENTS_FILE if path.is_dir() else path).to_pandas()


def finish_build(
    name: str,
    out_dir: Path,
    manifest_rows: list[dict],
    alignment_rows: list[dict] | None,
    skipped: list[tuple[str, str]] = (),
    unaligned: list[tuple[str, str]] = (),
) -> DatasetBuild:
    """Write manifest (+ alignments) into out_dir and describe the result."""
    manifest_rows = sorted(manifest_rows, key=lambda r: r["clip_id"])
    manifest_path = write_manifest(manifest_rows, out_dir / MANIFEST_FILE)
    alignments_path = None
    if alignment_rows is not None:
        alignments_path = write_alignments(alignment_rows, out_dir / ALIGNMENTS_FILE)
    elif (out_dir / ALIGNMENTS_FILE).exists():
        (out_dir / ALIGNMENTS_FILE).unlink()  # stale from an earlier build with alignment
    return DatasetBuild(
        name=name,
        manifest_path=manifest_path,
        alignments_path=alignments_path,
        n_clips=len(manifest_rows),
        total_seconds=float(sum(r["duration_s"] for r in manifest_rows)),
        skipped=list(skipped),
        unaligned=list(unaligned),
    )


def combine(builds: Iterable[DatasetBuild], out_dir: Path, name: str = "combined") -> DatasetBuild:
    """Union of several builds' manifests and alignments (clip ids must be unique across them)."""
    builds = list(builds)
    manifests = [load_manifest(b.manifest_path) for b in builds]
    alignments = [load_alignments(b.alignments_path) for b in builds if b.alignments_path is not None]
    manifest = pd.concat(manifests, ignore_index=True) if manifests else pd.DataFrame()
    rows = manifest.to_dict("records")
    alignment_rows = pd.concat(alignments, ignore_index=True).to_dict("records") if alignments else None
    skipped = [item for b in builds for item in b.skipped]
    unaligned = [item for b in builds for item in b.unaligned]
    return finish_build(name, Path(out_dir), rows, alignment_rows, skipped, unaligned)
