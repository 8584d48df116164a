"""Feature index assets: top examples, statistics and labels of MLP neurons and SAE features in LanceDB."""


from itertools import chain

import dagster as dg
import pandas as pd
import torch

from freud_pipeline.activations import ActivationReader
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.features.build import build_feature_set, decoder_directions
from freud_pipeline.features.mining import encoded_clips

GROUP = "features"


class NeuronIndexConfig(dg.Config):
    hook: str = "encoder.blocks.2.mlp.1"
    top_k: int = 32


def _corpus(default_corpus: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    manifest = load_manifest(default_corpus["manifest_path"])
    alignments = default_corpus.get("alignments_path")
    return manifest, (pd.read_parquet(alignments) if alignments else None)


def _readers(activations: dict) -> list[ActivationReader]:
    return [ActivationReader(path) for path in split_dirs(activations).values()]


def _summary_metadata(summary: dict) -> dict:
    return {k: (dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v) for k, v in summary.items()
            if isinstance(v, (int, float, str, dict, list))}


def _neuron_set(context: dg.AssetExecutionContext, config: NeuronIndexConfig, storage: FreudStorage,
                activations: dict, corpus: dict, suffix: str = "", heldout_speakers: list[str] | None = None) -> dict:
    manifest, alignments = _corpus(corpus)
    readers = _readers(activations)
    model = next(iter(activations.values()))["model"]
    set_id = f"{model}/{config.hook}{suffix}"
    summary = build_feature_set(
        chain.from_iterable(r.iter_clips(config.hook, dtype="float32") for r in readers),
        set_id=set_id, model=model, hook=config.hook, kind="neuron",
        manifest_df=manifest, alignments_df=alignments, index_uri=storage.index_uri, top_k=config.top_k,
        heldout_speakers=heldout_speakers, data_root=storage.root,
    )
    context.add_output_metadata(_summary_metadata(summary))
    return {"set_id": set_id, "index_uri": storage.index_uri}


@dg.asset(group_name=GROUP, kinds={"lancedb"}, pool="lancedb_writer",
          description="Every MLP neuron's top positive and negative clips, statistics and phone/word labels.")
def neuron_feature_index(
    context: dg.AssetExecutionContext, config: NeuronIndexConfig, storage: FreudStorage,
    activations: dict, default_corpus: dict,
) -> dict:
    return _neuron_set(context, config, storage, activations, default_corpus)


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
    manifest, alignments = _corpus(default_corpus)
    readers = _readers(activations)
    set_id = f"{topk_sae['model']}/{topk_sae['hook']}/sae-{topk_sae['architecture']}-{run_id[:8]}"
    clips = chain.from_iterable(r.iter_clips(topk_sae["hook"], dtype="float32") for r in readers)

    def encode(acts):
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(acts)).numpy()

    summary = build_feature_set(
        encoded_clips(clips, encode), set_id=set_id, model=topk_sae["model"], hook=topk_sae["hook"], kind="sae",
        manifest_df=manifest, alignments_df=alignments, index_uri=storage.index_uri,
        sae_run_id=run_id, sae_checkpoint=topk_sae["checkpoint_dir"], sae_sha256=sha256,
        decoder=decoder_directions(sae), data_root=storage.root,
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
