"""Data-quality checks on the pipeline's files (no Dagster): manifests, activation shards, feature index.

Each check returns a `CheckOutcome` (passed, metadata, description); the Dagster asset checks in
`freud_pipeline.defs.checks` only wrap them. They read the files as any later consumer would, so a check that
passes means the next step can rely on what it tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from freud_pipeline.activations.schema import DTYPES, ShardSpec, column_name, sparse_columns
from freud_pipeline.activations.writer import MANIFEST, shard_files
from freud_pipeline.audio.datasets.manifest import MANIFEST_FILE, MANIFEST_SCHEMA, SPLITS
from freud_pipeline.frames import SAMPLE_RATE, SAMPLES_PER_FRAME

MAX_LISTED = 20  # offending items listed in metadata (counts are always complete)
FINITE_CHUNK_ROWS = 8192  # rows scanned at a time for NaN/Inf: bounds the temporary boolean array


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return "; ".join(self.problems) if self.problems else "all good"


def expected_frames(duration_s: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Encoder frames a clip yields: ceil(duration / 20 ms), counted on whole samples (at least one).

    Clips longer than 30 s run as consecutive windows of exactly 1500 frames each, so the same formula holds.
    """
    n_samples = int(round(float(duration_s) * sample_rate))
    return max(1, math.ceil(n_samples * SAMPLE_RATE / sample_rate / SAMPLES_PER_FRAME))


# --- manifests ---------------------------------------------------------------------------------------------


def check_manifest(manifest_path: str | Path, data_root: str | Path) -> CheckOutcome:
    """Required columns present, clip ids unique, splits known, durations positive, every file on disk."""
    path = Path(manifest_path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        return CheckOutcome(False, {"manifest": str(path)}, [f"manifest {path} does not exist"])
    frame = pq.read_table(path).to_pandas()
    problems: list[str] = []
    missing_columns = [c for c in MANIFEST_SCHEMA.names if c not in frame.columns]
    if missing_columns:
        problems.append(f"missing columns {missing_columns}")
        return CheckOutcome(False, {"n_clips": len(frame), "missing_columns": missing_columns}, problems)

    duplicates = sorted(set(frame.loc[frame["clip_id"].duplicated(), "clip_id"]))
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate clip ids (e.g. {duplicates[:3]})")
    bad_splits = sorted(set(frame["split"]) - set(SPLITS))
    if bad_splits:
        problems.append(f"unknown splits {bad_splits}")
    durations = pd.to_numeric(frame["duration_s"], errors="coerce")
    bad_duration = frame.loc[~(durations > 0) | ~np.isfinite(durations), "clip_id"].tolist()
    if bad_duration:
        problems.append(f"{len(bad_duration)} clips with a duration that is not positive (e.g. {bad_duration[:3]})")
    bad_rate = frame.loc[~(pd.to_numeric(frame["sample_rate"], errors="coerce") > 0), "clip_id"].tolist()
    if bad_rate:
        problems.append(f"{len(bad_rate)} clips without a positive sample rate")
    root = Path(data_root)
    missing_files = [p for p in frame["path"] if not (root / p).is_file()]
    if missing_files:
        problems.append(f"{len(missing_files)} audio files missing under {root} (e.g. {missing_files[:3]})")
    metadata = {
        "n_clips": len(frame),
        "total_minutes": round(float(durations[durations > 0].sum()) / 60, 2),
        "n_missing_files": len(missing_files),
        "missing_files": missing_files[:MAX_LISTED],
        "n_bad_durations": len(bad_duration),
        "n_duplicate_ids": len(duplicates),
        "manifest": str(path),
    }
    return CheckOutcome(not problems, metadata, problems)


# --- activation shards -------------------------------------------------------------------------------------


def _clip_runs(ids: np.ndarray) -> list[tuple[str, int, int]]:
    if len(ids) == 0:
        return []
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(ids)]])
    return [(str(ids[s]), int(s), int(e)) for s, e in zip(starts, stops)]


