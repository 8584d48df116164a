"""Feature effects in LanceDB (`features.effects` computes them): which features matter for the transcript.

Tables:
- `feature_effects`: one row per (computation, feature): set_id, build_id of the set when computed, sae_sha256,
  feature, delta_ce (nats per token, mean over its top clips) with its interval (ci_low, ci_high), n_clips,
  delta_wer (null where not measured), wer_clips, chance_delta_ce (the same ablation along a random direction,
  null unless the feature was one of the chance sample), the clips and their ΔCE, computed_at. Key
  `computation_id/feature`.
- `feature_effect_sets`: one pointer row per set naming its current `computation_id` and the previous one, with
  the set's chance level (mean ΔCE of random-direction ablations with its interval, and the 95th percentile of
  their |ΔCE|), what was computed and how.

Writing: every row of a new computation is added first (readers keep resolving the set to the old computation and
never see them), then the pointer row is upserted in one commit; the rows of older computations but the previous
one are deleted afterwards, so a reader that resolved the pointer just before the flip still finds its rows.
Rows and pointers of sets that no longer exist go at the same time. One writer at a time (the Dagster asset).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from freud_pipeline.errors import FeatureIndexError, FeatureSetError
from freud_pipeline.features.store import FEATURE_SETS, connect, open_or_create, sql_str, table_names

EFFECTS, EFFECT_SETS = "feature_effects", "feature_effect_sets"

EFFECTS_SCHEMA = pa.schema([
    ("key", pa.string()), ("computation_id", pa.string()), ("set_id", pa.string()), ("build_id", pa.string()),
    ("sae_sha256", pa.string()), ("feature", pa.int32()), ("delta_ce", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("n_clips", pa.int32()), ("delta_wer", pa.float64()), ("wer_clips", pa.int32()),
    ("chance_delta_ce", pa.float64()), ("clip_ids", pa.list_(pa.string())), ("clip_delta_ce", pa.list_(pa.float64())),
    ("computed_at", pa.timestamp("us", tz="UTC")),
])
EFFECT_SETS_SCHEMA = pa.schema([
    ("set_id", pa.string()), ("computation_id", pa.string()), ("previous_computation", pa.string()),
    ("build_id", pa.string()), ("sae_sha256", pa.string()), ("n_features", pa.int32()),
    ("clips_per_feature", pa.int32()), ("wer_features", pa.int32()), ("chance_delta_ce", pa.float64()),
    ("chance_ci_low", pa.float64()), ("chance_ci_high", pa.float64()), ("chance_abs_p95", pa.float64()),
    ("chance_n", pa.int32()), ("share_above_chance", pa.float64()), ("confidence", pa.float64()),
    ("baseline", pa.string()), ("chance_method", pa.string()), ("device", pa.string()), ("seconds", pa.float64()),
    ("computed_at", pa.timestamp("us", tz="UTC")),
])
ROW_FIELDS = ("feature", "delta_ce", "ci_low", "ci_high", "n_clips", "delta_wer", "wer_clips", "chance_delta_ce",
              "clip_ids", "clip_delta_ce", "build_id", "sae_sha256", "computed_at")


def _key(computation_id: str, feature: int) -> str:
    return f"{computation_id}/{int(feature)}"


def _finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def write_effects(set_row: dict, result: dict, uri: str | None = None) -> str:
    """Publish `features.effects.feature_effects`' result for the set of pointer row `set_row` (feature_sets).
    Returns the new computation_id."""
    from lancedb.index import BTree

    now = datetime.now(timezone.utc)
    computation_id = f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
    set_id = set_row["set_id"]
    rows = [{
        "key": _key(computation_id, r["feature"]), "computation_id": computation_id, "set_id": set_id,
        "build_id": set_row["build_id"], "sae_sha256": set_row.get("sae_sha256"), "feature": int(r["feature"]),
        "delta_ce": _finite(r["delta_ce"]), "ci_low": _finite(r["ci_low"]), "ci_high": _finite(r["ci_high"]),
        "n_clips": int(r["n_clips"]), "delta_wer": _finite(r.get("delta_wer")),
        "wer_clips": int(r.get("wer_clips") or 0),
        "chance_delta_ce": _finite(r.get("chance_delta_ce")), "clip_ids": list(r["clip_ids"]),
        "clip_delta_ce": [float(v) for v in r["clip_delta_ce"]], "computed_at": now,
    } for r in result["features"]]
    db = connect(uri)
    table = open_or_create(db, EFFECTS, EFFECTS_SCHEMA)
    if rows:
        table.add(pa.Table.from_pylist(rows, schema=EFFECTS_SCHEMA))
        table.create_index("key", config=BTree(), replace=True)
    pointers = open_or_create(db, EFFECT_SETS, EFFECT_SETS_SCHEMA)
    old = pointers.search().where(f"set_id = {sql_str(set_id)}").limit(1).to_list()
    chance = result.get("chance") or {}
    pointer = {
        "set_id": set_id, "computation_id": computation_id,
        "previous_computation": old[0]["computation_id"] if old else None, "build_id": set_row["build_id"],
        "sae_sha256": set_row.get("sae_sha256"), "n_features": len(rows),
        "clips_per_feature": result.get("clips_per_feature"), "wer_features": result.get("wer_features"),
        "chance_delta_ce": _finite(chance.get("delta_ce")), "chance_ci_low": _finite(chance.get("ci_low")),
        "chance_ci_high": _finite(chance.get("ci_high")), "chance_abs_p95": _finite(chance.get("abs_p95")),
        "chance_n": chance.get("n_features"), "share_above_chance": _finite(result.get("share_above_chance")),
        "confidence": result.get("confidence"), "baseline": result.get("baseline"),
        "chance_method": chance.get("method"), "device": result.get("device"),
        "seconds": _finite(result.get("seconds")), "computed_at": now,
    }
    # The flip: one commit. Readers resolving the set from here on get the new computation.
    pointers.merge_insert("set_id").when_matched_update_all().when_not_matched_insert_all().execute(
        pa.Table.from_pylist([pointer], schema=EFFECT_SETS_SCHEMA))
    keep = [computation_id] + ([old[0]["computation_id"]] if old else [])
    table.delete(f"set_id = {sql_str(set_id)} AND computation_id NOT IN ({', '.join(map(sql_str, keep))})")
    _drop_removed_sets(db)
    return computation_id


def _drop_removed_sets(db) -> None:
    """Effects of sets that are gone from feature_sets (the retention rule removed them): pointers first."""
    existing = {r["set_id"] for r in _sets(db)}
    pointers = db.open_table(EFFECT_SETS)
    gone = [r["set_id"] for r in pointers.search().select(["set_id"]).limit(None).to_list()
            if r["set_id"] not in existing]
    if gone:
        where = f"set_id IN ({', '.join(map(sql_str, gone))})"
        pointers.delete(where)
        db.open_table(EFFECTS).delete(where)


def _sets(db) -> list[dict]:
    if FEATURE_SETS not in table_names(db):
        return []
    return (db.open_table(FEATURE_SETS).search().select(["set_id", "n_features", "kind", "build_id", "sae_sha256"])
            .limit(None).to_list())


# ---------------------------------------------------------------- reading


def _checked_set(db, set_id: str, features: Sequence[int] = ()) -> dict:
    sets = {r["set_id"]: r for r in _sets(db)}
    if set_id not in sets:
        known = ", ".join(sorted(sets)) or "none yet"
        raise FeatureSetError(f"unknown feature set {set_id!r}; known sets: {known}")
    n = sets[set_id]["n_features"]
    for feature in features:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
            raise FeatureIndexError(f"feature index must be an integer, got {feature!r}")
        if not 0 <= feature < n:
            raise FeatureIndexError(f"feature {feature} is out of range for set {set_id!r}: valid indices are "
                                    f"0..{n - 1}")
    return sets[set_id]


def _pointer(db, set_id: str) -> dict | None:
    if EFFECT_SETS not in table_names(db):
        return None
    rows = db.open_table(EFFECT_SETS).search().where(f"set_id = {sql_str(set_id)}").limit(1).to_list()
    return rows[0] if rows else None


def effect_summary(set_id: str, uri: str | None = None) -> dict | None:
    """The set's current computation: its pointer row (chance level: chance_delta_ce, chance_ci_low/high,
    chance_abs_p95, chance_n; n_features, clips_per_feature, baseline, computed_at, ...) plus `current` (computed
    on the set's current build); None when no effects were computed. FeatureSetError for an unknown set."""
    db = connect(uri)
    set_row = _checked_set(db, set_id)
    row = _pointer(db, set_id)
    if row is None:
        return None
    return {**{k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()},
            "current": row["build_id"] == set_row["build_id"] and row["sae_sha256"] == set_row["sae_sha256"]}


def _rows(db, set_id: str, where: str | None) -> list[dict]:
    """The current computation's rows of the set (those matching `where`), re-resolving the pointer once when a
    rewrite removed the rows in between. [] when nothing was computed."""
    pointer = _pointer(db, set_id)
    for _attempt in range(2):
        if pointer is None:
            return []
        condition = f"computation_id = {sql_str(pointer['computation_id'])}" + (f" AND ({where})" if where else "")
        rows = db.open_table(EFFECTS).search().where(condition).limit(None).to_list()
        again = _pointer(db, set_id) if not rows else pointer  # none found: was the set rewritten meanwhile?
        if again is None or again["computation_id"] == pointer["computation_id"]:
            break
        pointer = again
    return [{k: (_finite(row[k]) if isinstance(row[k], float) else row[k]) for k in ROW_FIELDS} for row in rows]


def effects(set_id: str, features: Sequence[int] | None = None, uri: str | None = None) -> list[dict]:
    """The stored effect of each of `features` (default: every measured feature), by feature: {feature, delta_ce,
    ci_low, ci_high, n_clips, delta_wer, wer_clips, chance_delta_ce, clip_ids, clip_delta_ce, build_id, sae_sha256,
    computed_at}; features not measured are left out, [] when nothing was computed. FeatureSetError for an unknown
    set, FeatureIndexError for a feature outside it."""
    db = connect(uri)
    features = None if features is None else [int(f) if isinstance(f, np.integer) else f for f in features]
    _checked_set(db, set_id, features or ())
    where = None if features is None else (f"feature IN ({', '.join(str(int(f)) for f in features)})"
                                           if features else "feature < 0")
    return sorted(_rows(db, set_id, where), key=lambda r: r["feature"])


def features_by_effect(set_id: str, limit: int | None = 100, descending: bool = True,
                       uri: str | None = None) -> list[dict]:
    """The measured features ranked by ΔCE (largest first, or smallest with descending=False; ties by feature),
    the first `limit` (None: all), rows as `effects` returns them. [] when nothing was computed."""
    rows = [r for r in effects(set_id, uri=uri) if r["delta_ce"] is not None]
    rows.sort(key=lambda r: ((-r["delta_ce"]) if descending else r["delta_ce"], r["feature"]))
    return rows if limit is None else rows[: max(0, int(limit))]


def computation_ids(uri: str | None = None) -> tuple[str, ...]:
    """Every set's current computation id: changes when effects are (re)computed."""
    db = connect(uri)
    if EFFECT_SETS not in table_names(db):
        return ()
    rows = db.open_table(EFFECT_SETS).search().select(["computation_id"]).limit(None).to_arrow()
    return tuple(sorted(rows["computation_id"].to_pylist()))


__all__ = ["EFFECTS", "EFFECT_SETS", "computation_ids", "effect_summary", "effects", "features_by_effect",
           "write_effects"]
