"""Mine, label and publish one feature set; merge new clips into a published one.

`build_feature_set` mines every clip given; `merge_into_feature_set` mines only new clips and merges them with the
state the set's current build saved (the miner's accumulators and the label collector's) and its stored examples,
so old activations are never read again. Both publish a new build the same way (readers keep the old build until
the new one is complete) and record what it covers (`features.coverage`). The merge of A and B equals the build of
A+B (A's clips first): every streaming statistic is mergeable, and the random draws are per clip.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from freud_pipeline import blas
from freud_pipeline.audio.decode import load_audio
from freud_pipeline.errors import FreudError
from freud_pipeline.features import store
from freud_pipeline.features import coverage as cov
from freud_pipeline.features.labels import LabelCollector
from freud_pipeline.features.mining import (ExampleLists, MiningError, MiningResult, MiningState, merge_lists,
                                            merge_mining, mine_features, result_from_state)
from freud_pipeline.frames import frame_loudness_db

log = logging.getLogger(__name__)


@blas.one_thread
def build_feature_set(
    clips_iter: Iterable[tuple[str, Any]],
    *,
    set_id: str,
    model: str,
    hook: str,
    kind: str,
    manifest_df: pd.DataFrame | None,
    alignments_df: pd.DataFrame | None = None,
    index_uri: str | None = None,
    sae_run_id: str | None = None,
    sae_checkpoint: str | None = None,
    sae_sha256: str | None = None,
    shard_dir: str | None = None,
    decoder: np.ndarray | None = None,
    top_k: int = 32,
    n_features: int | None = None,
    fire_threshold: float = 0.0,
    trace_radius: int = 750,
    occurrences_per_phone: int = 64,
    heldout_speakers: list[str] | None = None,
    label_split: dict | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    coverage: dict | None = None,
) -> dict[str, Any]:
    """Mine `clips_iter` ((clip_id, acts[frames, n_features]); SAE sets pass latents, see
    `mining.encoded_clips`), label against `alignments_df` when given, and publish as `set_id`.

    decoder: SAE decoder directions [n_features, d_in] (similarity = decoder cosine); neuron sets use the
    activation signature. sae_run_id / sae_checkpoint / sae_sha256: the SAE run an SAE set's latents come from,
    its checkpoint directory and the weights' sha256 (`sae.checkpoint.checkpoint_sha256`), which every later
    load of the set's SAE is verified against. fire_threshold: a frame "fires" above it (density); 0 suits SAE
    latents and GELU neurons (positive exactly when the pre-activation is), signed hooks may want a larger one.
    Labels are learned on some aligned clips and validated on the others (`labels.heldout_split`: by the
    manifest's `speaker` column when it names several, or `heldout_speakers`; else a fixed half of the clips).
    data_root: the root the manifest's `path` column is relative to; with it, each aligned clip's audio is read
    once more during the pass for its per-frame loudness (the loudness artefact test; an unreadable clip has no
    loud frames). label_split: hold clips out as this earlier split did (a collector's `split_info`), e.g. the
    corpus' own split when later batches join. coverage: what the clips are (`features.coverage`), recorded with
    the build. Returns a summary (set_id, build_id, n_features, n_clips, n_frames, label_summary, seconds).
    """
    if kind not in store.KINDS:
        raise MiningError(f"kind must be one of {store.KINDS}, got {kind!r}")
    started = time.monotonic()
    clips_iter = iter(clips_iter)
    first = next(clips_iter, None)
    if first is None:
        raise MiningError(f"no clips given for feature set {set_id!r}")
    n_features = int(n_features or first[1].shape[1])
    if decoder is not None:
        decoder = np.asarray(decoder, dtype=np.float32)
        if decoder.ndim != 2 or decoder.shape[0] != n_features:
            raise MiningError(f"decoder must be [n_features={n_features}, d_in], got {decoder.shape}; "
                              f"transpose a [d_in, n_latents] weight")
    collector = (LabelCollector(alignments_df, n_features, top_k, occurrences_per_phone, seed, manifest=manifest_df,
                                heldout_speakers=heldout_speakers, fire_threshold=fire_threshold,
                                loudness=clip_loudness(manifest_df, data_root), split=label_split)
                 if alignments_df is not None and len(alignments_df) else None)

    def all_clips():
        yield first
        yield from clips_iter

    mining = mine_features(
        all_clips(), n_features, top_k, trace_radius,
        bottom_k=0 if kind == "sae" else top_k,  # SAE latents are never negative: no bottom lists
        fire_threshold=fire_threshold, observers=[collector] if collector else [], seed=seed)
    mined = time.monotonic()
    try:
        labels = collector.result() if collector else None
        row = store.write_feature_set(
            set_id=set_id, model=model, hook=hook, kind=kind, mining=mining, labels=labels,
            manifest=manifest_df, vectors=decoder, vector_kind="decoder" if decoder is not None else "signature",
            sae_run_id=sae_run_id, sae_checkpoint=sae_checkpoint, sae_sha256=sae_sha256, shard_dir=shard_dir,
            uri=index_uri, coverage=coverage, merge_state=_state_arrays(mining, collector))
    finally:
        mining.close()
    summary = {
        "set_id": set_id,
        "build_id": row["build_id"],
        "uri": index_uri or store.lancedb_uri(),
        "kind": kind,
        "n_features": mining.n_features,
        "n_clips": mining.n_clips,
        "n_frames": mining.n_frames,
        "label_summary": labels.summary if labels else {},
        "mining_seconds": round(mined - started, 2),
        "write_seconds": round(time.monotonic() - mined, 2),
    }
    log.info("feature set %s: %s", set_id, summary)
    return summary


def clip_loudness(manifest_df: pd.DataFrame | None,
                  data_root: str | Path | None) -> Callable[[str], np.ndarray | None] | None:
    """clip id -> `frames.frame_loudness_db` of the clip's audio (data_root / the manifest's `path`), decoded on
    each call and kept nowhere; None for a clip not in the manifest or whose audio cannot be read. None without a
    data root or a manifest with paths."""
    if data_root is None or manifest_df is None or not {"clip_id", "path"} <= set(manifest_df.columns):
        return None
    known = manifest_df.dropna(subset=["path"])
    paths = dict(zip(known["clip_id"].astype(str), known["path"].astype(str)))
    root = Path(data_root)

    def loudness(clip_id: str) -> np.ndarray | None:
        if clip_id not in paths:
            return None
        try:
            return frame_loudness_db(load_audio(root / paths[clip_id]))
        except (FreudError, OSError, ValueError) as error:  # no loud frames for this clip, the build goes on
            log.warning("no loudness for clip %s (%s): %s", clip_id, root / paths[clip_id], error)
            return None

    return loudness


def decoder_directions(sae, batch: int = 2048) -> np.ndarray:
    """[n_latents, d_in] decoder direction of every latent of any SAE (decode(e_i) - decode(0)), to pass as
    `decoder=`; batched so 24,576 latents never need a dense identity matrix."""
    import torch

    n_latents = sae.n_latents
    device = next(sae.parameters()).device
    with torch.inference_mode():
        origin = sae.decode(torch.zeros(1, n_latents, device=device))
        rows = []
        for start in range(0, n_latents, batch):
            size = min(batch, n_latents - start)
            basis = torch.zeros(size, n_latents, device=device)
            basis[torch.arange(size), start + torch.arange(size)] = 1.0
            rows.append((sae.decode(basis) - origin).float().cpu().numpy())
    return np.concatenate(rows)



_LIST_FIELDS = ("values", "clip_index", "peak_frame", "trace_offset", "trace_len")
Refs = dict[str, tuple[np.ndarray, np.ndarray]]  # per sign: (build position, slot), each [F, K] in rank order


def _state_arrays(mining: MiningResult, collector: LabelCollector | None, refs: Refs | None = None
                  ) -> dict[str, np.ndarray]:
    """What a later merge continues from: the miner's accumulators, its ranked lists without traces (which features
    a new clip changes is decided on them), where each entry's trace is stored, and the label collector's state.
    refs: per sign, the position in the example chain of the build whose row holds each entry's trace (-1: the build
    this state belongs to) and its slot there (store: "Traces by reference"); default every trace in the build's own
    rows at its rank."""
    arrays = {f"mining.{k}": v for k, v in mining.state.to_arrays().items()}
    for sign, lists in (("+", mining.top), ("-", mining.bottom)):
        rows = lists.rows(0, mining.n_features, traces=False)
        arrays.update({f"lists.{sign}.{k}": rows[k] for k in _LIST_FIELDS})
        shape = rows["values"].shape
        where, slot = refs[sign] if refs else (np.full(shape, -1), np.tile(np.arange(shape[1]), (shape[0], 1)))
        arrays[f"lists.{sign}.trace_build"] = np.asarray(where, np.int16)
        arrays[f"lists.{sign}.trace_slot"] = np.asarray(slot, np.int32)
    if collector is not None:
        arrays.update({f"labels.{k}": v for k, v in collector.state().items()})
    return arrays


def _stored_mining(row: dict[str, Any], arrays: dict[str, np.ndarray],
                   index_uri: str | None) -> tuple[MiningResult, Refs | None]:
    """The current build of a set as a MiningResult and where its examples' traces are stored (`_state_arrays`'
    refs with -1 resolved to the build's position in its chain). Without traces when the state holds the lists,
    else read back whole from the examples (states saved before); refs None when the state does not say (states
    saved before traces by reference: the next merge rewrites every row)."""
    state = MiningState.from_arrays({k.removeprefix("mining."): v for k, v in arrays.items()
                                     if k.startswith("mining.")})
    if not all(f"lists.{sign}.values" in arrays for sign in store.SIGNS):
        position = {clip: i for i, clip in enumerate(state.clip_ids)}

        def read(sign: str, k: int) -> ExampleLists:
            return ExampleLists.ranked(**store.read_ranked_examples(row, sign, k, position, uri=index_uri))

        return result_from_state(state, read("+", state.top_k), read("-", state.bottom_k)), None

    def lists(sign: str) -> ExampleLists:
        fields = {k: arrays[f"lists.{sign}.{k}"] for k in _LIST_FIELDS}
        return ExampleLists.ranked(**fields, traces=np.zeros((*fields["values"].shape, 0), np.float16))

    result = result_from_state(state, lists("+"), lists("-"))
    chain = store.example_builds(row)
    refs: Refs = {}
    for sign in store.SIGNS:
        if f"lists.{sign}.trace_build" not in arrays:
            return result, None
        where = arrays[f"lists.{sign}.trace_build"].astype(np.int64)
        if (where < 0).any():
            if row["build_id"] not in chain:
                return result, None  # not expected: a build that wrote no rows holds no trace
            where[where < 0] = chain.index(row["build_id"])
        refs[sign] = (where, arrays[f"lists.{sign}.trace_slot"].astype(np.int64))
    return result, refs


def _referenced_examples(old: MiningResult, batch: MiningResult, merged: MiningResult, refs: Refs
                         ) -> tuple[dict[str, np.ndarray], dict[str, ExampleLists], Refs, Refs]:
    """Per sign, the features whose list took one of the batch's clips, their merged lists holding the new clips'
    traces only, and where each entry's trace is (store: "Traces by reference"): an old entry's where `refs` (the
    old state's) says, a new one's in the build being written (-1). No example row is read, and a list the batch
    did not enter keeps its row where it is. Returns (features per sign, their lists per sign, refs of their rows
    [n, K] per sign, refs of every feature [F, K] per sign for the new build's state)."""
    offset = old.n_clips
    written, lists, row_refs, state_refs = {}, {}, {}, {}
    for sign, before, fresh_lists, after in (("+", old.top, batch.top, merged.top),
                                             ("-", old.bottom, batch.bottom, merged.bottom)):
        features = np.flatnonzero((after.clip_index >= offset).any(axis=1))
        clip = after.clip_index[features]  # the lists of a merge and of a state are in rank order
        n, k = clip.shape
        fresh = fresh_lists.subset(features, traces=False)
        traces = np.zeros((n, k, fresh_lists.traces.shape[-1]), np.float16)
        where_old, slot_old = refs[sign]
        where, slot = np.full((n, k), -1, np.int64), np.tile(np.arange(k), (n, 1))
        if k:
            is_old, is_new = (clip >= 0) & (clip < offset), clip >= offset
            source = np.argmax(clip[:, :, None] == before.clip_index[features][:, None, :], axis=2)
            rows = features[:, None]
            where = np.where(is_old, where_old[rows, source], -1)
            slot = np.where(is_old, slot_old[rows, source], slot)
            position = np.argmax((clip - offset)[:, :, None] == fresh.clip_index[:, None, :], axis=2)
            f, r = np.nonzero(is_new)
            traces[f, r] = fresh_lists.traces_at(features[f], position[f, r])
        fields = {name: getattr(after, name)[features] for name in _LIST_FIELDS}
        written[sign], lists[sign] = features, ExampleLists.ranked(**fields, traces=traces)
        row_refs[sign] = (where, slot)
        every_where, every_slot = where_old.copy(), slot_old.copy()
        every_where[features], every_slot[features] = where, slot
        state_refs[sign] = (every_where, every_slot)
    return written, lists, row_refs, state_refs


def _all_examples(row: dict[str, Any], old: MiningResult, batch: MiningResult, index_uri: str | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, ExampleLists], list]:
    """Every feature's merged lists with their traces: the stored rows read back (traces resolved) and merged with
    the batch's, for a merge that rewrites every row. Returns (features per sign: all, lists per sign, spills to
    clean up)."""
    offset = old.n_clips
    features = np.arange(old.n_features)
    position = {clip: i for i, clip in enumerate(old.clip_ids)}
    lists, spills = {}, []
    for sign, k, fresh, direction in (("+", old.top_k, batch.top, 1), ("-", old.state.bottom_k, batch.bottom, -1)):
        stored = ExampleLists.ranked(**store.read_ranked_examples(row, sign, k, position, features, index_uri))
        lists[sign], spill = merge_lists(stored, fresh.subset(features), offset, direction, old.state.max_frames)
        spills.append(spill)
    return {sign: features for sign in store.SIGNS}, lists, spills


@blas.one_thread
def merge_into_feature_set(
    clips_iter: Iterable[tuple[str, Any]],
    *,
    set_id: str,
    manifest_df: pd.DataFrame | None,
    alignments_df: pd.DataFrame | None = None,
    index_uri: str | None = None,
    coverage_entries: Iterable[dict] = (),
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Merge new clips (clip_id, acts) into the published set `set_id` (same kind of activations as its build:
    neuron activations, or the same SAE's latents) and publish the result as a new build.

    Clips the set already holds are skipped (so a batch merged twice changes nothing); with no new clip, nothing is
    written (`merged` False, with the reason). Labels: the batch's aligned clips are observed with the set's
    held-out rule and merged with the set's label state. `coverage_entries` are added to the set's coverage.
    Returns a summary like `build_feature_set`'s plus n_clips_before, n_new_clips, n_skipped_clips, merged."""
    started = time.monotonic()
    db = store.connect(index_uri)
    row = store.current_set(set_id, index_uri, db)
    if row is None:
        raise MiningError(f"no feature set {set_id!r} in {index_uri or store.lancedb_uri()} to merge into; build it "
                          "first")
    arrays, state_verified = store.open_state(row)  # hashed while the batch is mined; checked before the merge
    old, refs = _stored_mining(row, arrays, index_uri)
    label_state = {k.removeprefix("labels."): v for k, v in arrays.items() if k.startswith("labels.")}
    old_labels = LabelCollector.from_state(label_state) if label_state else None
    known, skipped = set(old.clip_ids), []
    build_id = store.new_build_id(set_id)
    beside: dict[str, Any] = {}  # rows written in threads while the main thread mines and judges (see below)

    def new_clips():
        for clip_id, acts in clips_iter:
            if str(clip_id) in known:
                skipped.append(str(clip_id))
                continue
            if "clips" not in beside and acts.shape[0] and manifest_df is not None and len(manifest_df):
                # The batch's first new clip: its manifest rows are upserted while the batch is mined.
                beside["clips"] = store.upsert_clips_beside(index_uri, manifest_df)
            yield clip_id, acts

    collector = None
    if old_labels is not None and alignments_df is not None and len(alignments_df):
        collector = LabelCollector(
            alignments_df, old.n_features, old_labels.top_k, old_labels.per_phone, old_labels.seed,
            manifest=manifest_df, fire_threshold=old_labels.fire_threshold, split=old_labels.split_info,
            loudness=clip_loudness(manifest_df, data_root) if old_labels.loudness_tested else None)
    state = old.state
    base = {"set_id": set_id, "n_clips_before": old.n_clips, "n_skipped_clips": 0, "merged": False}
    try:
        batch = mine_features(new_clips(), state.n_features, state.top_k, state.max_frames // 2,
                              bottom_k=state.bottom_k, fire_threshold=state.fire_threshold,
                              sample_frames=state.sample_frames, signature_dim=state.signature_dim,
                              observers=[collector] if collector else [], seed=state.seed,
                              after=old)  # no trace kept for a clip that cannot enter a list
    except MiningError:
        old.close()
        store.settle(*beside.values())
        state_verified()
        reason = "every clip is already in the set" if skipped else "no clips with activations"
        return {**base, "n_new_clips": 0, "n_skipped_clips": len(skipped), "n_clips": old.n_clips, "reason": reason}
    except BaseException:
        old.close()
        store.settle(*beside.values())
        raise
    spills, handed_over = [], False
    try:
        state_verified()
        # Ranked without traces: only the features whose lists took a new clip get new example rows, holding the
        # new clips' traces and naming where the others' are; the other features' rows are carried over (store:
        # "Examples carried over", "Traces by reference"), unless the chain of builds holding them is full or the
        # state predates the lists or the references: then every row is rewritten with its traces read back.
        merged = merge_mining(old, batch, traces=False, into_b=True)  # the batch's sums are not used again
        everything = refs is None or len(store.example_builds(row)) >= store.MAX_EXAMPLE_BUILDS
        if everything:
            changed, lists, spills = _all_examples(row, old, batch, index_uri)
            row_refs = state_refs = None
        else:
            changed, lists, row_refs, state_refs = _referenced_examples(old, batch, merged, refs)
            # The rewritten example rows do not depend on the labels: written in a thread while they are judged.
            beside["examples"] = store.write_examples_beside(index_uri, build_id, set_id, merged.clip_ids,
                                                             (changed, lists, row_refs), row)
        labels_state = old_labels.merge(collector) if collector is not None else old_labels
        # The merged state is complete: its file is written and hashed in a thread while the labels are judged and
        # the rows written (write_feature_set waits for it before the flip, and removes it if the build fails).
        saving = store.save_state_beside(index_uri, set_id, _state_arrays(merged, labels_state, state_refs), build_id)
        try:
            labels = labels_state.result() if labels_state is not None else None
            decoder = row["vector_kind"] == "decoder"  # an SAE's decoder directions do not change: a shared table
            new_coverage = cov.extended(json.loads(row["coverage"]) if row.get("coverage") else None,
                                        coverage_entries)
        except BaseException:
            saving.discard()
            raise
        handed_over = True
        written = store.write_feature_set(
            set_id=set_id, model=row["model"], hook=row["hook"], kind=row["kind"], mining=merged, labels=labels,
            manifest=manifest_df, vector_kind=row["vector_kind"], sae_run_id=row["sae_run_id"],
            sae_checkpoint=row["sae_checkpoint"], sae_sha256=row["sae_sha256"], shard_dir=row["shard_dir"],
            uri=index_uri, coverage=new_coverage, merge_state=saving, changed_examples=(changed, lists, row_refs),
            carried_from=None if everything else row, vectors_table=row["vectors_table"] if decoder else None,
            clips_beside=beside.get("clips"), examples_beside=beside.get("examples"), db=db)
    except BaseException:
        if not handed_over:  # (write_feature_set settles and discards what it was given itself)
            store.settle(*beside.values())  # no write of this merge goes on after it failed
            if "examples" in beside:  # nor any row of it
                store.discard_rows(index_uri, build_id, db)
        raise
    finally:
        for result in (old, batch):
            result.close()
        for spill in spills:
            spill.cleanup()
    summary = {**base, "merged": True, "build_id": written["build_id"], "n_new_clips": batch.n_clips,
               "n_changed_features": len(np.union1d(changed["+"], changed["-"])),
               "n_changed_lists": {sign: len(features) for sign, features in changed.items()},
               "n_skipped_clips": len(skipped), "n_clips": merged.n_clips, "n_frames": merged.n_frames,
               "label_summary": labels.summary if labels else {}, "coverage": new_coverage,
               "merge_seconds": round(time.monotonic() - started, 2)}
    log.info("merged %d clip(s) into %s: %s", batch.n_clips, set_id, {k: summary[k] for k in ("n_clips", "build_id")})
    return summary
