"""Feature index assets: top examples, statistics and labels of MLP neurons and SAE features in LanceDB.

The default sets cover the default corpus and every incoming batch collected so far (`IndexSource`s); each build
records that coverage. `incoming_index` merges one new batch into them without re-reading the old activations
(`features.build.merge_into_feature_set`); a full rebuild over the same sources gives the same set. Labels of the
default sets are held out as the default corpus alone would hold them out (speakers or clips), whatever arrives
later, so merges and rebuilds agree.
"""

from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import dagster as dg
import pandas as pd
import torch

from freud_pipeline.activations import ActivationReader
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.audio.datasets.incoming import read_batch
from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.incoming import INCOMING, batches_dir, incoming_partitions
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.features import coverage as cov
from freud_pipeline.features.build import build_feature_set, decoder_directions, merge_into_feature_set
from freud_pipeline.features.labels import heldout_split
from freud_pipeline.features.mining import encoded_clips
from freud_pipeline.sae.selection import incoming_batch, incoming_batches

GROUP = "features"


class NeuronIndexConfig(dg.Config):
    hook: str = "encoder.blocks.2.mlp.1"
    top_k: int = 32


def _corpus(default_corpus: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    manifest = load_manifest(default_corpus["manifest_path"])
    alignments = default_corpus.get("alignments_path")
    return manifest, (pd.read_parquet(alignments) if alignments else None)


@dataclass
class IndexSource:
    """One partition feeding the default feature sets: its shards, its clips' manifest rows (with provenance
    columns dataset / batch / arrived_at) and alignments."""

    dataset: str
    partition: str
    directory: str
    manifest: pd.DataFrame
    alignments: pd.DataFrame | None
    extra: dict = field(default_factory=dict)

    def reader(self) -> ActivationReader:
        return ActivationReader(self.directory)

    def coverage_entry(self, reader: ActivationReader) -> dict:
        return cov.partition_entry(self.dataset, self.partition, len(reader.clip_ids()), reader.n_frames,
                                   **self.extra)


def corpus_sources(activations: dict, corpus: dict) -> list[IndexSource]:
    manifest, alignments = _corpus(corpus)
    manifest = manifest.assign(dataset="default_corpus")
    return [IndexSource("default_corpus", split, directory, manifest[manifest["split"] == split], alignments)
            for split, directory in sorted(split_dirs(activations).items())]


def incoming_source(storage: FreudStorage, key: str, model: str, directory: Path | None = None) -> IndexSource | None:
    """Batch `key` of the watched folder, when its activations for `model` are complete and hold frames; else None
    (every file of the batch was unreadable, or it has not been collected)."""
    if directory is None:
        directory = incoming_batch(storage.root, model, key)  # this batch only: no other batch is re-checked
    manifest_path = storage.root / "datasets" / INCOMING / key / "manifest.parquet"
    if directory is None or not manifest_path.is_file():
        return None
    arrived = read_batch(batches_dir(storage), key)["recorded_at"]
    manifest = load_manifest(manifest_path).assign(dataset=INCOMING, batch=key, arrived_at=arrived)
    alignments_path = manifest_path.with_name("alignments.parquet")
    alignments = pd.read_parquet(alignments_path) if alignments_path.is_file() else None
    return IndexSource(INCOMING, key, str(directory), manifest, alignments, {"batch": key, "arrived_at": arrived})


def incoming_sources(storage: FreudStorage, model: str) -> list[IndexSource]:
    """Every collected incoming batch, oldest first (the batches the SAE's training selection takes too)."""
    found = (incoming_source(storage, key, model, directory) for key, directory in incoming_batches(storage.root, model))
    return [source for source in found if source is not None]


def _combined(sources: list[IndexSource]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    manifest = pd.concat([s.manifest for s in sources], ignore_index=True).drop_duplicates("clip_id", keep="first")
    aligned = [s.alignments for s in sources if s.alignments is not None and len(s.alignments)]
    return manifest, (pd.concat(aligned, ignore_index=True) if aligned else None)


def corpus_label_split(corpus: dict) -> dict | None:
    """How the default corpus alone holds clips out for label validation (`labels.heldout_split`'s description),
    which the default sets keep whatever arrives later."""
    manifest, alignments = _corpus(corpus)
    if alignments is None or not len(alignments):
        return None
    return heldout_split(alignments["clip_id"].astype(str).unique(), manifest)[1]


def _summary_metadata(summary: dict) -> dict:
    return {k: (dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v) for k, v in summary.items()
            if isinstance(v, (int, float, str, dict, list))}


def _neuron_set(context: dg.AssetExecutionContext, config: NeuronIndexConfig, storage: FreudStorage,
                activations: dict, corpus: dict, suffix: str = "", heldout_speakers: list[str] | None = None,
                sources: list[IndexSource] | None = None, label_split: dict | None = None) -> dict:
    """The neuron set over `sources` (default: every partition of `activations` of `corpus`)."""
    sources = sources or corpus_sources(activations, corpus)
    manifest, alignments = _combined(sources)
    readers = [s.reader() for s in sources]
    model = next(iter(activations.values()))["model"]
    set_id = f"{model}/{config.hook}{suffix}"
    summary = build_feature_set(
        chain.from_iterable(r.iter_clips(config.hook, dtype="float32") for r in readers),
        set_id=set_id, model=model, hook=config.hook, kind="neuron",
        manifest_df=manifest, alignments_df=alignments, index_uri=storage.index_uri, top_k=config.top_k,
        heldout_speakers=heldout_speakers, label_split=label_split, data_root=storage.root,
        coverage=cov.extended(None, [s.coverage_entry(r) for s, r in zip(sources, readers)]),
    )
    context.add_output_metadata(_summary_metadata(summary))
    return {"set_id": set_id, "index_uri": storage.index_uri}


@dg.asset(group_name=GROUP, kinds={"lancedb"}, pool="lancedb_writer",
          description="Every MLP neuron's top positive and negative clips, statistics and phone/word labels.")
def neuron_feature_index(
    context: dg.AssetExecutionContext, config: NeuronIndexConfig, storage: FreudStorage,
    activations: dict, default_corpus: dict,
) -> dict:
    model = next(iter(activations.values()))["model"]
    sources = corpus_sources(activations, default_corpus) + incoming_sources(storage, model)
    return _neuron_set(context, config, storage, activations, default_corpus, sources=sources,
                       label_split=corpus_label_split(default_corpus))


class LargeNeuronIndexConfig(NeuronIndexConfig):
    # Labels are learned on the other aligned speakers and validated on these: by default the Festival voice the
    # large corpus holds out (its test split), so a label's held-out precision is measured on a voice it never saw.
    heldout_speakers: list[str] = ["ked"]


@dg.asset(group_name="large_corpus", kinds={"lancedb"}, pool="lancedb_writer",
          description="The neuron index over every split of the large corpus (set <model>/<hook>/large_corpus): "
                      "labels learned on the training voices and speakers, validated on the held-out voice.")
def large_corpus_neuron_index(
    context: dg.AssetExecutionContext, config: LargeNeuronIndexConfig, storage: FreudStorage,
    large_corpus_activations: dict, large_corpus: dict,
) -> dict:
    return _neuron_set(context, config, storage, large_corpus_activations, large_corpus, "/large_corpus",
                       config.heldout_speakers)


@dg.asset(group_name=GROUP, kinds={"lancedb"}, pool="lancedb_writer",
          description="Every SAE feature's top clips, statistics, labels and decoder direction; then the retention "
                      "rule: SAE runs other than the champion and the last keep_runs go, with their sets.")
def sae_feature_index(
    context: dg.AssetExecutionContext, storage: FreudStorage, activations: dict, default_corpus: dict,
    topk_sae: dict,
) -> dict:
    from freud_pipeline.sae.checkpoint import checkpoint_sha256, load_verified
    from freud_pipeline.sae.retention import prune_runs

    run_id, quality = topk_sae["run_id"], topk_sae.get("quality") or {}
    if not quality.get("passed"):  # the blocking sae_quality check stops this too; this holds when run alone
        raise dg.Failure(f"SAE run {run_id} failed its quality check ({'; '.join(quality.get('failures') or [])}): "
                         "it is not indexed, and the index keeps the sets it has")
    sha256 = topk_sae.get("sha256") or checkpoint_sha256(topk_sae["checkpoint_dir"])  # older outputs lack it
    sae = load_verified(topk_sae["checkpoint_dir"], sha256)
    sources = corpus_sources(activations, default_corpus) + incoming_sources(storage, topk_sae["model"])
    manifest, alignments = _combined(sources)
    readers = [s.reader() for s in sources]
    set_id = f"{topk_sae['model']}/{topk_sae['hook']}/sae-{topk_sae['architecture']}-{run_id[:8]}"
    clips = chain.from_iterable(r.iter_clips(topk_sae["hook"], dtype="float32") for r in readers)

    def encode(acts):
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(acts)).numpy()

    summary = build_feature_set(
        encoded_clips(clips, encode), set_id=set_id, model=topk_sae["model"], hook=topk_sae["hook"], kind="sae",
        manifest_df=manifest, alignments_df=alignments, index_uri=storage.index_uri,
        sae_run_id=run_id, sae_checkpoint=storage.portable(topk_sae["checkpoint_dir"]), sae_sha256=sha256,
        decoder=decoder_directions(sae), data_root=storage.root, label_split=corpus_label_split(default_corpus),
        coverage=cov.extended(None, [s.coverage_entry(r) for s, r in zip(sources, readers)]),
    )
    if topk_sae.get("runs_dir"):  # runs of the immutable layout only (not a checkpoint written in place)
        champion = (topk_sae.get("registry") or {}).get("champion_run_id")
        removed = prune_runs(topk_sae["runs_dir"], topk_sae.get("keep_runs", 3), keep=[run_id, champion],
                             index_uri=storage.index_uri)
        summary["removed_sae_runs"] = removed
        if removed:
            context.log.info(f"retention: removed SAE run(s) {', '.join(removed)} and their feature sets")
    context.add_output_metadata(_summary_metadata(summary))
    return {"set_id": set_id, "index_uri": storage.index_uri}


class IncomingIndexConfig(dg.Config):
    # Sets to merge the batch into; empty: every set that covers the default corpus with this batch's model and a
    # hook its activations hold (the neuron set and the SAE sets).
    sets: list[str] = []


def _targets(config: IncomingIndexConfig, storage: FreudStorage, model: str, hooks: list[str]) -> list[dict]:
    from freud_pipeline.features.query import FeatureIndex

    try:
        rows = FeatureIndex(storage.index_uri).sets()
    except Exception:  # no index yet: nothing to merge into (the first full build will cover the batch)
        return []
    if config.sets:
        return [r for r in rows if r["set_id"] in config.sets]
    return [r for r in rows if r["model"] == model and r["hook"] in hooks
            and any(p["dataset"] == "default_corpus" for p in (r.get("coverage") or {}).get("partitions", []))]


@dg.asset(name="incoming_index", group_name="incoming", kinds={"lancedb"}, pool="lancedb_writer",
          partitions_def=incoming_partitions, deps=["neuron_feature_index", "sae_feature_index"],
          description="Merges one incoming batch into the default feature sets (neuron and SAE): its clips' examples, "
                      "statistics, histograms and labels combined with the set's, old activations not re-read. A "
                      "batch a set already covers is skipped, so re-materialising changes nothing.")
def incoming_index(context: dg.AssetExecutionContext, config: IncomingIndexConfig, storage: FreudStorage,
                   incoming_audio: dict, incoming_activations: dict) -> dict:
    from freud_pipeline.sae.checkpoint import load_verified

    key, model = context.partition_key, incoming_activations["model"]
    source = incoming_source(storage, key, model)
    merged: dict[str, dict] = {}
    if source is None:
        context.log.info(f"batch {key}: no activations (no file of it decoded); nothing to merge")
        return {"batch": key, "index_uri": storage.index_uri, "sets": merged}
    reader = source.reader()
    targets = _targets(config, storage, model, reader.hooks)
    if not targets:
        context.log.info(f"batch {key}: no default feature set to merge into yet; the first full build covers it")
    for row in targets:
        set_id = row["set_id"]
        if cov.covers(row.get("coverage"), INCOMING, key):
            merged[set_id] = {"merged": False, "reason": "already covers this batch", "n_clips": row["n_clips"]}
            continue
        clips = reader.iter_clips(row["hook"], dtype="float32")
        if row["kind"] == "sae":
            sae = load_verified(row["sae_checkpoint"], row["sae_sha256"])

            def encode(acts, sae=sae):
                with torch.inference_mode():
                    return sae.encode(torch.from_numpy(acts)).numpy()

            clips = encoded_clips(clips, encode)
        summary = merge_into_feature_set(
            clips, set_id=set_id, manifest_df=source.manifest, alignments_df=source.alignments,
            index_uri=storage.index_uri, coverage_entries=[source.coverage_entry(reader)], data_root=storage.root)
        merged[set_id] = {k: summary.get(k) for k in ("merged", "reason", "n_clips_before", "n_new_clips",
                                                       "n_skipped_clips", "n_clips", "build_id", "merge_seconds")}
        context.log.info(f"batch {key} -> {set_id}: {merged[set_id]}")
    context.add_output_metadata({"batch": key, "sets": dg.MetadataValue.json(merged),
                                 "n_sets_merged": sum(bool(m.get("merged")) for m in merged.values())})
    return {"batch": key, "index_uri": storage.index_uri, "sets": merged}