def _non_finite(values: pa.Array, width: int) -> int:
    """Count NaN/Inf in a FixedSizeList column, a few thousand rows at a time, zero-copy where possible."""
    flat = values.flatten().to_numpy(zero_copy_only=False)
    bad = 0
    step = FINITE_CHUNK_ROWS * width
    for start in range(0, len(flat), step):
        bad += int(np.count_nonzero(~np.isfinite(flat[start : start + step])))
    return bad


def check_shards(directory: str | Path, manifest: pd.DataFrame | None = None,
                 expected_hooks: list[str] | None = None) -> CheckOutcome:
    """Schema, width, dtype, finiteness and per-clip frame counts of one shard directory.

    `manifest`: the rows this directory was collected from (frame counts are compared with their durations;
    clips that collection skipped or never reached are reported, not failed). `expected_hooks`: the hooks the
    collection was asked for.
    """
    directory = Path(directory)
    problems: list[str] = []
    paths = shard_files(directory)
    record_path = directory / MANIFEST
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None:
        return CheckOutcome(False, {"directory": str(directory)}, [f"no {MANIFEST} in {directory}"])
    if not record.get("complete"):
        problems.append(f"{record_path} is not marked complete (collection interrupted?)")
    spec = ShardSpec(**{**record["spec"], "hooks": tuple(record["spec"]["hooks"]),
                        "widths": tuple(record["spec"]["widths"])})
    if expected_hooks is not None and list(spec.hooks) != list(expected_hooks):
        problems.append(f"shards hold hooks {list(spec.hooks)}, expected {list(expected_hooks)}")
    listed = sorted(s["file"] for s in record.get("shards", []))
    if listed != [p.name for p in paths]:
        problems.append(f"{MANIFEST} lists {len(listed)} shards but {len(paths)} are on disk")

    expected_schema = spec.schema()
    counts: dict[str, int] = {}
    runs_seen: set[str] = set()
    split_clips: set[str] = set()
    bad_frame_index: list[str] = []
    non_finite: dict[str, int] = {}
    n_rows = 0
    for path in paths:
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(f"{path.name} is not a readable Arrow IPC file: {exc}")
            continue
        n_rows += table.num_rows
        if not table.schema.equals(expected_schema, check_metadata=False):
            problems.append(f"{path.name}: schema {table.schema.remove_metadata()} differs from the spec's "
                            f"{expected_schema.remove_metadata()}")
            continue
        stored = ShardSpec.from_schema(table.schema) if table.schema.metadata else None
        if stored is not None and stored != spec:
            problems.append(f"{path.name}: its embedded spec differs from {MANIFEST}")
        for hook, width in zip(spec.hooks, spec.widths):
            names = sparse_columns(hook) if spec.sparse_k else (column_name(hook),)
            for name in names:
                column = table.column(name).combine_chunks()
                list_type = column.type
                size = spec.sparse_k or width
                if list_type.list_size != size:
                    problems.append(f"{path.name}: {name} has width {list_type.list_size}, expected {size}")
                value_type = pa.int32() if name.startswith("idx:") else DTYPES[spec.dtype]
                if list_type.value_type != value_type:
                    problems.append(f"{path.name}: {name} stores {list_type.value_type}, expected {value_type}")
                if not name.startswith("idx:"):
                    bad = _non_finite(column, size)
                    if bad:
                        non_finite[name] = non_finite.get(name, 0) + bad
        ids = table.column("clip_id").to_numpy(zero_copy_only=False)
        frames = table.column("frame").to_numpy()
        for clip_id, start, stop in _clip_runs(ids):
            if clip_id in runs_seen:
                split_clips.add(clip_id)
            runs_seen.add(clip_id)
            counts[clip_id] = counts.get(clip_id, 0) + stop - start
            if not np.array_equal(frames[start:stop], np.arange(stop - start)):
                # long clips keep their window offsets: positions still count 0..n-1 without gaps
                bad_frame_index.append(clip_id)
    for name, bad in non_finite.items():
        problems.append(f"{bad} NaN/Inf values in {name}")
    if split_clips:
        problems.append(f"{len(split_clips)} clips stored in more than one run (e.g. {sorted(split_clips)[:3]})")
    if bad_frame_index:
        problems.append(f"{len(bad_frame_index)} clips whose frame positions are not 0..n-1 "
                        f"(e.g. {bad_frame_index[:3]})")
    if record.get("n_frames") is not None and record["n_frames"] != n_rows:
        problems.append(f"{MANIFEST} says {record['n_frames']} frames, the shards hold {n_rows}")

    metadata = {"directory": str(directory), "n_shards": len(paths), "n_clips": len(counts), "n_frames": n_rows,
                "hooks": list(spec.hooks), "widths": list(spec.widths), "dtype": spec.dtype,
                "n_non_finite": int(sum(non_finite.values()))}
    if manifest is not None:
        durations = dict(zip(manifest["clip_id"], manifest["duration_s"]))
        rates = dict(zip(manifest["clip_id"], manifest["sample_rate"])) if "sample_rate" in manifest else {}
        unknown = sorted(set(counts) - set(durations))
        if unknown:
            problems.append(f"{len(unknown)} clips in the shards are not in the manifest (e.g. {unknown[:3]})")
        mismatched = [
            {"clip_id": cid, "frames": n, "expected": expected_frames(durations[cid], int(rates.get(cid) or SAMPLE_RATE))}
            for cid, n in counts.items()
            if cid in durations and n != expected_frames(durations[cid], int(rates.get(cid) or SAMPLE_RATE))
        ]
        if mismatched:
            problems.append(f"{len(mismatched)} clips whose frame count is not ceil(duration / 20 ms) "
                            f"(e.g. {mismatched[:2]})")
        skipped = {s.get("clip_id") for s in record.get("skipped", []) if isinstance(s, dict)}
        not_collected = sorted(set(durations) - set(counts))
        metadata.update({
            "n_frame_mismatches": len(mismatched),
            "n_skipped": len(skipped & set(not_collected)),
            "n_not_collected": len(set(not_collected) - skipped),  # e.g. collect_max, reported only
        })
    return CheckOutcome(not problems, metadata, problems)


