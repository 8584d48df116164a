"""The data access of the Dash app: feature sets, features, ranked examples, similar features, clips.

Every per-feature call is one or two indexed row lookups (BTREE on the `key` columns; `examples` holds all
examples of a feature and sign in one row). A set_id resolves to its current build through `feature_sets`,
cached for `read_consistency_interval`; if a rebuild retired the build in between, the lookup comes back
empty, the pointer is re-read and the lookup retried once — a reader never sees a half-written set.
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from freud_pipeline.errors import EmptyAudioError, FeatureIndexError, FeatureSetError, FreudError
from freud_pipeline.features import mining, store
from freud_pipeline.features.labels import MIN_SUPPORT, VALIDATED_PRECISION
from freud_pipeline.features.store import CLIPS, EXAMPLES, FEATURE_SETS, FEATURES, sql_str
from freud_pipeline.frames import FRAME_SECONDS
from freud_pipeline.settings import data_dir, lancedb_uri

PUBLIC_SET_FIELDS = ("set_id", "model", "hook", "kind", "n_features", "sae_run_id", "sae_checkpoint", "sae_sha256",
                     "shard_dir", "created_at", "n_clips", "n_frames", "top_k", "fire_threshold",
                     "vector_kind", "label_summary", "build_id", "coverage")
EXAMPLE_COLUMNS = ["sign", "clip_ids", "values", "peak_frames", "trace_offsets", "traces"]


class UnknownClipError(FreudError, KeyError):
    """A clip_id not in the clips table."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python: results go straight to JSON in the app."""
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def label_flags(row: dict) -> dict:
    """`artefact` (the feature's label names an artefact, e.g. clip onset) and `label_validated` (a phone or class
    label whose held-out precision is >= labels.VALIDATED_PRECISION over >= labels.MIN_SUPPORT held-out peaks)."""
    held, n_held = _clean(row.get("label_heldout_precision")), row.get("label_heldout_n") or 0
    return {"artefact": row.get("label_kind") == "artefact",
            "label_validated": row.get("label_kind") in ("phone", "class") and held is not None
            and held >= VALIDATED_PRECISION and n_held >= MIN_SUPPORT}


