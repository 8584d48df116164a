"""Audio arriving over time in a watched folder, taken in batches.

A *batch* is a set of new or changed files seen together; it is recorded as JSON (folder, relative paths, sizes,
mtimes) under the data directory before anything is processed, so the batch can be rebuilt later from its key
alone. The key is deterministic: `<newest mtime, UTC>-<hash of the file states>`, so a repeated evaluation
names the same batch. Files still being written (modified less than `settle_s` ago) wait for a later look.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from freud_pipeline.audio.datasets._common import slug
from freud_pipeline.audio.datasets.folder import build_from_files
from freud_pipeline.audio.datasets.manifest import DatasetBuild, resolve_data_root
from freud_pipeline.errors import DatasetUnavailableError

FileState = tuple[int, int]  # (size in bytes, mtime in ns)
IGNORED_SUFFIXES = {".txt", ".part", ".partial", ".tmp", ".crdownload"}


def scan_folder(folder: str | Path) -> dict[str, FileState]:
    """{relative posix path: (size, mtime_ns)} of every candidate audio file under `folder` (recursively).

    Hidden files and folders, transcript sidecars (.txt) and partial downloads are not candidates.
    """
    folder = Path(folder)
    found: dict[str, FileState] = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() in IGNORED_SUFFIXES:
            continue
        try:
            st = path.stat()
        except OSError:  # vanished while scanning: next look decides
            continue
        if path.is_file():
            found[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


def select_new(current: dict[str, FileState], seen: dict[str, FileState], *, now_ns: int,
               settle_s: float) -> list[str]:
    """Files whose (size, mtime) differs from what was seen and that have not changed for `settle_s`."""
    settle_ns = int(settle_s * 1e9)
    return sorted(rel for rel, state in current.items()
                  if tuple(seen.get(rel, ())) != tuple(state) and now_ns - state[1] >= settle_ns)


def batch_key(files: dict[str, FileState]) -> str:
    newest = max(state[1] for state in files.values())
    stamp = datetime.fromtimestamp(newest / 1e9, tz=timezone.utc).strftime("%Y%m%dT%H%M%S")
    digest = hashlib.sha1(json.dumps(sorted((k, list(v)) for k, v in files.items())).encode()).hexdigest()[:10]
    return f"{stamp}-{digest}"


def plan_batches(new: list[str], current: dict[str, FileState], max_files: int) -> list[dict[str, FileState]]:
    """Split the new files (sorted) into batches of at most `max_files`."""
    max_files = max(1, int(max_files))
    return [{rel: current[rel] for rel in new[i : i + max_files]} for i in range(0, len(new), max_files)]


def _record_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / f"{key}.json"


def write_batch(records_dir: str | Path, key: str, folder: str | Path, files: dict[str, FileState]) -> Path:
    """Record a batch atomically (idempotent: the same key always holds the same files)."""
    records_dir = Path(records_dir)
    records_dir.mkdir(parents=True, exist_ok=True)
    path = _record_path(records_dir, key)
    payload = {"key": key, "folder": str(Path(folder).resolve()),
               "files": {rel: list(state) for rel, state in sorted(files.items())},
               "recorded_at": (json.loads(path.read_text()).get("recorded_at") if path.is_file() else None)
               or datetime.now(timezone.utc).isoformat(timespec="seconds")}  # a rewrite keeps the arrival time
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def read_batch(records_dir: str | Path, key: str) -> dict:
    path = _record_path(Path(records_dir), key)
    if not path.is_file():
        raise DatasetUnavailableError(
            f"no record of incoming batch {key!r} at {path}: batches are created by the new_audio_sensor; "
            "was the data directory moved or cleaned?")
    record = json.loads(path.read_text())
    if "recorded_at" not in record:  # recorded before arrival times were kept: the record's own mtime
        record["recorded_at"] = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(
            timespec="seconds")
    return record


def seen_in_batches(records_dir: str | Path, folder: str | Path, keys: list[str] | set[str]) -> dict[str, FileState]:
    """File states recorded by the given batches of `folder`: what a lost sensor cursor is rebuilt from."""
    folder = str(Path(folder).resolve())
    seen: dict[str, FileState] = {}
    for key in sorted(keys):
        path = _record_path(Path(records_dir), key)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if record.get("folder") == folder:
            seen.update({rel: tuple(state) for rel, state in record["files"].items()})
    return seen


def build_audio_files(
    folder: str | Path,
    files: list[str],
    out_dir: str | Path,
    *,
    source: str = "incoming",
    speaker: str = "unknown",
    align: bool = True,
    data_root: Path | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Like build_audio_folder, for an explicit list of files under `folder` (relative paths).

    Each file is converted to 16 kHz mono WAV under <out_dir>/audio; files that are gone or do not decode are
    left out and listed in `skipped` with the reason. A missing `folder` is an error (nothing could be read).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetUnavailableError(
            f"the watched folder {folder} does not exist (any more): mount or recreate it, or set FREUD_WATCH_DIR")
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    present = [rel for rel in files if (folder / rel).is_file()]
    skipped = [(str(folder / rel), "FileNotFoundError: deleted or moved after the sensor listed it")
               for rel in files if rel not in present]
    return build_from_files([(folder / rel, slug(rel)) for rel in present], out_dir, source=source,
                            speaker=speaker, align=align, data_root=data_root, workers=workers, skipped=skipped)