# --- feature index -----------------------------------------------------------------------------------------

# Scalar indexes the query API relies on, per table.
REQUIRED_SCALAR_INDEXES = {"features": ("key", "build_id"), "examples": ("key", "build_id"), "clips": ("clip_id",)}


def _indexed_columns(table) -> set[str]:
    return {column for index in table.list_indices() for column in index.columns}


def check_feature_set(index_uri: str, set_id: str, expected_n_features: int | None = None) -> CheckOutcome:
    """The current build of `set_id`: one features row and one vector per feature (as many as the dictionary
    has: the hook's width for neurons, d_sae for an SAE), examples for at most both signs, scalar indexes on
    the lookup columns of every table."""
    from freud_pipeline.features import store

    db = store.connect(index_uri)
    tables = store.table_names(db)
    if store.FEATURE_SETS not in tables:
        return CheckOutcome(False, {"index_uri": index_uri}, [f"no {store.FEATURE_SETS} table in {index_uri}"])
    rows = (db.open_table(store.FEATURE_SETS).search().where(f"set_id = {store.sql_str(set_id)}").limit(1)
            .to_list())
    if not rows:
        return CheckOutcome(False, {"index_uri": index_uri}, [f"feature set {set_id!r} is not in {index_uri}"])
    row = rows[0]
    build = f"build_id = {store.sql_str(row['build_id'])}"
    n = int(row["n_features"])
    problems: list[str] = []
    if expected_n_features is not None and n != expected_n_features:
        problems.append(f"set has {n} features, the dictionary has {expected_n_features}")
    n_feature_rows = db.open_table(store.FEATURES).count_rows(build)
    if n_feature_rows != n:
        problems.append(f"{n_feature_rows} rows in {store.FEATURES} for build {row['build_id']}, expected {n}")
    n_example_rows = store.example_rows(row, columns=["feature"], db=db).num_rows if store.EXAMPLES in tables else 0
    if not 0 < n_example_rows <= 2 * n:
        problems.append(f"{n_example_rows} rows in {store.EXAMPLES}, expected 1..{2 * n}")
    vectors = row.get("vectors_table")
    n_vectors = db.open_table(vectors).count_rows() if vectors and vectors in tables else None
    if n_vectors != n:
        problems.append(f"vectors table {vectors!r} has {n_vectors} rows, expected {n}")
    missing_indexes = []
    # A vectors table smaller than store.INDEX_SLACK_ROWS is scanned: as quick as its index would be.
    indexed_vectors = {vectors: ("index",)} if vectors and n >= store.INDEX_SLACK_ROWS else {}
    for name, columns in {**REQUIRED_SCALAR_INDEXES, **indexed_vectors}.items():
        if name not in tables:
            missing_indexes.append(f"{name} (no table)")
            continue
        have = _indexed_columns(db.open_table(name))
        missing_indexes += [f"{name}.{c}" for c in columns if c not in have]
    if missing_indexes:
        problems.append(f"scalar indexes missing: {missing_indexes}")
    metadata = {"set_id": set_id, "build_id": row["build_id"], "n_features": n, "expected_n_features":
                expected_n_features, "feature_rows": n_feature_rows, "example_rows": n_example_rows,
                "vector_rows": n_vectors, "missing_indexes": missing_indexes}
    return CheckOutcome(not problems, metadata, problems)