def _float_lists(column: pa.ChunkedArray, row: int) -> list[np.ndarray]:
    """Row `row` of a list<list<float>> column as numpy arrays, without per-value Python objects."""
    inner = column[row].values
    if inner is None or len(inner) == 0:
        return []
    offsets = inner.offsets.to_numpy()
    values = inner.values.to_numpy(zero_copy_only=False)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class FeatureIndex:
    """Read access to a FREUD LanceDB (default `settings.lancedb_uri()`); safe to share between threads.

    Sets below `store.VECTOR_INDEX_MIN_ROWS` features are served from memory once read (feature rows, decoder or
    signature vectors, and ranked examples up to EXAMPLES_IN_MEMORY_BYTES): a build never changes, and each
    LanceDB point query has a fixed overhead a dict lookup does not. Larger sets query LanceDB's indexes per call."""

    EXAMPLES_IN_MEMORY_BYTES = 128 * 1024 * 1024

    def __init__(self, uri: str | None = None, read_consistency_interval: timedelta | float | None = 1.0,
                 device: str = "cpu"):
        if isinstance(read_consistency_interval, (int, float)):
            read_consistency_interval = timedelta(seconds=read_consistency_interval)
        self.uri = uri or lancedb_uri()
        self.device = device
        self._db = store.connect(self.uri, read_consistency_interval=read_consistency_interval)
        self._ttl = None if read_consistency_interval is None else read_consistency_interval.total_seconds()
        self._tables: dict[str, Any] = {}
        self._sets: dict[str, dict] = {}
        self._sets_at = -math.inf
        self._clip_cache: dict[str, dict] = {}
        self._vectors: dict[str, tuple[np.ndarray, list]] = {}  # small sets' unit vectors, by vectors table
        self._feature_cache: dict[str, dict[int, dict]] = {}  # small sets' feature rows, by build id
        self._examples_cache: dict[str, tuple | None] = {}  # small sets' ranked examples, by build id

    # ------------------------------------------------------------ plumbing

    def _table(self, name: str):
        table = self._tables.get(name)
        if table is None:
            if name not in store.table_names(self._db):
                return None
            table = self._tables[name] = self._db.open_table(name)
        return table

    def _load_sets(self, force: bool = False) -> dict[str, dict]:
        fresh = self._ttl is None or time.monotonic() - self._sets_at < self._ttl
        if fresh and not force and self._sets_at > -math.inf:
            return self._sets
        table = self._table(FEATURE_SETS)
        rows = table.search().limit(None).to_list() if table is not None else []
        sets = {row["set_id"]: row for row in rows}
        if {r["build_id"] for r in sets.values()} != {r["build_id"] for r in self._sets.values()}:
            self._clip_cache = {}  # a build may have come with new manifest rows
            current = {r["vectors_table"] for r in sets.values()}
            for name in [n for n in self._tables if n.startswith("vectors_") and n not in current]:
                self._tables.pop(name, None)  # retired builds' vector tables (readers of them retry)
        self._sets, self._sets_at = sets, time.monotonic()
        return sets

    def _set(self, set_id: str, refresh: bool = False) -> dict:
        sets = self._load_sets(force=refresh)
        if set_id not in sets:
            sets = self._load_sets(force=True)
        if set_id not in sets:
            known = ", ".join(sorted(sets)) or f"none yet (build one into {self.uri})"
            raise FeatureSetError(f"unknown feature set {set_id!r}; known sets: {known}")
        return sets[set_id]

    def _checked(self, set_id: str, index: int, refresh: bool = False) -> dict:
        row = self._set(set_id, refresh)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise FeatureIndexError(f"feature index must be an integer, got {index!r}")
        if not 0 <= index < row["n_features"]:
            raise FeatureIndexError(
                f"feature {index} is out of range for set {set_id!r}: valid indices are 0..{row['n_features'] - 1}")
        return row

    def _lookup(self, set_id: str, index: int, read: Callable[[dict], Any]) -> Any:
        """read(set_row) returns None when the build it names has been retired: re-resolve once."""
        result = read(self._checked(set_id, index))
        if result is None:
            result = read(self._checked(set_id, index, refresh=True))
        if result is None:
            raise FeatureSetError(f"feature set {set_id!r} has no rows for its current build; rebuild it")
        return result

    def _rows(self, table_name: str, where: str, columns: list[str] | None = None, limit: int | None = None):
        query = self._table(table_name).search().where(where)
        if columns:
            query = query.select(columns)
        return query.limit(limit).to_arrow()

    def _feature_rows(self, set_row: dict, indices: list[int], columns: list[str]) -> dict[int, dict]:
        """Rows of `indices` with `columns`; a column the table lacks (written by an older version) reads None."""
        if set_row["n_features"] < store.VECTOR_INDEX_MIN_ROWS:
            rows = self._small_set_rows(set_row["build_id"])
            if rows is not None:
                return {i: {"index": i, **{c: rows[i].get(c) for c in columns}} for i in indices if i in rows}
        keys = ", ".join(sql_str(store.feature_key(set_row["build_id"], int(i))) for i in indices)
        present = set(self._table(FEATURES).schema.names)
        table = self._rows(FEATURES, f"key IN ({keys})", ["index", *(c for c in columns if c in present)],
                           len(indices))
        return {row["index"]: {**dict.fromkeys(columns), **row} for row in table.to_pylist()}

    def _small_set_rows(self, build_id: str) -> dict[int, dict] | None:
        """All feature rows of a small set's build, read once and kept (a build never changes; a few MB for 10k
        features): a LanceDB point query has a fixed overhead, a dict lookup none. None: build retired."""
        rows = self._feature_cache.get(build_id)
        if rows is None:
            table = self._rows(FEATURES, f"build_id = {sql_str(build_id)}")
            if table.num_rows == 0:
                return None
            rows = {row["index"]: row for row in table.to_pylist()}
            if len(self._feature_cache) >= 8:
                self._feature_cache.pop(next(iter(self._feature_cache)))
            self._feature_cache[build_id] = rows
        return rows

    def _small_set_examples(self, set_row: dict):
        """(table, {(feature, sign): row}) of all ranked examples of a build when they fit in
        EXAMPLES_IN_MEMORY_BYTES (estimated from one row before reading them all), else None (query per call)."""
        build_id = set_row["build_id"]
        if build_id in self._examples_cache:
            return self._examples_cache[build_id]
        # The size estimate comes from a row of the chain's first build, which holds all its traces (a merge's rows
        # hold only their new clips' and would under-estimate).
        held = None
        sample = self._rows(EXAMPLES, f"build_id = {sql_str(store.example_builds(set_row)[0])}", EXAMPLE_COLUMNS, 1)
        if sample.num_rows:
            signs = 2 if set_row["kind"] == "neuron" else 1
            if sample.nbytes * set_row["n_features"] * signs <= self.EXAMPLES_IN_MEMORY_BYTES:
                table = store.example_rows(set_row, columns=["feature", *EXAMPLE_COLUMNS], db=self._db).combine_chunks()
                positions = {(f, s): i for i, (f, s) in enumerate(zip(table.column("feature").to_pylist(),
                                                                      table.column("sign").to_pylist()))}
                held = (table.select(EXAMPLE_COLUMNS), positions)
        if len(self._examples_cache) >= 4:
            self._examples_cache.pop(next(iter(self._examples_cache)))
        self._examples_cache[build_id] = held
        return held

    # ------------------------------------------------------------ sets and features

    def sets(self) -> list[dict]:
        rows = self._load_sets(force=True).values()
        out = []
        for row in sorted(rows, key=lambda r: r["set_id"]):
            item = {k: row.get(k) for k in PUBLIC_SET_FIELDS}
            item["label_summary"] = json.loads(row["label_summary"] or "{}")
            item["coverage"] = json.loads(row["coverage"]) if row.get("coverage") else None
            out.append(item)
        return out

    def feature(self, set_id: str, index: int, histogram: bool = False) -> dict:
        """Statistics, label and scores of a feature; histogram=True adds `histogram` (as `feature_histogram`
        returns it) from the same read."""
        def read(set_row):
            rows = self._feature_rows(set_row, [index], [
                "density", "mean", "max", "min", "quantiles", "label", *store.LABEL_QUALITY,
                "label_recall", "label_f1", "word_label", "word_precision", "n_top", "n_bottom",
                *(["hist_counts", "hist_edges"] if histogram else [])])
            if index not in rows:
                return None
            hist = {"bin_edges": rows[index].pop("hist_edges"), "counts": rows[index].pop("hist_counts")} \
                if histogram else None
            row = {k: _clean(v) for k, v in rows[index].items()}
            levels = set_row["quantile_levels"] or []
            row["quantiles"] = {f"{q:g}": _clean(v) for q, v in zip(levels, rows[index]["quantiles"] or [])}
            stats = {k: row.pop(k) for k in ("mean", "max", "min", "quantiles", "n_top", "n_bottom")}
            stats.update(density=row["density"], fire_threshold=_clean(set_row["fire_threshold"]))
            out = {"set_id": set_id, "kind": set_row["kind"], **row, **label_flags(row), "stats": stats}
            if hist is not None:
                out["histogram"] = hist
            return out

        return self._lookup(set_id, index, read)

    def feature_histogram(self, set_id: str, index: int) -> dict:
        """Histogram of per-clip maxima over all mined clips (linear bins; plot with a log y axis)."""
        def read(set_row):
            rows = self._feature_rows(set_row, [index], ["hist_counts", "hist_edges"])
            if index not in rows:
                return None
            return {"bin_edges": rows[index]["hist_edges"], "counts": rows[index]["hist_counts"]}

        return self._lookup(set_id, index, read)

    # ------------------------------------------------------------ examples

    def top_examples(self, set_id: str, index: int, n: int = 20, min_value: float | None = None,
                     max_value: float | None = None, absolute: bool = False, negative: bool = False) -> list[dict]:
        """Clips ranked by the feature's peak in the clip, strongest first.

        `value` is the clip's peak (its most negative value with negative=True). min_value/max_value keep clips
        whose signed peak lies in [min_value, max_value]. absolute=True merges both lists and ranks by |peak|; a
        clip in both lists appears once, with the peak of larger magnitude. As in the original GUI, max_value=0
        with absolute=True gives the most strongly negative clips. Filters choose among the mined examples
        (top_k per sign), they do not search every clip.
        """
        signs = ["+", "-"] if absolute else (["-"] if negative else ["+"])

        def read(set_row):
            held = self._small_set_examples(set_row) if set_row["n_features"] < store.VECTOR_INDEX_MIN_ROWS else None
            if held is not None:
                table, positions = held
                rows = [positions.get((index, s)) for s in signs]
                return None if None in rows else table.take(rows)
            # The feature's rows in every build of the chain: the newest holds it, older ones hold traces it names.
            chain = store.example_builds(set_row)
            keys = ", ".join(sql_str(store.example_key(b, index, s)) for b in chain for s in signs)
            present = set(self._table(EXAMPLES).schema.names)
            columns = [*EXAMPLE_COLUMNS, "feature", "build_id", *(c for c in store.REF_COLUMNS if c in present)]
            table = store.newest_rows(self._rows(EXAMPLES, f"key IN ({keys})", columns, len(signs) * len(chain)), chain)
            return table.select(EXAMPLE_COLUMNS) if table.num_rows == len(signs) else None  # sorted: "+" first

        table = self._lookup(set_id, index, read)
        entries = []
        for row, sign in enumerate(table.column("sign").to_pylist()):
            traces = _float_lists(table.column("traces"), row)
            columns = [table.column(c)[row].as_py() for c in ("clip_ids", "values", "peak_frames", "trace_offsets")]
            for rank, (clip_id, value, frame, offset) in enumerate(zip(*columns)):
                entries.append((clip_id, value, frame, offset, traces[rank], sign, rank + 1))
        if absolute:
            entries.sort(key=lambda e: -abs(e[1]))
            strongest: dict[str, tuple] = {}
            for entry in entries:  # a clip in both lists: keep its larger |peak|
                strongest.setdefault(entry[0], entry)
            entries = list(strongest.values())
        entries = [e for e in entries if (min_value is None or e[1] >= min_value)
                   and (max_value is None or e[1] <= max_value)][: max(n, 0)]
        clips = self._clips([e[0] for e in entries])
        return [{
            "rank": position + 1,
            "clip_id": clip_id,
            "value": float(value),
            "sign": sign,
            "source_rank": source_rank,
            "peak_frame": int(frame),
            "peak_time_s": float(store.peak_time_s(frame)),
            "trace": trace.astype(np.float32).tolist(),
            "trace_offset_frame": int(offset),
            "trace_start_s": offset * FRAME_SECONDS,
            "transcript": clips.get(clip_id, {}).get("transcript"),
            "duration_s": clips.get(clip_id, {}).get("duration_s"),
        } for position, (clip_id, value, frame, offset, trace, sign, source_rank) in enumerate(entries)]

    def typical_examples(self, set_id: str, index: int, per_level: int = mining.LEVEL_SLOTS) -> list[dict]:
        """Examples across the feature's activation range, beside `top_examples`' strongest: for each octave of the
        per-clip peak [low, high) the feature reached, up to `per_level` clips drawn uniformly from the clips
        whose peak lies there (`mining.LevelSample`), strongest level first. No traces are stored for them: the
        app analyses such a clip when it is opened. Empty for sets built before levels were sampled."""
        def read(set_row):
            rows = self._feature_rows(set_row, [index], ["typical_clip_ids", "typical_values", "typical_peak_frames"])
            return rows.get(index)

        row = self._lookup(set_id, index, read)
        ids, values, frames = (row.get(c) or [] for c in ("typical_clip_ids", "typical_values", "typical_peak_frames"))
        clips = self._clips(list(ids))
        out, taken = [], {}
        for clip_id, value, frame in zip(ids, values, frames):
            level = int(mining.LevelSample.level(np.array([value], np.float64))[0])
            if taken.get(level, 0) >= per_level:
                continue
            taken[level] = taken.get(level, 0) + 1
            low = 0.0 if level == 0 else 2.0 ** (level + mining.LEVEL_MIN)
            out.append({
                "level": level, "low": low, "high": 2.0 ** (level + mining.LEVEL_MIN + 1), "clip_id": clip_id,
                "value": float(value), "peak_frame": int(frame), "peak_time_s": float(store.peak_time_s(frame)),
                "transcript": clips.get(clip_id, {}).get("transcript"),
                "duration_s": clips.get(clip_id, {}).get("duration_s"),
            })
        return out

    # ------------------------------------------------------------ matches across SAEs, seed stability, effects

    def counterparts(self, set_id: str, index: int) -> list[dict]:
        """A feature's closest features (decoder cosine) in the other indexed SAE sets of its model and width, as
        the `sae_counterparts` asset stored them: [{set_id, index, cosine, rank}], [] when none were computed."""
        from freud_pipeline.features import matches

        self._checked(set_id, index)
        return matches.counterparts(set_id, int(index), uri=self.uri)

    def matches_version(self) -> tuple:
        """The current match id of every stored pair of sets: changes when counterparts are recomputed."""
        from freud_pipeline.features import matches

        return tuple(sorted(r["match_id"] for r in matches.pair_rows(self.uri, "cross")))

    def seed_stability(self) -> list[dict]:
        """Recorded seed-stability studies (share of features matched across seeds against two random
        dictionaries), newest first."""
        from freud_pipeline.features import matches

        return matches.seed_stability(self.uri)

    def effect_summary(self, set_id: str) -> dict | None:
        """The set's stored feature-effect computation: its chance level (random directions of the same norm),
        or None when the `sae_feature_effects` asset has not run for it."""
        from freud_pipeline.features import effect_store

        self._set(set_id)
        return effect_store.effect_summary(set_id, uri=self.uri)

    def feature_effects(self, set_id: str, features: list[int] | None = None) -> list[dict]:
        """Stored effects (ΔCE when the feature alone is ablated on its top clips, with its interval, ΔWER on a
        sample) of `features` (default: every measured one); [] when none were computed."""
        from freud_pipeline.features import effect_store

        for index in features or []:
            self._checked(set_id, index)
        return effect_store.effects(set_id, None if features is None else [int(f) for f in features], uri=self.uri)

    def effects_version(self) -> tuple:
        """Every set's current effect computation: changes when effects are (re)computed."""
        from freud_pipeline.features import effect_store

        return effect_store.computation_ids(self.uri)

    def features_by_effect(self, set_id: str, limit: int = 100, descending: bool = True) -> list[dict]:
        """The measured features ranked by ΔCE ("which features matter for the transcript")."""
        from freud_pipeline.features import effect_store

        self._set(set_id)
        return effect_store.features_by_effect(set_id, limit, descending=descending, uri=self.uri)

    # ------------------------------------------------------------ similarity and labels

    def similar_features(self, set_id: str, index: int, n: int = 10) -> list[dict]:
        """Nearest features: decoder cosine for SAE sets, activation correlation (a random-projection
        signature of sampled frames, mined with the set) for neuron sets."""
        def read(set_row):
            table = self._table(set_row["vectors_table"])
            if table is None:
                return None
            if set_row["n_features"] < store.VECTOR_INDEX_MIN_ROWS:
                return self._similar_in_memory(set_row["vectors_table"], table, index, n)
            try:
                own = table.search().where(f"index = {int(index)}").select(["vector"]).limit(1).to_list()
                if not own:
                    return None
                query = (table.search(np.asarray(own[0]["vector"], np.float32), vector_column_name="vector")
                         .distance_type("dot").select(["index", "label"]).limit(n + 1))
                if set_row["n_features"] >= store.VECTOR_INDEX_MIN_ROWS:
                    query = query.nprobes(20)
                return query.to_list()
            except (OSError, RuntimeError, ValueError):  # the table of a retired build was just dropped
                self._tables.pop(set_row["vectors_table"], None)
                return None

        hits = [h for h in self._lookup(set_id, index, read) if h["index"] != index][:n]
        set_row = self._set(set_id)
        # Labels from the build's feature rows: a merged build shares its SAE's vectors table (and its labels as
        # they were when the table was written) with the build before.
        rows = self._feature_rows(set_row, [int(h["index"]) for h in hits], ["label"])
        return [{"index": h["index"], "similarity": float(1.0 - h["_distance"]),
                 "label": rows.get(int(h["index"]), h)["label"], "method": set_row["vector_kind"]} for h in hits]

    def _similar_in_memory(self, name: str, table, index: int, n: int) -> list[dict] | None:
        """Exact dot-product neighbours from the set's unit vectors held in memory: a set below the size that
        gets an ANN index is scanned flat by LanceDB anyway, and a numpy product is cheaper than its query."""
        cached = self._vectors.get(name)
        if cached is None:
            try:
                data = table.search().select(["index", "vector", "label"]).limit(None).to_arrow()
            except (OSError, RuntimeError, ValueError):  # the table of a retired build was just dropped
                self._tables.pop(name, None)
                return None
            order = np.argsort(data.column("index").to_numpy())
            vectors = data.column("vector").combine_chunks().flatten().to_numpy().reshape(data.num_rows, -1)
            cached = (np.ascontiguousarray(vectors[order], dtype=np.float32),
                      [data.column("label")[int(i)].as_py() for i in order])
            if len(self._vectors) >= 8:
                self._vectors.pop(next(iter(self._vectors)))
            self._vectors[name] = cached
        vectors, labels = cached
        if not 0 <= index < len(vectors):
            return None
        dots = vectors @ vectors[index]
        top = np.argsort(-dots, kind="stable")[: n + 1]
        return [{"index": int(j), "_distance": float(1.0 - dots[j]), "label": labels[j]} for j in top]

    def features_by_label(self, set_id: str, label: str, limit: int = 100) -> list[dict]:
        """Features whose label (phone, phone class or artefact) or word label is `label` (case-insensitive), best
        F1 first, each with its label quality fields."""
        set_row = self._set(set_id)
        wanted = sql_str(label.strip().lower())
        columns = ["index", "label", *store.LABEL_QUALITY, "label_recall", "label_f1", "word_label",
                   "word_precision", "max"]
        present = set(self._table(FEATURES).schema.names)
        rows = self._rows(FEATURES, f"build_id = {sql_str(set_row['build_id'])} AND "
                          f"(label = {wanted} OR word_label = {wanted})",
                          [c for c in columns if c in present]).to_pylist()
        rows = [{**dict.fromkeys(columns), **{k: _clean(v) for k, v in r.items()}} for r in rows]
        rows = [{**r, **label_flags(r)} for r in rows]
        rows.sort(key=lambda r: (r["label"] != label.lower(), -(r["label_f1"] or r["word_precision"] or 0)))
        return rows[:limit]

    # ------------------------------------------------------------ clips

    def _clips(self, clip_ids: list[str]) -> dict[str, dict]:
        missing = [c for c in dict.fromkeys(clip_ids) if c not in self._clip_cache]
        if len(self._clip_cache) > 100_000:  # bounded: transcripts of the clips browsed recently
            self._clip_cache = {}
        if missing and self._table(CLIPS) is not None:
            found = self._rows(CLIPS, f"clip_id IN ({', '.join(map(sql_str, missing))})", limit=len(missing))
            for row in found.to_pylist():
                self._clip_cache[row["clip_id"]] = row
        return {c: self._clip_cache[c] for c in clip_ids if c in self._clip_cache}

    @staticmethod
    def _with_audio_path(row: dict) -> dict:
        path = Path(row["path"]) if row.get("path") else None
        return {**{k: _clean(v) for k, v in row.items() if not k.startswith("_")},
                "audio_path": str(path if path is None or path.is_absolute() else data_dir() / path)
                if path else None}

    def clip(self, clip_id: str) -> dict:
        """The manifest row, plus `audio_path` resolved against the data directory."""
        found = self._clips([clip_id])
        if clip_id not in found:
            raise UnknownClipError(f"unknown clip {clip_id!r}; search_clips(text) finds clip ids")
        return self._with_audio_path(found[clip_id])

    def search_clips(self, text: str, limit: int = 20) -> list[dict]:
        """Clips whose transcript matches: full-text (BM25, stemmed) hits first, then substring matches."""
        table = self._table(CLIPS)
        if table is None:
            return []
        text = text.strip()
        if not text:
            return [self._with_audio_path(r) for r in table.search().limit(limit).to_list()]
        hits: dict[str, dict] = {}
        try:
            for row in table.search(text, query_type="fts").limit(limit).to_list():
                hits[row["clip_id"]] = row
        except Exception:  # no FTS index (e.g. an older table): substring search below still answers
            pass
        if len(hits) < limit:
            pattern = sql_str("%" + text.lower().replace("%", "").replace("_", "") + "%")
            for row in table.search().where(f"lower(transcript) LIKE {pattern}").limit(limit).to_list():
                hits.setdefault(row["clip_id"], row)
        return [self._with_audio_path(r) for r in list(hits.values())[:limit]]

    # ------------------------------------------------------------ live audio

    def clip_features(self, audio: np.ndarray, set_id: str, n: int = 32, *, include_artefacts: bool = True,
                      progress: Callable[[str], None] | None = None) -> list[dict]:
        """Features most active on `audio` (float32 mono 16 kHz), ranked by their maximum over the clip.
        Runs Whisper up to the set's hook (and the set's SAE for SAE sets) like the mining pipeline did.
        Each carries its label and the label's quality (`store.LABEL_QUALITY`, `label_validated`) and `artefact`
        (its label names an artefact such as the clip onset). include_artefacts=False leaves artefact features out
        (the n strongest of the others). The default keeps them, marked: this is a measurement of the clip, and
        the edit page ablates whatever is strongest; the views that read features as a description of the clip
        (`freud top-features`, the upload page) leave them out unless asked.
        `progress`, if given, is called with a description of each stage (an exception it raises aborts)."""
        set_row = self._set(set_id)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0:
            raise EmptyAudioError("the audio holds no samples; give float32 mono 16 kHz samples")
        sae_checkpoint = set_row["sae_checkpoint"] if set_row["kind"] == "sae" else None
        if set_row["kind"] == "sae" and not sae_checkpoint:
            raise FeatureSetError(f"SAE set {set_id!r} was built without sae_checkpoint; rebuild it with one")
        acts = activations_for_audio(audio, set_row["model"], set_row["hook"], sae_checkpoint, self.device,
                                     sae_sha256=set_row.get("sae_sha256"), progress=progress)
        if progress is not None:
            progress("Ranking the features…")
        peak = acts.max(axis=0)
        order = np.argsort(-peak, kind="stable")
        columns = ["label", *store.LABEL_QUALITY]
        picked: list[tuple[int, dict]] = []
        start, n = 0, max(n, 0)
        while len(picked) < n and start < len(order):  # artefacts left out: read further down the ranking
            chunk = order[start : start + (n - len(picked)) * (1 if include_artefacts else 2) + 8].tolist()
            start += len(chunk)
            rows = self._feature_rows(set_row, chunk, columns)
            for i in chunk:
                row = {c: _clean(v) for c, v in rows.get(i, dict.fromkeys(columns)).items() if c != "index"}
                row.update(label_flags(row))
                if (include_artefacts or not row["artefact"]) and len(picked) < n:
                    picked.append((i, row))
        return [{
            "index": int(i),
            "value": float(peak[i]),
            "peak_time_s": float(store.peak_time_s(int(acts[:, i].argmax()))),
            "trace": acts[:, i].astype(np.float32).tolist(),
            **row,
        } for i, row in picked]


