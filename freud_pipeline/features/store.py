"""LanceDB layout of feature sets, and the writer that publishes a set without disturbing readers.

Tables (all sets share them; rows carry the build that wrote them):
- `feature_sets`: one pointer row per set_id naming its current `build_id`, plus metadata; an SAE set names the
  training run (`sae_run_id`), its checkpoint directory and the weights' sha256 (`sae_sha256`; null in rows
  written before it existed).
- `features`: one row per (build, feature): statistics, per-clip-max histogram, labels with their quality
  (`LABEL_QUALITY`: kind, precision, lift, Bonferroni p, base rate, peaks, held-out precision; see
  `features.labels`). Key `build_id/index`.
- `examples`: one row per (build, feature, sign) with the ranked examples as list columns (rank = position),
  so `top_examples` is a single indexed row lookup. Key `build_id/index/sign`.
- `vectors_<hash of build_id>`: one table per build, (index, unit-length vector, label): SAE decoder
  directions, or neuron activation signatures. Separate tables because vector widths differ between sets
  and each set needs its own ANN index; IVF_FLAT once a set has >= 10,000 features, exact search below.
- `clips`: manifest rows (upserted by clip_id), with a full-text index on transcript, and the provenance of clips
  that arrived later (dataset, batch, arrival time).

Merging (`features.build.merge_into_feature_set`): each build also saves the small state a merge continues from
(the miner's accumulators and the label collector's, no traces: those are the `examples` rows) as one safetensors
file under `<index>/../index_state/` (written to a temporary name, renamed, its sha256 in the pointer row and
verified on load; states saved before are .npz and still read), and its `coverage` (`features.coverage`).

Examples carried over: a merge rewrites the `examples` rows of the lists (feature and sign) that took a new clip
and keeps the others' rows where an earlier build wrote them. The pointer row's `example_builds` names those builds
(oldest first, at most MAX_EXAMPLE_BUILDS: beyond that a merge rewrites every row), and a list's row is the one in
the newest of them that holds a row for it (`example_rows`): each of these builds is an ancestor of the current one
and rewrote exactly the lists that changed then. Rows of older builds stay while a kept build
names them.

Traces by reference: a row a merge rewrites stores the traces of its new clips only. Each entry names the build
whose row (same feature and sign) holds its trace and the position there (`trace_builds`, `trace_slots`; the row's
own build for the new clips; both null in a row that holds every trace itself, at its rank). Those builds are in the
chain, whose rows are kept whole; readers resolve the traces (`newest_rows`), so a merge never reads traces back.
The merge state keeps where each entry's trace is (`build.STATE_REFS`).

Publishing: every row of a build is written first (readers keep resolving the set to the old build_id and
never see them), then the pointer row is upserted in one commit. The previous build is kept so a reader that
resolved the pointer just before the flip still finds its rows; older builds are deleted afterwards. One
writer per set_id at a time (Dagster runs an asset once at a time).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import logging
import mmap
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import lancedb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import FTS, BTree, Bitmap, IvfFlat

from freud_pipeline import objectstore
from freud_pipeline.digests import file_sha256
from freud_pipeline.features import state_file
from freud_pipeline.features.labels import LabelResult
from freud_pipeline.features.mining import MiningResult
from freud_pipeline.frames import FRAME_SECONDS
from freud_pipeline.settings import lancedb_uri

log = logging.getLogger(__name__)

FEATURE_SETS, FEATURES, EXAMPLES, CLIPS = "feature_sets", "features", "examples", "clips"
VECTOR_INDEX_MIN_ROWS = 10_000
KINDS = ("neuron", "sae")
MAX_EXAMPLE_BUILDS = 8
# Rows a scalar or full-text index may leave unindexed: LanceDB scans them beside the index, as quickly as a lookup
# in tables this small, so a write re-indexes a table only once this many rows have been added since (`_refresh_index`).
INDEX_SLACK_ROWS = 20_000
SIGNS = ("+", "-")

FEATURE_SETS_SCHEMA = pa.schema([
    ("set_id", pa.string()), ("build_id", pa.string()), ("model", pa.string()), ("hook", pa.string()),
    ("kind", pa.string()), ("n_features", pa.int32()), ("sae_run_id", pa.string()),
    ("sae_checkpoint", pa.string()), ("shard_dir", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
    ("n_clips", pa.int64()), ("n_frames", pa.int64()), ("top_k", pa.int32()), ("fire_threshold", pa.float32()),
    ("quantile_levels", pa.list_(pa.float64())), ("vectors_table", pa.string()), ("vector_kind", pa.string()),
    ("label_summary", pa.string()), ("previous_builds", pa.list_(pa.string())), ("sae_sha256", pa.string()),
    # What the build covers (features.coverage, JSON) and the state a merge continues from (`save_state`).
    ("coverage", pa.string()), ("merge_state", pa.string()), ("merge_state_sha256", pa.string()),
    # The builds whose `examples` rows this build reads, oldest first (null: its own only). See "Examples carried
    # over" above.
    ("example_builds", pa.list_(pa.string())),
])
FEATURES_SCHEMA = pa.schema([
    ("key", pa.string()), ("build_id", pa.string()), ("set_id", pa.string()), ("index", pa.int32()),
    ("density", pa.float32()), ("mean", pa.float32()), ("max", pa.float32()), ("min", pa.float32()),
    ("quantiles", pa.list_(pa.float32())), ("hist_counts", pa.list_(pa.int64())),
    ("hist_edges", pa.list_(pa.float64())), ("label", pa.string()), ("label_kind", pa.string()),
    ("label_precision", pa.float32()), ("label_recall", pa.float32()), ("label_f1", pa.float32()),
    ("word_label", pa.string()), ("word_precision", pa.float32()),
    ("n_top", pa.int32()), ("n_bottom", pa.int32()),
    # Label quality (features.labels); tables written before them get them, null in old rows, on their next write.
    ("label_reason", pa.string()), ("label_lift", pa.float32()), ("label_p_value", pa.float64()),
    ("label_base_rate", pa.float32()), ("label_n_peaks", pa.int32()), ("label_heldout_precision", pa.float32()),
    ("label_heldout_n", pa.int32()),
    # Examples across activation levels (mining.LevelSample), strongest first: no traces, a clip id, its peak and
    # the peak's frame (null in rows written before them).
    ("typical_clip_ids", pa.list_(pa.string())), ("typical_values", pa.list_(pa.float32())),
    ("typical_peak_frames", pa.list_(pa.int32())),
])
LABEL_QUALITY = ("label_kind", "label_precision", "label_lift", "label_p_value", "label_base_rate", "label_n_peaks",
                 "label_heldout_precision", "label_heldout_n", "label_reason")
EXAMPLES_SCHEMA = pa.schema([
    ("key", pa.string()), ("build_id", pa.string()), ("set_id", pa.string()), ("feature", pa.int32()),
    ("sign", pa.string()), ("clip_ids", pa.list_(pa.string())), ("values", pa.list_(pa.float32())),
    ("peak_frames", pa.list_(pa.int32())), ("trace_offsets", pa.list_(pa.int32())),
    ("traces", pa.list_(pa.list_(pa.float16()))),
    # Traces by reference (see above): per entry, the build whose row holds its trace and its position there.
    ("trace_builds", pa.list_(pa.string())), ("trace_slots", pa.list_(pa.int32())),
])
CLIPS_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("path", pa.string()), ("duration_s", pa.float64()), ("sample_rate", pa.int32()),
    ("transcript", pa.string()), ("speaker", pa.string()), ("source", pa.string()), ("split", pa.string()),
    # Provenance of clips that arrived later: the dataset, the incoming batch and when it was recorded.
    ("dataset", pa.string()), ("batch", pa.string()), ("arrived_at", pa.string()),
])


def connect(uri: str | None = None, **kwargs) -> lancedb.DBConnection:
    uri = uri or lancedb_uri()
    if objectstore.is_remote(uri):
        objectstore.configure_environment()  # an S3-compatible endpoint other than AWS, from FREUD_S3_ENDPOINT_URL
    return lancedb.connect(uri, **kwargs)


def sql_str(value: str) -> str:
    """A string literal for a LanceDB filter."""
    return "'" + str(value).replace("'", "''") + "'"


def feature_key(build_id: str, index: int) -> str:
    return f"{build_id}/{index}"


def example_key(build_id: str, index: int, sign: str) -> str:
    return f"{build_id}/{index}/{sign}"


def vectors_table_name(build_id: str) -> str:
    return "vectors_" + hashlib.sha1(build_id.encode()).hexdigest()[:20]


def new_build_id(set_id: str) -> str:
    # Sorts by time within a set: older orphans (crashed builds) are found by comparison.
    return f"{set_id}@{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}"


def table_names(db) -> set[str]:
    return set(db.list_tables(limit=None).tables) if hasattr(db, "list_tables") else set(db.table_names())


def open_or_create(db, name: str, schema: pa.Schema):
    try:
        return db.open_table(name)  # one call, not a listing of every table first
    except ValueError:  # "Table ... was not found"
        return db.create_table(name, schema=schema, exist_ok=True)


def _with_new_columns(table, schema: pa.Schema):
    """A table written by an older version gets the columns added since (null in its old rows)."""
    present = set(table.schema.names)
    missing = [field for field in schema if field.name not in present]
    if missing:
        table.add_columns(missing)
    return table


# ---------------------------------------------------------------- rows


def _feature_rows(build_id: str, set_id: str, mining: MiningResult, labels: LabelResult | None,
                  n_top: np.ndarray, n_bottom: np.ndarray) -> pa.Table:
    n = mining.n_features
    counts, count_offsets, edges, edge_offsets = mining.peak_histograms()
    none = [None] * n
    nan = np.full(n, np.nan, np.float32)
    return pa.table({
        "key": [feature_key(build_id, i) for i in range(n)],
        "build_id": [build_id] * n,
        "set_id": [set_id] * n,
        "index": pa.array(np.arange(n, dtype=np.int32)),
        "density": mining.density, "mean": mining.mean, "max": mining.max, "min": mining.min,
        "quantiles": pa.FixedSizeListArray.from_arrays(pa.array(mining.quantiles.ravel()),
                                                       mining.quantiles.shape[1]).cast(pa.list_(pa.float32())),
        "hist_counts": pa.ListArray.from_arrays(pa.array(count_offsets, pa.int32()), pa.array(counts, pa.int64())),
        "hist_edges": pa.ListArray.from_arrays(pa.array(edge_offsets, pa.int32()), pa.array(edges, pa.float64())),
        "label": labels.label if labels else none,
        "label_kind": labels.kind if labels else none,
        "label_precision": labels.precision if labels else nan,
        "label_recall": labels.recall if labels else nan,
        "label_f1": labels.f1 if labels else nan,
        "word_label": labels.word_label if labels else none,
        "word_precision": labels.word_precision if labels else nan,
        "n_top": n_top.astype(np.int32), "n_bottom": n_bottom.astype(np.int32),
        "label_reason": labels.reason if labels else none,
        "label_lift": labels.lift if labels else nan,
        "label_p_value": labels.p_value if labels else nan.astype(np.float64),
        "label_base_rate": labels.base_rate if labels else nan,
        "label_n_peaks": labels.n_peaks if labels else pa.nulls(n, pa.int32()),
        "label_heldout_precision": labels.heldout_precision if labels else nan,
        "label_heldout_n": labels.heldout_n if labels else pa.nulls(n, pa.int32()),
        **_typical_columns(mining),
    }, schema=FEATURES_SCHEMA)


def _typical_columns(mining: MiningResult) -> dict[str, pa.Array]:
    n = mining.n_features
    if mining.state is None or mining.state.level_clip_index is None:
        return {"typical_clip_ids": pa.nulls(n, pa.list_(pa.string())),
                "typical_values": pa.nulls(n, pa.list_(pa.float32())),
                "typical_peak_frames": pa.nulls(n, pa.list_(pa.int32()))}
    clip, value, frame = mining.level_examples()
    valid = clip >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]), pa.int32())
    ids = pa.array(mining.clip_ids, pa.string()).take(pa.array(clip[valid]))  # by index, no Python string each
    return {"typical_clip_ids": pa.ListArray.from_arrays(offsets, ids),
            "typical_values": pa.ListArray.from_arrays(offsets, pa.array(value[valid].astype(np.float32))),
            "typical_peak_frames": pa.ListArray.from_arrays(offsets, pa.array(frame[valid].astype(np.int32)))}


def _kept_counts(lists, sign: str) -> np.ndarray:
    """Valid entries per feature; the bottom list only keeps strictly negative values (else it is noise)."""
    if sign == "+":
        return lists.count
    negative = (lists.values < 0) & (lists.clip_index >= 0)
    return np.minimum(lists.count, negative.sum(axis=1))


def _example_batches(build_id: str, set_id: str, clip_ids: list[str], lists: dict[str, Any],
                     features: dict[str, np.ndarray], batch: int,
                     refs: dict[str, tuple[list[str], np.ndarray, np.ndarray]] | None = None
                     ) -> Iterator[pa.RecordBatch]:
    """Rows of the ranked lists of each sign (`lists[sign]`: `ExampleLists` [n, K] whose row i is feature
    `features[sign][i]`). refs (a merge's rows): per sign, (chain, position [n, K] in chain of the build holding each
    entry's trace, or -1 for this row, slot [n, K] there), in rank order; only this row's own traces are written
    ("Traces by reference")."""
    clip_names = pa.array(clip_ids, pa.string())  # taken by index (no Python string per entry)
    for sign in SIGNS:
        signed, wanted = lists[sign], features[sign]
        for start in range(0, len(wanted), batch):
            stop = min(start + batch, len(wanted))
            rows = signed.rows(start, stop, traces=False)  # the traces written are gathered alone, below
            count = np.minimum(rows["count"], _kept_counts(signed, sign)[start:stop])
            k = rows["values"].shape[1]
            valid = np.arange(k)[None, :] < count[:, None]
            outer = pa.array(np.concatenate([[0], np.cumsum(count)]), pa.int32())
            lens = np.where(valid, rows["trace_len"], 0)
            ref_builds = ref_slots = pa.nulls(stop - start, pa.list_(pa.string()))
            if refs is not None:
                chain, where, slot = refs[sign]
                where, slot = where[start:stop], slot[start:stop]
                lens = np.where(where < 0, lens, 0)  # referenced traces stay where they are
                names = pa.array([*chain, build_id], pa.string())  # -1: this build
                ref_builds = pa.ListArray.from_arrays(
                    outer, names.take(pa.array(np.where(where < 0, len(chain), where)[valid])))
                own_slot = np.broadcast_to(np.arange(k), where.shape)
                ref_slots = pa.ListArray.from_arrays(
                    outer, pa.array(np.where(where < 0, own_slot, slot)[valid].astype(np.int32)))
            # The samples of every trace written, back to back in row, rank, frame order.
            f, r = np.nonzero(lens)
            held = signed.traces_at(start + f, r) if f.size else np.zeros((0, 0), np.float16)
            flat = held[np.arange(held.shape[1])[None, :] < lens[f, r][:, None]]
            inner = pa.array(np.concatenate([[0], np.cumsum(lens[valid])]), pa.int32())
            listed = lambda values: pa.ListArray.from_arrays(outer, pa.array(values))  # noqa: E731
            chunk = np.asarray(wanted[start:stop])
            yield pa.record_batch({
                "key": [example_key(build_id, i, sign) for i in chunk],
                "build_id": [build_id] * len(chunk),
                "set_id": [set_id] * len(chunk),
                "feature": pa.array(chunk.astype(np.int32)),
                "sign": [sign] * len(chunk),
                "clip_ids": pa.ListArray.from_arrays(outer, clip_names.take(pa.array(rows["clip_index"][valid]))),
                "values": listed(rows["values"][valid].astype(np.float32)),
                "peak_frames": listed(rows["peak_frame"][valid].astype(np.int32)),
                "trace_offsets": listed(rows["trace_offset"][valid].astype(np.int32)),
                "traces": pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, pa.array(flat))),
                "trace_builds": ref_builds,
                "trace_slots": ref_slots if refs is not None else pa.nulls(stop - start, pa.list_(pa.int32())),
            }, schema=EXAMPLES_SCHEMA)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # Zero rows stay zero: "dot" distance then reads 1 (similarity 0) instead of cosine's NaN.
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


def _write_vectors(db, name: str, vectors: np.ndarray, labels: list[str | None]) -> None:
    unit = _unit_rows(vectors)
    n, dim = unit.shape
    table = pa.table({
        "index": pa.array(np.arange(n, dtype=np.int32)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(unit.ravel()), dim),
        "label": labels,
    })
    tbl = db.create_table(name, data=table)  # a fresh name per build
    if n >= INDEX_SLACK_ROWS:
        tbl.create_index("index", config=BTree())
    if n >= VECTOR_INDEX_MIN_ROWS:
        # IVF_FLAT, not IVF_PQ: no PQ training (far quicker to build), answers well within the query target
        # (benchmarks/RESULTS.md) and keeps exact distances within the probed partitions.
        tbl.create_index("vector", config=IvfFlat(distance_type="dot", num_partitions=max(1, int(np.sqrt(n)))))


def beside(function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """function(*args) started in a thread of its own (for I/O and hashing, which release the GIL, beside the
    caller's work); the future's result() waits for it and raises what it raised."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=getattr(function, "__name__", "beside"))
    try:
        return pool.submit(function, *args)
    finally:
        pool.shutdown(wait=False)


def settle(*futures: concurrent.futures.Future | None) -> None:
    """Wait for these writes of a build that failed, ignoring their own errors (the first error is the one raised)."""
    for future in futures:
        if future is not None:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - the build failed already
                pass


def discard_rows(uri: str | None, build_id: str, db=None) -> None:
    """Remove what a build that will not be published wrote (its features and examples rows, its vectors table),
    as far as the index lets it: the build failed already, so an error here is only logged. Rows left behind are
    never pointed at, and a later build's `_delete_builds` removes their features rows."""
    try:
        db = db if db is not None else connect(uri)
        existing = table_names(db)
        for name in (FEATURES, EXAMPLES):
            if name in existing:
                db.open_table(name).delete(f"build_id = {sql_str(build_id)}")
        if vectors_table_name(build_id) in existing:
            db.drop_table(vectors_table_name(build_id))
    except Exception as exc:  # noqa: BLE001 - the build failed already; its error is the one raised
        log.warning("could not remove the rows of failed build %s: %s", build_id, exc)


def upsert_clips(db, manifest: pd.DataFrame) -> None:
    """Manifest rows into `clips` (insert or replace by clip_id), then refresh its indexes."""
    frame = manifest.copy()
    for column in CLIPS_SCHEMA.names:
        if column not in frame.columns:
            frame[column] = None
    frame = frame[CLIPS_SCHEMA.names]
    frame["clip_id"] = frame["clip_id"].astype(str)
    frame = frame.drop_duplicates("clip_id", keep="last")
    data = pa.Table.from_pandas(frame, schema=CLIPS_SCHEMA, preserve_index=False)
    with _clips_lock(db):
        tbl = _with_new_columns(open_or_create(db, CLIPS, CLIPS_SCHEMA), CLIPS_SCHEMA)
        tbl.merge_insert("clip_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        _refresh_index(tbl, "clip_id", BTree())
        try:
            _refresh_index(tbl, "transcript", FTS())
        except Exception as exc:  # FTS is native Lance (no tantivy) and works offline; query falls back to LIKE
            log.warning("no full-text index on clips.transcript (%s); search_clips will use LIKE", exc)


def upsert_clips_beside(uri: str | None, manifest: pd.DataFrame) -> concurrent.futures.Future:
    """`upsert_clips` in a thread, on a connection of its own: a merge starts it when its batch's first new clip
    arrives, so that LanceDB writes the rows (without the GIL) while the batch is mined. Pass the future as
    `write_feature_set(clips_beside=...)`, which waits for it before the flip."""
    return beside(lambda: upsert_clips(connect(uri), manifest))


def write_examples_beside(uri: str | None, build_id: str, set_id: str, clip_ids: list[str],
                          changed_examples: tuple[dict[str, np.ndarray], dict[str, Any], Any],
                          carried_from: dict[str, Any] | None, batch_features: int = 256) -> concurrent.futures.Future:
    """The `examples` rows a merge rewrites (`write_feature_set`'s changed_examples and carried_from, for build
    `build_id`) made here and written by LanceDB in a thread, on a connection of its own, while the labels are
    judged: they do not depend on them. (Made here, not in the thread: making them is Python work, which the
    thread would do only in turns with the caller's, holding the GIL.) Pass the future as
    `write_feature_set(examples_beside=...)` with the same changed_examples."""
    written, lists, refs = changed_examples
    rows = _example_rows(build_id, set_id, clip_ids, lists, written, batch_features, refs, _carried(carried_from))
    return beside(lambda: _write_examples(connect(uri), rows))


def _carried(carried_from: dict[str, Any] | None) -> list[str]:
    """The builds whose example rows a merged build reads (`example_builds` of the row it merged into)."""
    return example_builds(carried_from) if carried_from is not None else []


def _example_rows(build_id: str, set_id: str, clip_ids: list[str], lists: dict[str, Any],
                  written: dict[str, np.ndarray], batch_features: int, refs: Any, carried: list[str]):
    """A build's `examples` rows (`_example_batches`, `_buffered`; refs per sign as a merge gives them, positions in
    `carried`, or None), or None when it rewrites none."""
    if not any(len(features) for features in written.values()):
        return None
    chained = None if refs is None else {sign: (carried, *refs[sign]) for sign in SIGNS}
    return _buffered(EXAMPLES_SCHEMA, _example_batches(build_id, set_id, clip_ids, lists, written, batch_features,
                                                       chained))


def _write_examples(db, rows: pa.Table | pa.RecordBatchReader | None):
    """Append `_example_rows` to `examples`; returns the table."""
    examples = _with_new_columns(open_or_create(db, EXAMPLES, EXAMPLES_SCHEMA), EXAMPLES_SCHEMA)
    if rows is not None:
        examples.add(rows)
    return examples


@contextlib.contextmanager
def _clips_lock(db) -> Iterator[None]:
    """An exclusive lock for writing `clips`, for an index on a local disk (a file in `state_dir`). LanceDB's
    merge_insert does not keep two writers from inserting the same new key: two processes upserting the same 6 new
    ids 10 times each left 73 rows for 61 ids. The neuron and SAE sets of a batch are built or merged by steps that
    may run at once, each upserting the batch's clips. An index in object storage has no such lock: run those steps
    one at a time there."""
    uri = getattr(db, "uri", None)
    if uri is None or objectstore.is_remote(str(uri)):
        yield
        return
    folder = Path(state_dir(str(uri)))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".clips.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: excludes other threads of this process too
        yield


def _refresh_index(tbl, column: str, config) -> None:
    """Index `column` (default index name) if it has no index, and rebuild the index once INDEX_SLACK_ROWS rows are
    not in it. Queries stay exact either way: LanceDB answers from the index and scans the rows added since."""
    stats = tbl.index_stats(f"{column}_idx")
    if stats is None or stats.num_unindexed_rows >= INDEX_SLACK_ROWS:
        tbl.create_index(column, config=config, replace=True)


# ---------------------------------------------------------------- publishing


def write_feature_set(
    *,
    set_id: str,
    model: str,
    hook: str,
    kind: str,
    mining: MiningResult,
    labels: LabelResult | None = None,
    manifest: pd.DataFrame | None = None,
    vectors: np.ndarray | None = None,
    vector_kind: str = "signature",
    sae_run_id: str | None = None,
    sae_checkpoint: str | None = None,
    shard_dir: str | None = None,
    sae_sha256: str | None = None,
    uri: str | None = None,
    keep_builds: int = 2,
    batch_features: int = 256,
    coverage: dict[str, Any] | None = None,
    merge_state: dict[str, np.ndarray] | PendingState | None = None,
    changed_examples: tuple[dict[str, np.ndarray], dict[str, Any], Any] | None = None,
    carried_from: dict[str, Any] | None = None,
    vectors_table: str | None = None,
    clips_beside: concurrent.futures.Future | None = None,
    examples_beside: concurrent.futures.Future | None = None,
    db=None,
) -> dict[str, Any]:
    """Write a whole build of `set_id`, then point the set at it. Returns the new feature_sets row.
    coverage: what the build covers (`features.coverage`); merge_state: arrays a later merge continues from
    (`save_state`), or their save already under way (`save_state_beside`: the build takes its build_id). A merge
    passes `changed_examples` (per sign the features whose rows to write and their lists, row i
    being features[sign][i], and refs; `mining`'s own lists then need no traces; refs as `_example_batches` takes them,
    positions in the carried chain, or None when the lists hold every trace) and `carried_from` (the pointer row of
    the build the other features' rows come from: see "Examples carried over"), and may pass the `vectors_table` of
    that build to share when its vectors did not change (SAE decoder directions). clips_beside / examples_beside:
    those rows already being written in threads (`upsert_clips_beside`, `write_examples_beside` with the same
    changed_examples and carried_from): waited for before the flip instead of written here; a failure of either
    fails the build. db: a connection to `uri` to use (a merge's, opened when it read the set)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if mining.quantiles is None:
        raise ValueError("this MiningResult was made only to be merged (it has no statistics): write the result of "
                         "merge_mining instead")
    state_saved = merge_state if isinstance(merge_state, PendingState) else None
    build_id = state_saved.build_id if state_saved else new_build_id(set_id)
    published = False
    try:
        db = db if db is not None else connect(uri)
        if manifest is not None and len(manifest) and clips_beside is None:
            upsert_clips(db, manifest)
        # The state is written and hashed (both release the GIL) in a thread beside the build's rows, and is
        # complete before the flip; started after the clips' upsert, which it slowed from about 12 to 30-50 ms.
        if state_saved is None and merge_state is not None:
            state_saved = save_state_beside(uri, set_id, merge_state, build_id)

        n_top = _kept_counts(mining.top, "+")
        n_bottom = _kept_counts(mining.bottom, "-")
        features = _with_new_columns(open_or_create(db, FEATURES, FEATURES_SCHEMA), FEATURES_SCHEMA)
        features.add(_feature_rows(build_id, set_id, mining, labels, n_top, n_bottom))
        refs, carried = None, []
        if changed_examples is None:
            written = {sign: np.arange(mining.n_features) for sign in SIGNS}
            lists = {"+": mining.top, "-": mining.bottom}
            chain = [build_id]
        else:
            written, lists, refs = changed_examples
            carried = _carried(carried_from)
            any_written = any(len(features) for features in written.values())
            chain = [*carried, build_id] if any_written or not carried else carried
        if examples_beside is None:
            examples = _write_examples(db, _example_rows(build_id, set_id, mining.clip_ids, lists, written,
                                                         batch_features, refs, carried))
        else:
            examples_beside.result()
            examples = db.open_table(EXAMPLES)
        if vectors_table is None:
            vectors = mining.signature if vectors is None else vectors
            vectors_table = vectors_table_name(build_id)
            _write_vectors(db, vectors_table, vectors, labels.label if labels else [None] * mining.n_features)
        for tbl in (features, examples):
            _refresh_index(tbl, "key", BTree())
            _refresh_index(tbl, "build_id", Bitmap())

        if clips_beside is not None:
            clips_beside.result()
        state_path, state_sha256 = state_saved.result() if state_saved is not None else (None, None)
        sets = _with_new_columns(open_or_create(db, FEATURE_SETS, FEATURE_SETS_SCHEMA), FEATURE_SETS_SCHEMA)
        current = sets.search().where(f"set_id = {sql_str(set_id)}").limit(1).to_list()
        history = ([current[0]["build_id"]] + list(current[0]["previous_builds"] or [])) if current else []
        row = {
            "set_id": set_id, "build_id": build_id, "model": model, "hook": hook, "kind": kind,
            "n_features": mining.n_features, "sae_run_id": sae_run_id, "sae_checkpoint": sae_checkpoint,
            "shard_dir": shard_dir, "created_at": datetime.now(timezone.utc), "n_clips": mining.n_clips,
            "n_frames": mining.n_frames, "top_k": mining.top_k, "fire_threshold": mining.fire_threshold,
            "quantile_levels": list(mining.quantile_levels), "vectors_table": vectors_table,
            "vector_kind": vector_kind, "label_summary": json.dumps(labels.summary if labels else {}),
            "previous_builds": history[: keep_builds - 1], "sae_sha256": sae_sha256,
            "coverage": json.dumps(coverage) if coverage else None, "merge_state": state_path,
            "merge_state_sha256": state_sha256, "example_builds": chain,
        }
        # The flip: one commit. Readers resolving set_id from here on get the new build.
        sets.merge_insert("set_id").when_matched_update_all().when_not_matched_insert_all().execute(
            pa.Table.from_pylist([row], schema=FEATURE_SETS_SCHEMA))
        published = True
        kept = [build_id, *row["previous_builds"]]
        # Rows the previous build reads stay as long as a reader may have resolved it.
        previous = current[0] if current and current[0]["build_id"] in kept else None
        _delete_builds(db, set_id, keep=kept, newest=build_id,
                       keep_examples=set(chain) | (set(example_builds(previous)) if previous else set()),
                       keep_vectors={vectors_table, *([previous["vectors_table"]] if previous else [])})
        return row
    except BaseException:
        if not published:
            settle(clips_beside, examples_beside)  # no write of this build goes on after it failed
            discard_rows(uri, build_id, db)  # nor any row or file of it
            if state_saved is not None:
                state_saved.discard()
        raise


def _buffered(schema: pa.Schema, batches: Iterator[pa.RecordBatch],
              limit: int = 64 << 20) -> pa.Table | pa.RecordBatchReader:
    """The batches as one table when they come to at most `limit` bytes (a merge's few rows), else as a stream that
    LanceDB pulls batch by batch (a build's traces may not fit in memory). Batches made while LanceDB pulls them
    cost several times as long as made beforehand (about 70 ms against 25 ms for a merge's examples)."""
    held, size = [], 0
    for batch in batches:
        held.append(batch)
        size += batch.nbytes
        if size > limit:
            return pa.RecordBatchReader.from_batches(schema, itertools.chain(held, batches))
    return pa.Table.from_batches(held, schema=schema)


def example_builds(set_row: dict[str, Any]) -> list[str]:
    """The builds whose `examples` rows a pointer row's build reads, oldest first."""
    return list(set_row.get("example_builds") or [set_row["build_id"]])


def example_rows(set_row: dict[str, Any], where: str | None = None, columns: list[str] | None = None,
                 uri: str | None = None, db=None) -> pa.Table:
    """The `examples` rows of a pointer row's build (optionally filtered by `where`, e.g. on feature and sign),
    one per (feature, sign): of the rows its `example_builds` hold, the newest build's. Sorted by feature, sign."""
    db = db if db is not None else connect(uri)
    chain = example_builds(set_row)
    condition = f"build_id IN ({', '.join(map(sql_str, chain))})" + (f" AND ({where})" if where else "")
    table = db.open_table(EXAMPLES)
    wanted = [*(columns or [c for c in EXAMPLES_SCHEMA.names if c not in REF_COLUMNS]), "feature", "sign", "build_id"]
    if "traces" in wanted:
        wanted += ["clip_ids", *(c for c in REF_COLUMNS if c in table.schema.names)]
    rows = table.search().where(condition).select(list(dict.fromkeys(wanted))).limit(None).to_arrow()
    rows = newest_rows(rows, chain)
    return rows.select(columns) if columns else rows


REF_COLUMNS = ("trace_builds", "trace_slots")


def newest_rows(rows: pa.Table, chain: list[str]) -> pa.Table:
    """Of `rows` (examples rows of builds in `chain`, oldest first, with feature, sign and build_id), the newest
    one per (feature, sign), sorted by feature then sign. When they carry traces, each entry's trace is resolved
    from the row among `rows` that holds it ("Traces by reference": read every build of the chain for the features
    wanted, as `example_rows` does)."""
    key = rows["feature"].to_numpy().astype(np.int64) * 2 + (rows["sign"].to_numpy(zero_copy_only=False) == "-")
    if len(chain) > 1 and rows.num_rows:
        position = {b: i for i, b in enumerate(chain)}
        age = np.array([position[b] for b in rows["build_id"].to_pylist()])
        order = np.lexsort((-age, key))  # by (feature, sign), newest build first
        first = np.ones(len(order), bool)
        first[1:] = key[order][1:] != key[order][:-1]
        newest = rows.take(order[first])
    else:
        newest = rows.take(np.argsort(key, kind="stable"))
    if "traces" in rows.column_names and "trace_builds" in rows.column_names and newest.num_rows \
            and newest["trace_builds"].null_count < newest.num_rows:
        newest = newest.set_column(newest.schema.get_field_index("traces"), "traces",
                                   _resolved_traces(newest, rows, chain))
    return newest


def _resolved_traces(newest: pa.Table, pool: pa.Table, chain: list[str]) -> pa.Array:
    """The `traces` column of `newest` with every entry's trace taken from the row of `pool` that holds it."""
    pool_traces = pool["traces"].combine_chunks()
    pool_counts = pc.fill_null(pc.list_value_length(pool_traces), 0).to_numpy().astype(np.int64)
    found, slot, counts = _trace_sources(newest, pool, chain, pool_counts)
    taken = pc.list_flatten(pool_traces).take(pa.array(np.cumsum(pool_counts)[found] - pool_counts[found] + slot))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), taken)


def _trace_sources(newest: pa.Table, pool: pa.Table, chain: list[str], pool_counts: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry of `newest` (rows in order, entries in rank order): the row of `pool` that holds its trace and
    the position there, and the entries per row of `newest`. pool_counts: entries per row of `pool`. Raises
    StateError when a holder row or position does not exist."""
    n_features = int(pc.max(pool["feature"]).as_py()) + 1
    position = {b: i for i, b in enumerate(chain)}

    def feature_sign(table: pa.Table) -> np.ndarray:  # one int64 per (feature, sign)
        return table["feature"].to_numpy().astype(np.int64) * 2 + (table["sign"].to_numpy(zero_copy_only=False) == "-")

    def row_key(build: np.ndarray, feature_and_sign: np.ndarray) -> np.ndarray:  # one int64 per (build, feature, sign)
        return build * (2 * n_features) + feature_and_sign

    pool_key = row_key(np.array([position[b] for b in pool["build_id"].to_pylist()], np.int64), feature_sign(pool))
    counts = pc.list_value_length(newest["clip_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    row_of = np.repeat(np.arange(newest.num_rows), counts)  # one entry per stored example, in row order
    rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    own = np.array([position[b] for b in newest["build_id"].to_pylist()], np.int64)
    build, slot = own[row_of], rank
    referenced = pc.is_valid(newest["trace_builds"]).to_numpy(zero_copy_only=False)[row_of]
    named = pc.index_in(pc.list_flatten(newest["trace_builds"]), value_set=pa.array(chain, pa.string()))
    if named.null_count:
        raise StateError("an example's trace lies in a build outside the set's chain; rebuild the set")
    build[referenced] = named.to_numpy(zero_copy_only=False)
    slot[referenced] = pc.list_flatten(newest["trace_slots"]).to_numpy(zero_copy_only=False)
    entry_key = row_key(build, feature_sign(newest)[row_of])
    order = np.argsort(pool_key, kind="stable")
    found = order[np.minimum(np.searchsorted(pool_key, entry_key, sorter=order), len(order) - 1)]
    if not (pool_key[found] == entry_key).all() or not (slot < pool_counts[found]).all():
        raise StateError("an example's trace is missing from the build that should hold it; rebuild the set")
    return found, slot, counts


def broken_trace_references(set_row: dict[str, Any], db=None) -> list[str]:
    """Problems with the trace references of a pointer row's build (see "Traces by reference"): a holder row or
    position that does not exist, or a position holding another clip than the entry. Reads no traces."""
    db = db if db is not None else connect()
    chain = example_builds(set_row)
    table = db.open_table(EXAMPLES)
    if "trace_builds" not in table.schema.names:
        return []
    pool = table.search().where(f"build_id IN ({', '.join(map(sql_str, chain))})").select(
        ["feature", "sign", "build_id", "clip_ids", *REF_COLUMNS]).limit(None).to_arrow()
    newest = newest_rows(pool, chain)
    if not newest.num_rows or newest["trace_builds"].null_count == newest.num_rows:
        return []
    pool_clips = pool["clip_ids"].combine_chunks()
    pool_counts = pc.list_value_length(pool_clips).to_numpy(zero_copy_only=False).astype(np.int64)
    try:
        found, slot, _ = _trace_sources(newest, pool, chain, pool_counts)
    except StateError as exc:
        return [str(exc)]
    held = pc.list_flatten(pool_clips).take(pa.array(np.cumsum(pool_counts)[found] - pool_counts[found] + slot))
    wrong = int(pc.sum(pc.invert(pc.equal(held, pc.list_flatten(newest["clip_ids"])))).as_py() or 0)
    return [f"{wrong} example(s) name a trace of another clip; rebuild the set"] if wrong else []


def _delete_builds(db, set_id: str, keep: list[str], newest: str, keep_examples: set[str] = frozenset(),
                   keep_vectors: set[str] = frozenset()) -> None:
    """Drop builds of set_id older than `newest` that are not kept: retired ones and crashed writes. A build
    whose examples rows a kept build reads (`keep_examples`) loses its other rows only; vectors tables in
    `keep_vectors` stay."""
    def older(kept) -> str:
        return (f"set_id = {sql_str(set_id)} AND build_id < {sql_str(newest)} AND "
                f"build_id NOT IN ({', '.join(map(sql_str, kept))})")

    features = db.open_table(FEATURES)
    stale = set(features.search().where(older(keep)).select(["build_id"]).limit(None).to_pandas()["build_id"])
    if not stale:
        return
    features.delete(older(keep))
    db.open_table(EXAMPLES).delete(older([*keep, *keep_examples]))
    existing = table_names(db)
    for build_id in stale:
        if vectors_table_name(build_id) in existing and vectors_table_name(build_id) not in keep_vectors:
            db.drop_table(vectors_table_name(build_id))
        _delete_state(db, build_id)
    log.info("deleted %d retired build(s) of %s", len(stale), set_id)


def delete_sets_of_run(sae_run_id: str, uri: str | None = None) -> list[str]:
    """Delete every feature set built from SAE run `sae_run_id`, all its builds included (the retention rule of
    `freud_pipeline.sae.retention` calls this before it removes the run's checkpoint). The pointer rows go first,
    so readers stop resolving the sets before their rows disappear. Returns the deleted set ids."""
    db = connect(uri)
    if FEATURE_SETS not in table_names(db):
        return []
    sets = db.open_table(FEATURE_SETS)
    rows = sets.search().where(f"sae_run_id = {sql_str(sae_run_id)}").limit(None).to_list()
    if not rows:
        return []
    set_ids = [row["set_id"] for row in rows]
    in_sets = f"set_id IN ({', '.join(map(sql_str, set_ids))})"
    sets.delete(in_sets)
    existing = table_names(db)
    for name in (FEATURES, EXAMPLES):
        if name in existing:
            db.open_table(name).delete(in_sets)
    builds = {b for row in rows for b in [row["build_id"], *(row["previous_builds"] or [])]}
    for name in {*(vectors_table_name(b) for b in builds), *(row["vectors_table"] for row in rows)}:
        if name in existing:
            db.drop_table(name)
    for build_id in builds:
        _delete_state(db, build_id)
    log.info("deleted feature set(s) %s of SAE run %s", ", ".join(set_ids), sae_run_id)
    return set_ids


def peak_time_s(frame: int | np.ndarray) -> float | np.ndarray:
    """Centre of a 20 ms encoder frame."""
    return (np.asarray(frame) + 0.5) * FRAME_SECONDS


# ---------------------------------------------------------------- merge state and reading a build back


def state_dir(uri: str | None) -> str:
    """Where merge states live: beside the LanceDB directory (`index_state/`), in the same bucket for an index in
    object storage."""
    uri = str(uri or lancedb_uri()).rstrip("/")
    if objectstore.is_remote(uri):
        return uri.rsplit("/", 1)[0] + "/index_state"
    return str(Path(uri).parent / "index_state")


def _state_path(uri: str | None, build_id: str, suffix: str = ".safetensors") -> str:
    return f"{state_dir(uri)}/{vectors_table_name(build_id).removeprefix('vectors_')}{suffix}"


@dataclasses.dataclass(frozen=True)
class PendingState:
    """A build's merge state being saved in a thread (`save_state_beside`): the build's id at once, then (path,
    sha256) from `result()`. `discard()` removes the file of a build that will not be published."""

    uri: str | None
    build_id: str
    saving: concurrent.futures.Future

    def result(self) -> tuple[str, str]:
        return self.saving.result()

    def discard(self) -> None:
        try:
            self.saving.result()
        except Exception:  # noqa: BLE001 - the build failed already; only its file is to go
            pass
        _delete_state_file(self.uri, self.build_id)


def save_state_beside(uri: str | None, set_id: str, arrays: dict[str, np.ndarray],
                      build_id: str | None = None) -> PendingState:
    """Start saving the merge state of a new build of `set_id` (`save_state`) in a thread: a merge starts it as
    soon as the merged state exists, so that the file is written and hashed while the labels are computed and
    the rows written. Pass the result as `write_feature_set(merge_state=...)`."""
    build_id = build_id or new_build_id(set_id)
    return PendingState(uri, build_id, beside(save_state, uri, build_id, arrays))


def save_state(uri: str | None, build_id: str, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
    """Save a build's merge state as a safetensors file (`state_file`), under a temporary name, then rename it into
    place (an object store's PUT is atomic by itself). Returns (path or URI, sha256 of the file)."""
    path = _state_path(uri, build_id)
    if objectstore.is_remote(path):
        data = b"".join(state_file.encode(arrays))
        objectstore.write_uri(path, data)
        return path, hashlib.sha256(data).hexdigest()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{path}.{uuid.uuid4().hex[:8]}.partial")
    state_file.write(partial, arrays)
    digest = file_sha256(partial)
    os.replace(partial, path)
    return path, digest


def load_state(set_row: dict[str, Any]) -> dict[str, np.ndarray]:
    """The merge state of the build a pointer row names, verified against its recorded sha256 (a safetensors file,
    or the .npz of states saved before)."""
    arrays, verified = open_state(set_row)
    verified()
    return arrays


def open_state(set_row: dict[str, Any]) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
    """The merge state of the build a pointer row names, at once, and `verified`: call it before anything computed
    from the state is merged or published. Its sha256 is computed meanwhile in a thread (hashlib releases the GIL:
    on two cores a merge mines its batch while the state is hashed). The arrays are read-only until `verified()`
    returns, writable after it (a merge may update them); it raises StateError when the digest is not the recorded
    one, and so does this function when the file cannot be read or parsed and its digest is wrong.

    A local file is mapped copy-on-write, not read: its pages are already in memory (the page cache), and fresh
    memory for a copy cost 5 to 50 ms per 24 MB on a virtual machine. What is hashed is what is parsed unless the
    file changes in place while it is mapped (states are never rewritten: a new build writes a new file), and
    `verified` refuses the state when the open file's size or modification time changed since it was mapped."""
    path, expected = set_row.get("merge_state"), set_row.get("merge_state_sha256")
    if not path:
        raise StateError(f"feature set {set_row['set_id']!r} (build {set_row['build_id']}) has no merge state: it "
                         "was built before merges were possible; rebuild the set once, later batches then merge")
    handle = None
    try:
        if objectstore.is_remote(path):
            data = np.frombuffer(bytearray(objectstore.read_uri(path)), np.uint8)
        else:
            handle = open(path, "rb")
            mapped = os.fstat(handle.fileno())
            data = (np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8)
                    if mapped.st_size else np.zeros(0, np.uint8))
    except (OSError, FileNotFoundError, ValueError) as exc:
        raise StateError(f"merge state of {set_row['set_id']!r} is unreadable ({path}: {exc}); "
                         "rebuild the set") from None
    digest = beside(lambda: hashlib.sha256(data).hexdigest())

    def verified() -> None:
        actual = digest.result()
        if handle is not None:
            now = os.fstat(handle.fileno())
            handle.close()
            if (now.st_size, now.st_mtime_ns) != (mapped.st_size, mapped.st_mtime_ns):
                raise StateError(f"merge state {path} of {set_row['set_id']!r} was changed while it was read; "
                                 "merge again")
        if actual != expected:
            raise StateError(f"merge state {path} of {set_row['set_id']!r} does not match its recorded sha256: it "
                             "was changed after the build; rebuild the set")
        for array in arrays.values():
            array.flags.writeable = True

    try:
        if bytes(data[:4]) == b"PK\x03\x04":  # a zip: np.savez, states saved before the safetensors format (copies)
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        else:
            arrays = state_file.read(data)
    except Exception:
        arrays = {}
        verified()  # a damaged file says so; a file that is what was recorded but does not parse is a bug: raised
        raise
    for array in arrays.values():
        array.flags.writeable = False
    return arrays, verified


def _delete_state(db, build_id: str) -> None:
    uri = getattr(db, "uri", None)
    if uri is not None:
        _delete_state_file(str(uri), build_id)


def _delete_state_file(uri: str | None, build_id: str) -> None:
    for suffix in (".safetensors", ".npz"):  # .npz: states saved before the safetensors format
        path = _state_path(uri, build_id, suffix)
        if objectstore.is_remote(path):
            objectstore.delete_uri(path)
        else:
            Path(path).unlink(missing_ok=True)


class StateError(RuntimeError):
    """A feature set that cannot be merged into (no state, or a state that fails verification)."""


def current_set(set_id: str, uri: str | None = None, db=None) -> dict[str, Any] | None:
    """The pointer row of `set_id`, or None (db: a connection to `uri` to use)."""
    db = db if db is not None else connect(uri)
    if FEATURE_SETS not in table_names(db):
        return None
    rows = db.open_table(FEATURE_SETS).search().where(f"set_id = {sql_str(set_id)}").limit(1).to_list()
    return rows[0] if rows else None


def read_ranked_examples(set_row: dict[str, Any], sign: str, k: int, clip_index: dict[str, int],
                         features: np.ndarray | None = None, uri: str | None = None) -> dict[str, np.ndarray]:
    """The stored examples of one sign of a pointer row's build as rank-ordered [n, k] arrays (clip_index -1 and
    zeros where a feature has fewer), traces [n, k, L]; row i is features[i] (default: every feature); clip ids
    mapped to positions by `clip_index`."""
    n_features = int(set_row["n_features"])
    features = np.arange(n_features) if features is None else np.asarray(features, np.int64)
    where = f"sign = {sql_str(sign)}"
    if len(features) < n_features:
        where += f" AND feature IN ({', '.join(map(str, features.tolist()))})" if len(features) else " AND feature < 0"
    rows = example_rows(set_row, where, ["feature", "clip_ids", "values", "peak_frames", "trace_offsets", "traces"],
                        uri)
    n = len(features)
    out = {"values": np.zeros((n, k), np.float32), "clip_index": np.full((n, k), -1, np.int64),
           "peak_frame": np.zeros((n, k), np.int32), "trace_offset": np.zeros((n, k), np.int32),
           "trace_len": np.zeros((n, k), np.int32)}
    row_of = np.full(n_features, -1, np.int64)
    row_of[features] = np.arange(n)
    counts = pc.list_value_length(rows["values"]).to_numpy(zero_copy_only=False).astype(np.int64)
    feature_of = np.repeat(row_of[rows["feature"].to_numpy()], counts)  # one entry per stored example, in row order
    rank_of = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    for name, column in (("values", "values"), ("peak_frame", "peak_frames"), ("trace_offset", "trace_offsets")):
        flat = pc.list_flatten(rows[column]).to_numpy(zero_copy_only=False)
        out[name][feature_of, rank_of] = flat
    clip_ids = pc.list_flatten(rows["clip_ids"]).to_pylist()
    out["clip_index"][feature_of, rank_of] = [clip_index[c] for c in clip_ids]
    inner = pc.list_flatten(rows["traces"])  # one list per example
    lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False).astype(np.int64)
    out["trace_len"][feature_of, rank_of] = lengths
    width = int(lengths.max(initial=0))
    out["traces"] = np.zeros((n, k, width), np.float16)
    # The examples' samples lie back to back in row order: a row-major boolean mask of [example, frame < length]
    # places them without per-sample index arrays.
    padded = np.zeros((len(lengths), width), np.float16)
    padded[np.arange(width)[None, :] < lengths[:, None]] = pc.list_flatten(inner).to_numpy(zero_copy_only=False)
    out["traces"][feature_of, rank_of] = padded
    return out


def read_vectors(name: str, uri: str | None = None) -> np.ndarray:
    """A build's vectors table as [n, d] float32 in feature order (unit rows, as written)."""
    table = connect(uri).open_table(name).to_arrow().sort_by("index")
    column = table["vector"].combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(np.float32)