def check_coverage(index_uri: str, set_id: str) -> CheckOutcome:
    """A set built or grown by merges: its saved state names every clip once, the clip count of the pointer row,
    of the state and of the coverage agree, every clip its examples name is in the clips table, and every
    example's trace reference names a row and position holding that clip's trace."""
    from freud_pipeline.features import store

    row = store.current_set(set_id, index_uri)
    if row is None:
        return CheckOutcome(False, {"set_id": set_id}, [f"feature set {set_id!r} is not in {index_uri}"])
    problems: list[str] = []
    try:
        clip_ids = [str(c) for c in store.load_state(row)["mining.clip_ids"]]
    except store.StateError as exc:
        return CheckOutcome(False, {"set_id": set_id}, [str(exc)])
    twice = len(clip_ids) - len(set(clip_ids))
    if twice:
        problems.append(f"{twice} clip(s) counted more than once")
    coverage = json.loads(row["coverage"]) if row.get("coverage") else {}
    counts = {"pointer row": int(row["n_clips"]), "state": len(clip_ids), "coverage": coverage.get("n_clips")}
    if len(set(counts.values())) != 1:
        problems.append(f"clip counts disagree: {counts}")
    db = store.connect(index_uri)
    examples = store.example_rows(row, columns=["clip_ids"], db=db)
    named = set(pc.list_flatten(examples["clip_ids"]).unique().to_pylist()) if examples.num_rows else set()
    known = (set(db.open_table(store.CLIPS).search().select(["clip_id"]).limit(None).to_arrow()["clip_id"]
                 .to_pylist()) if store.CLIPS in store.table_names(db) else set())
    missing = sorted(named - known)
    if missing:
        problems.append(f"{len(missing)} example clip(s) not in the clips table, e.g. {missing[:3]}")
    unknown = sorted(named - set(clip_ids))
    if unknown:
        problems.append(f"{len(unknown)} example clip(s) the set does not cover, e.g. {unknown[:3]}")
    if examples.num_rows:
        problems += store.broken_trace_references(row, db)  # a merge's rows name where their traces are
    metadata = {"set_id": set_id, "build_id": row["build_id"], **{f"n_clips_{k.split()[0]}": v for k, v in
                                                                   counts.items()},
                "partitions": len(coverage.get("partitions", [])), "example_clips": len(named)}
    return CheckOutcome(not problems, metadata, problems)


