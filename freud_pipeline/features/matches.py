"""Feature matches in LanceDB: counterparts of SAE features in other SAEs, and seed-stability summaries.

Tables:
- `feature_matches`: one row per (match, feature of A, rank): set_a, feature, set_b, counterpart, cosine, rank,
  kind. kind "cross": the `top` closest features of B by decoder cosine (rank 1 = closest; not one-to-one), for
  every pair of indexed SAE sets of the same model and width (`build_counterparts`). kind "seed": the optimal
  one-to-one assignment (rank 0) between two training runs of one recipe with different seeds; their "sets" are
  named `run:<MLflow run id>` (seed runs are not indexed). Key `match_id/feature`.
- `feature_match_pairs`: one pointer row per ordered pair (set_a, set_b) naming its current `match_id` and the
  builds of both sets it was computed from.
- `seed_stability`: one row per pair of seeds of a seed-stability study (the `sae_seed_stability` asset): share
  of features with a counterpart at or above each threshold, the same for two random dictionaries of the same
  shapes (chance), mean cosines, the runs and the study's MLflow run.

Writing a pair's matches: its rows are added under a new match_id (readers keep resolving the pair to the old
one and never see them), then the pointer row is upserted in one commit, then the old match_id's rows are
deleted. A reader that resolved the old pointer just before the flip may find its rows gone: it re-reads the
pointers once (as `FeatureIndex` does with builds). One writer at a time (the Dagster asset's pool).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from freud_pipeline.errors import FeatureIndexError, FeatureSetError
from freud_pipeline.features.store import FEATURE_SETS, connect, open_or_create, read_vectors, sql_str, table_names

log = logging.getLogger(__name__)

MATCHES, MATCH_PAIRS, SEED_STABILITY = "feature_matches", "feature_match_pairs", "seed_stability"
RUN_PREFIX = "run:"  # the "set" of a seed run's dictionary
STUDY_KIND_TAG, STUDY_KIND = "freud.kind", "seed_stability"  # the tag of a study's MLflow parent run
KINDS = ("seed", "cross")

MATCHES_SCHEMA = pa.schema([
    ("key", pa.string()), ("match_id", pa.string()), ("set_a", pa.string()), ("feature", pa.int32()),
    ("set_b", pa.string()), ("counterpart", pa.int32()), ("cosine", pa.float32()), ("rank", pa.int32()),
    ("kind", pa.string()),
])
PAIRS_SCHEMA = pa.schema([
    ("set_a", pa.string()), ("set_b", pa.string()), ("kind", pa.string()), ("match_id", pa.string()),
    ("build_a", pa.string()), ("build_b", pa.string()), ("n_features", pa.int32()), ("top", pa.int32()),
    ("mean_cosine", pa.float32()), ("created_at", pa.timestamp("us", tz="UTC")),
])
SEED_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("model", pa.string()),
    ("hook", pa.string()), ("architecture", pa.string()), ("n_latents", pa.int32()), ("d_in", pa.int32()),
    ("steps", pa.int32()), ("seed_a", pa.int64()), ("seed_b", pa.int64()), ("run_a", pa.string()),
    ("run_b", pa.string()), ("thresholds", pa.list_(pa.float64())), ("share_matched", pa.list_(pa.float64())),
    ("chance", pa.list_(pa.float64())), ("mean_cosine", pa.float64()), ("chance_mean_cosine", pa.float64()),
    ("mlflow_run_id", pa.string()), ("experiment_id", pa.string()), ("recipe", pa.string()),
])


def run_set(run_id: str) -> str:
    """The name a seed run's dictionary goes by in `feature_matches`."""
    return RUN_PREFIX + run_id


def _key(match_id: str, feature: int) -> str:
    return f"{match_id}/{int(feature)}"


# ---------------------------------------------------------------- writing