_model_lock = threading.Lock()  # loading only: one load of each model per process (running: model_lock)


@lru_cache(maxsize=2)
def _whisper(model: str, device: str):
    from freud_pipeline.whisper.models import load_model

    return load_model(model, device=device)


def _sae(checkpoint: str, sha256: str | None, device: str):
    """The set's SAE through the one cached, digest-verified loader (shared with feature editing)."""
    from freud_pipeline.sae.checkpoint import load_verified  # imported only when needed: it brings torch

    return load_verified(checkpoint, sha256, device)


def activations_for_audio(audio: np.ndarray, model: str, hook: str, sae_checkpoint: str | None = None,
                          device: str = "cpu", *, sae_sha256: str | None = None,
                          progress: Callable[[str], None] | None = None) -> np.ndarray:
    """[frames, n_features] for the whole audio: 30 s windows, each padded like Whisper, real frames kept.
    `progress`, if given, is called with a description of each stage (an exception it raises aborts).
    Threads: the Whisper model is shared by every caller in the process; each capture holds its lock (see
    `EncoderCapture`). The SAE is shared too, and safe without a lock: in eval mode `encode` only reads it."""
    import torch

    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames, split_windows

    report = progress or (lambda _text: None)
    report("Loading Whisper" + (" and the SAE…" if sae_checkpoint else "…"))
    with _model_lock:  # one load per process even when the app serves several requests at once
        whisper_model = _whisper(model, device)
        sae = _sae(sae_checkpoint, sae_sha256, device) if sae_checkpoint else None
    capture = EncoderCapture(whisper_model, [hook])
    parts = []
    windows = split_windows(audio)
    for i, window in enumerate(windows):
        report(f"Running Whisper's encoder{'' if sae is None else ' and the SAE'}"
               + (f" (30 s window {i + 1} of {len(windows)})…" if len(windows) > 1 else "…"))
        acts = capture.capture(log_mel(window, whisper_model.dims.n_mels))[hook][0, : n_real_frames(len(window))]
        if sae is not None:
            with torch.inference_mode():
                acts = sae.encode(acts.to(next(sae.parameters()).device, torch.float32))
        parts.append(acts.float().cpu().numpy())
    return np.concatenate(parts)
