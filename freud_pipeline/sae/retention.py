"""Which SAE runs stay on disk: the champion and the last N, each removed together with its feature sets.

A run directory (`<runs dir>/<run id>/`, see `freud_pipeline.sae.run`) is immutable once complete; only
`prune_runs` deletes one, and only when asked: never a run in progress (`<run id>.partial/`, kept for resuming a
killed run), never anything else in the folder (e.g. a checkpoint of the older in-place layout).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from freud_pipeline import objectstore
from freud_pipeline.sae.checkpoint import weights_path

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # a run directory while its run is in progress
REPORT_FILE = "quality_report.json"  # written last, just before the directory is renamed to its run id
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids


@dataclass(frozen=True)
class RunDir:
    run_id: str
    path: Path
    completed_at: float  # seconds since the epoch


def _completed_at(path: Path) -> float:
    report = path / REPORT_FILE
    try:
        return float(json.loads(report.read_text())["completed_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return (weights_path(path) or path).stat().st_mtime


def run_dirs(runs_dir: str | Path) -> list[RunDir]:
    """The complete run directories under `runs_dir`, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [RunDir(p.name, p, _completed_at(p)) for p in root.iterdir()
             if p.is_dir() and _RUN_ID.match(p.name) and weights_path(p) is not None]
    return sorted(found, key=lambda r: (r.completed_at, r.run_id), reverse=True)


def prune_runs(runs_dir: str | Path, keep_last: int, keep: Iterable[str | None] = (),
               index_uri: str | None = None) -> list[str]:
    """Delete the run directories under `runs_dir` other than the `keep_last` newest and the runs in `keep`
    (the registered champion), each after the feature sets built from it (in the LanceDB at `index_uri`, when
    given), so that no set is left pointing at a deleted checkpoint. Returns the removed run ids."""
    from freud_pipeline.features import store

    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the run just trained), not {keep_last}")
    runs = run_dirs(runs_dir)
    kept = {r.run_id for r in runs[:keep_last]} | {k for k in keep if k}
    removed = []
    for run in runs:
        if run.run_id in kept:
            continue
        if index_uri is not None:
            store.delete_sets_of_run(run.run_id, uri=index_uri)
        shutil.rmtree(run.path)
        objectstore.forget(run.path)  # on a cluster, the bucket's copy too
        removed.append(run.run_id)
        log.info("retention: removed SAE run %s (%s) and its feature sets", run.run_id, run.path)
    return removed
