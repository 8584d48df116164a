"""What a feature set covers: the dataset partitions its statistics and examples were mined from.

A coverage is a JSON-able dict stored with each build of a set (`feature_sets.coverage`):

    {"partitions": [{"dataset": "default_corpus", "partition": "train", "n_clips": 494, "hours": 0.36,
                     "added_at": "2026-12-06T14:20:00+00:00", ...extra such as "batch", "arrived_at"}, ...],
     "datasets": ["default_corpus", "incoming_audio"], "n_clips": 610, "hours": 0.44,
     "updated_at": "2026-12-06T14:20:00+00:00"}

A full build records every partition it read; a merge appends the partitions it added (`extended`). Hours are
real audio: encoder frames x 20 ms.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable

from freud_pipeline.frames import FRAME_SECONDS


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def partition_entry(dataset: str, partition: str, n_clips: int, n_frames: int, **extra: Any) -> dict[str, Any]:
    """One covered partition: its clip count and hours of audio (from its real frames)."""
    return {"dataset": str(dataset), "partition": str(partition), "n_clips": int(n_clips),
            "hours": round(n_frames * FRAME_SECONDS / 3600, 4), "added_at": now_iso(), **extra}


def extended(coverage: dict[str, Any] | None, entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`coverage` with `entries` added (an entry for a partition already covered replaces it) and the totals
    recomputed. None or {} starts an empty coverage."""
    partitions = {(p["dataset"], p["partition"]): p for p in (coverage or {}).get("partitions", [])}
    for entry in entries:
        partitions[(entry["dataset"], entry["partition"])] = entry
    rows = list(partitions.values())
    return {"partitions": rows, "datasets": sorted({p["dataset"] for p in rows}),
            "n_clips": sum(p["n_clips"] for p in rows), "hours": round(sum(p["hours"] for p in rows), 4),
            "updated_at": now_iso()}


def covers(coverage: dict[str, Any] | None, dataset: str, partition: str) -> bool:
    return any(p["dataset"] == dataset and p["partition"] == partition for p in (coverage or {}).get("partitions", []))


def describe(coverage: dict[str, Any] | None) -> str:
    """One line for a set card or a table: '610 clips, 0.44 h: default_corpus (dev, test, train), incoming_audio
    (2 batches)'."""
    if not coverage or not coverage.get("partitions"):
        return "coverage not recorded (built before coverage was kept)"
    by_dataset: dict[str, list[str]] = {}
    for p in coverage["partitions"]:
        by_dataset.setdefault(p["dataset"], []).append(p["partition"])
    parts = [f"{name} ({len(keys)} batches)" if name == "incoming_audio" and len(keys) > 3 else
             f"{name} ({', '.join(sorted(keys))})" for name, keys in sorted(by_dataset.items())]
    return f"{coverage['n_clips']} clips, {coverage['hours']:.2f} h: {'; '.join(parts)}"