def write_matches(set_a: str, set_b: str, counterpart: np.ndarray, cosine: np.ndarray, *, kind: str,
                  build_a: str | None = None, build_b: str | None = None, one_to_one: bool = False,
                  uri: str | None = None) -> str:
    """Publish the matches of A's features in B: `counterpart`/`cosine` [n_a] (one-to-one, rank 0) or [n_a, top]
    (closest first, ranks 1..top); -1 counterparts are left out. Returns the new match_id."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    counterpart, cosine = np.asarray(counterpart), np.asarray(cosine, np.float32)
    if counterpart.ndim == 1:
        counterpart, cosine = counterpart[:, None], cosine[:, None]
    n, top = counterpart.shape
    features = np.repeat(np.arange(n, dtype=np.int32), top)
    ranks = np.tile(np.arange(top, dtype=np.int32) + (0 if one_to_one else 1), n)
    keep = counterpart.ravel() >= 0
    match_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
    db = connect(uri)
    rows = open_or_create(db, MATCHES, MATCHES_SCHEMA)
    rows.add(pa.table({
        "key": [_key(match_id, f) for f in features[keep]], "match_id": [match_id] * int(keep.sum()),
        "set_a": [set_a] * int(keep.sum()), "feature": features[keep], "set_b": [set_b] * int(keep.sum()),
        "counterpart": counterpart.ravel()[keep].astype(np.int32), "cosine": cosine.ravel()[keep],
        "rank": ranks[keep], "kind": [kind] * int(keep.sum()),
    }, schema=MATCHES_SCHEMA))
    rows.create_index("key", config=_btree(), replace=True)
    pairs = open_or_create(db, MATCH_PAIRS, PAIRS_SCHEMA)
    old = pairs.search().where(_pair_filter(set_a, set_b)).limit(None).to_list()
    closest = cosine[:, 0][counterpart[:, 0] >= 0]
    pairs.merge_insert(["set_a", "set_b"]).when_matched_update_all().when_not_matched_insert_all().execute(
        pa.Table.from_pylist([{
            "set_a": set_a, "set_b": set_b, "kind": kind, "match_id": match_id, "build_a": build_a,
            "build_b": build_b, "n_features": n, "top": top,
            "mean_cosine": float(closest.mean()) if closest.size else None,
            "created_at": datetime.now(timezone.utc)}], schema=PAIRS_SCHEMA))
    if old:  # the flip is done: the previous rows of this pair go
        rows.delete(f"match_id IN ({', '.join(sql_str(r['match_id']) for r in old)})")
    return match_id


def _btree():
    from lancedb.index import BTree

    return BTree()


def _pair_filter(set_a: str, set_b: str) -> str:
    return f"set_a = {sql_str(set_a)} AND set_b = {sql_str(set_b)}"


def delete_pairs(pairs: Iterable[tuple[str, str]], uri: str | None = None) -> int:
    """Remove the matches of the given (set_a, set_b) pairs, pointer rows first. Returns how many went."""
    db = connect(uri)
    if MATCH_PAIRS not in table_names(db):
        return 0
    table, removed = db.open_table(MATCH_PAIRS), 0
    for set_a, set_b in pairs:
        rows = table.search().where(_pair_filter(set_a, set_b)).limit(None).to_list()
        if not rows:
            continue
        table.delete(_pair_filter(set_a, set_b))
        db.open_table(MATCHES).delete(f"match_id IN ({', '.join(sql_str(r['match_id']) for r in rows)})")
        removed += 1
    return removed


def pair_rows(uri: str | None = None, kind: str | None = None) -> list[dict]:
    """The pointer rows of every stored pair (of one kind)."""
    db = connect(uri)
    if MATCH_PAIRS not in table_names(db):
        return []
    query = db.open_table(MATCH_PAIRS).search()
    if kind is not None:
        query = query.where(f"kind = {sql_str(kind)}")
    return query.limit(None).to_list()


# ---------------------------------------------------------------- counterparts across indexed SAE sets


def sae_sets(uri: str | None = None) -> list[dict]:
    """The pointer rows (feature_sets) of every indexed SAE set."""
    db = connect(uri)
    if FEATURE_SETS not in table_names(db):
        return []
    return db.open_table(FEATURE_SETS).search().where("kind = 'sae'").limit(None).to_list()


def build_counterparts(uri: str | None = None, top: int = 3, force: bool = False) -> dict[str, Any]:
    """For every ordered pair of indexed SAE sets of the same model and width, each feature's `top` closest
    features of the other set by decoder cosine (the sets' `vectors_<build>` tables), written as kind "cross".
    A pair whose stored matches were computed from the sets' current builds is kept unless `force`; pairs of
    sets that no longer exist are removed. Returns {pairs: [...], skipped, removed, seconds}."""
    from freud_pipeline.sae.matching import closest_counterparts

    started = time.perf_counter()
    sets = {row["set_id"]: row for row in sae_sets(uri)}
    current = {(r["set_a"], r["set_b"]): r for r in pair_rows(uri, "cross")}
    gone = [pair for pair in current if pair[0] not in sets or pair[1] not in sets]
    removed = delete_pairs(gone, uri)
    vectors: dict[str, np.ndarray] = {}

    def directions(row: dict) -> np.ndarray:
        if row["set_id"] not in vectors:
            vectors[row["set_id"]] = read_vectors(row["vectors_table"], uri)
        return vectors[row["set_id"]]

    written, skipped = [], 0
    for a in sorted(sets):
        for b in sorted(sets):
            row_a, row_b = sets[a], sets[b]
            if a == b or row_a["model"] != row_b["model"]:
                continue
            stored = current.get((a, b))
            if not force and stored is not None and (stored["build_a"], stored["build_b"]) == \
                    (row_a["build_id"], row_b["build_id"]):
                skipped += 1
                continue
            dec_a, dec_b = directions(row_a), directions(row_b)
            if dec_a.shape[1] != dec_b.shape[1]:
                continue
            indices, cosines = closest_counterparts(dec_a, dec_b, top=top)
            write_matches(a, b, indices, cosines, kind="cross", build_a=row_a["build_id"], build_b=row_b["build_id"],
                          uri=uri)
            written.append({"set_a": a, "set_b": b, "n_features": int(len(indices)),
                            "mean_closest_cosine": float(cosines[:, 0].mean()),
                            "share_closest_ge_0.7": float((cosines[:, 0] >= 0.7).mean())})
    return {"pairs": written, "skipped": skipped, "removed": removed, "n_sets": len(sets),
            "seconds": time.perf_counter() - started}


def check_counterparts(uri: str | None = None) -> list[str]:
    """Problems with the stored cross-SAE counterparts: a pair naming a set that does not exist, a pair without
    rows, or a counterpart index outside its set's range. Empty when all is well."""
    db = connect(uri)
    sets = {row["set_id"]: row for row in sae_sets(uri)}
    problems = []
    for pair in pair_rows(uri, "cross"):
        missing = [s for s in (pair["set_a"], pair["set_b"]) if s not in sets]
        if missing:
            problems.append(f"{pair['set_a']} -> {pair['set_b']}: no feature set {', '.join(missing)}")
            continue
        rows = (db.open_table(MATCHES).search().where(f"match_id = {sql_str(pair['match_id'])}")
                .select(["feature", "counterpart"]).limit(None).to_arrow())
        if rows.num_rows == 0:
            problems.append(f"{pair['set_a']} -> {pair['set_b']}: no rows for match {pair['match_id']}")
            continue
        n_b = sets[pair["set_b"]]["n_features"]
        bad = int(((rows["counterpart"].to_numpy() < 0) | (rows["counterpart"].to_numpy() >= n_b)).sum())
        if bad:
            problems.append(f"{pair['set_a']} -> {pair['set_b']}: {bad} counterpart(s) outside 0..{n_b - 1}")
    return problems


def counterparts(set_id: str, feature: int, uri: str | None = None, kind: str = "cross") -> list[dict]:
    """A feature's closest counterparts in the other indexed SAE sets: [{set_id, index, cosine, rank}], grouped by
    set (sets in name order), closest first. FeatureSetError for an unknown set, FeatureIndexError for a feature
    outside it; [] when no counterparts were computed for it (one SAE set only, or not yet)."""
    if kind == "cross":
        sets = {row["set_id"]: row for row in _all_sets(uri)}
        if set_id not in sets:
            known = ", ".join(sorted(sets)) or "none yet"
            raise FeatureSetError(f"unknown feature set {set_id!r}; known sets: {known}")
        n = sets[set_id]["n_features"]
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
            raise FeatureIndexError(f"feature index must be an integer, got {feature!r}")
        if not 0 <= feature < n:
            raise FeatureIndexError(f"feature {feature} is out of range for set {set_id!r}: valid indices are "
                                    f"0..{n - 1}")
    else:
        sets = None
    for attempt in range(2):
        pairs = [p for p in pair_rows(uri, kind) if p["set_a"] == set_id
                 and (sets is None or p["set_b"] in sets)]
        if not pairs:
            return []
        db = connect(uri)
        keys = ", ".join(sql_str(_key(p["match_id"], feature)) for p in pairs)
        rows = (db.open_table(MATCHES).search().where(f"key IN ({keys})")
                .select(["match_id", "set_b", "counterpart", "cosine", "rank"]).limit(None).to_list())
        if {r["match_id"] for r in rows} >= {p["match_id"] for p in pairs} or attempt:
            break  # else a pair was rewritten between reading its pointer and its rows: read again
    rows.sort(key=lambda r: (r["set_b"], r["rank"]))
    return [{"set_id": r["set_b"], "index": int(r["counterpart"]), "cosine": float(r["cosine"]),
             "rank": int(r["rank"])} for r in rows]


def _all_sets(uri: str | None) -> list[dict]:
    db = connect(uri)
    if FEATURE_SETS not in table_names(db):
        return []
    return db.open_table(FEATURE_SETS).search().select(["set_id", "n_features", "kind"]).limit(None).to_list()


# ---------------------------------------------------------------- seed stability


def write_seed_stability(rows: list[dict], uri: str | None = None) -> None:
    """Append a study's rows (one per pair of seeds; fields of SEED_SCHEMA, `recipe` a dict)."""
    now = datetime.now(timezone.utc)
    records = [{**{name: None for name in SEED_SCHEMA.names}, "created_at": now, **row,
                "recipe": json.dumps(row.get("recipe") or {}, sort_keys=True, default=str)} for row in rows]
    open_or_create(connect(uri), SEED_STABILITY, SEED_SCHEMA).add(pa.Table.from_pylist(records, schema=SEED_SCHEMA))


def seed_stability(uri: str | None = None) -> list[dict]:
    """Every recorded pair of seeds, newest study first: the row's fields with `recipe` parsed and `curve`:
    [{threshold, share_matched, chance}] ([] when nothing was recorded)."""
    db = connect(uri)
    if SEED_STABILITY not in table_names(db):
        return []
    rows = db.open_table(SEED_STABILITY).search().limit(None).to_list()
    out = []
    for row in sorted(rows, key=lambda r: (r["seed_a"], r["seed_b"])):
        row["recipe"] = json.loads(row["recipe"] or "{}")
        row["curve"] = [{"threshold": t, "share_matched": s, "chance": c}
                        for t, s, c in zip(row["thresholds"], row["share_matched"], row["chance"])]
        out.append(row)
    out.sort(key=lambda r: r["created_at"], reverse=True)  # stable: pairs of a study stay in seed order
    return out


__all__ = ["KINDS", "MATCHES", "MATCH_PAIRS", "SEED_STABILITY", "STUDY_KIND", "STUDY_KIND_TAG", "build_counterparts",
           "check_counterparts", "counterparts", "delete_pairs", "pair_rows", "run_set", "sae_sets", "seed_stability",
           "write_matches", "write_seed_stability"]