def sae_dictionary_size(checkpoint_dir: str | Path) -> int:
    """d_sae from a checkpoint's cfg.json, without loading the weights."""
    from freud_pipeline.sae.checkpoint import CFG_FILE

    return int(json.loads((Path(checkpoint_dir) / CFG_FILE).read_text())["d_sae"])


def shard_width(directory: str | Path, hook: str) -> int:
    """Width of `hook` in a shard directory, from its shards.json."""
    spec = json.loads((Path(directory) / MANIFEST).read_text())["spec"]
    return int(dict(zip(spec["hooks"], spec["widths"]))[hook])


# --- run config files (`freud collect --config`) -----------------------------------------------------------


def load_run_config(path: str | Path) -> dict:
    """A run config file, {asset: name, partition: key (optional), config: {...}}, read and checked for shape.
    Every problem (missing file, malformed YAML, wrong shape) is a FreudError naming the file and the problem."""
    import yaml

    from freud_pipeline.errors import FreudError

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FreudError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FreudError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FreudError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FreudError(f"{path}: a config file is a mapping (asset:, partition:, config:), not a "
                         f"{type(data).__name__}")
    if not isinstance(data.get("asset"), str) or not data["asset"]:
        raise FreudError(f"{path}: a config file names the asset to materialise under 'asset:'")
    if not isinstance(data.get("config") or {}, dict):
        raise FreudError(f"{path}: 'config:' must be a mapping of the asset's settings")
    partition = data.get("partition")
    if partition is not None and not isinstance(partition, str):
        raise FreudError(f"{path}: 'partition:' must be a string, not {partition!r}")
    return data


def _yaml_problem(exc) -> str:
    """One line: what the YAML parser found and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def check_run_config(run: dict, path: str | Path) -> None:
    """Hook names in a run config, checked before any run starts: each must be a hook point of the config's
    Whisper model (read from the checkpoint's dimensions, without loading its weights). A config with a single
    `hook` (SAE, neuron index) and no model gets the name's form checked; the run checks it against its shards.
    Raises FreudError (HookError, ModelError) naming the file."""
    from freud_pipeline.errors import FreudError, HookError

    config = run.get("config") or {}
    hooks = config.get("hooks", [config["hook"]] if "hook" in config else None)
    if hooks is None:
        return
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise HookError(f"{path}: hooks must be a list of hook point names, not {hooks!r}")
    try:
        if "model" in config or "hooks" in config:
            _check_model_hooks(str(config.get("model", "tiny.en")), hooks)
        else:
            _check_hook_form(hooks)
    except FreudError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _check_model_hooks(model: str, hooks: list[str]) -> None:
    from types import SimpleNamespace

    import torch
    import whisper

    from freud_pipeline.whisper.hooks import validate_hooks
    from freud_pipeline.whisper.models import resolve_model

    checkpoint = resolve_model(model).checkpoint
    try:
        dims = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["dims"]
    except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
        dims = torch.load(checkpoint, map_location="cpu", weights_only=True)["dims"]
    validate_hooks(SimpleNamespace(dims=whisper.model.ModelDimensions(**dims)), hooks)


def _check_hook_form(hooks: list[str]) -> None:
    import re

    from freud_pipeline.errors import HookError

    form = re.compile(r"^encoder\.(blocks\.\d+(\.attn|\.mlp\.[012])?|ln_post)$")
    bad = [h for h in hooks if not form.match(h)]
    if bad:
        raise HookError(f"unknown hook point(s) {', '.join(map(repr, bad))}: hook points are encoder.blocks.<i>, "
                        f"encoder.blocks.<i>.attn, encoder.blocks.<i>.mlp.0|1|2 and encoder.ln_post "
                        f"(`freud hooks` lists a model's)")
