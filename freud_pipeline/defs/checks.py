"""Asset checks on manifests, activation shards and the feature index (logic in freud_pipeline.validation).

Manifest and shard checks are blocking: a broken manifest must not be collected, broken shards must not train
an SAE or feed the index, so a failure stops the downstream assets of the same run. Index checks report only
(nothing in the pipeline reads the index after it is built).
"""

import dagster as dg
import pandas as pd

from freud_pipeline import validation
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.incoming import incoming_partitions
from freud_pipeline.defs.partitions import split_partitions
from freud_pipeline.defs.resources import FreudStorage


def _result(outcome: validation.CheckOutcome) -> dg.AssetCheckResult:
    metadata = {k: (dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v)
                for k, v in outcome.metadata.items() if v is not None}
    return dg.AssetCheckResult(passed=outcome.passed, metadata=metadata, description=outcome.description)


def _manifest(dataset: dict, storage: FreudStorage) -> dg.AssetCheckResult:
    return _result(validation.check_manifest(dataset["manifest_path"], storage.root))


MANIFEST_DOC = "Manifest has the required columns, unique clip ids, positive durations, and every file on disk."


@dg.asset_check(asset="asterisk_prompts", name="manifest_valid", blocking=True, description=MANIFEST_DOC)
def asterisk_prompts_manifest(storage: FreudStorage, asterisk_prompts: dict) -> dg.AssetCheckResult:
    return _manifest(asterisk_prompts, storage)


@dg.asset_check(asset="festival_speech", name="manifest_valid", blocking=True, description=MANIFEST_DOC)
def festival_speech_manifest(storage: FreudStorage, festival_speech: dict) -> dg.AssetCheckResult:
    return _manifest(festival_speech, storage)


@dg.asset_check(asset="default_corpus", name="manifest_valid", blocking=True, description=MANIFEST_DOC)
def default_corpus_manifest(storage: FreudStorage, default_corpus: dict) -> dg.AssetCheckResult:
    return _manifest(default_corpus, storage)


@dg.asset_check(asset="audio_folder", name="manifest_valid", blocking=True, description=MANIFEST_DOC)
def audio_folder_manifest(storage: FreudStorage, audio_folder: dict) -> dg.AssetCheckResult:
    return _manifest(audio_folder, storage)


@dg.asset_check(asset="incoming_audio", name="manifest_valid", blocking=True, description=MANIFEST_DOC,
                partitions_def=incoming_partitions)
def incoming_audio_manifest(storage: FreudStorage, incoming_audio: dict) -> dg.AssetCheckResult:
    return _manifest(incoming_audio, storage)


SHARDS_DOC = ("Shards match their spec (schema, hooks, width, dtype), hold no NaN/Inf, and every clip has "
              "ceil(duration / 20 ms) frames.")


def _shards(activations: dict, manifest: pd.DataFrame) -> dg.AssetCheckResult:
    return _result(validation.check_shards(activations["directory"], manifest, activations.get("hooks")))


@dg.asset_check(asset="activations", name="shards_valid", blocking=True, description=SHARDS_DOC,
                partitions_def=split_partitions, additional_ins={"default_corpus": dg.AssetIn("default_corpus")})
def activations_shards(context: dg.AssetCheckExecutionContext, activations: dict,
                       default_corpus: dict) -> dg.AssetCheckResult:
    manifest = load_manifest(default_corpus["manifest_path"])
    return _shards(activations, manifest[manifest["split"] == context.partition_key])


@dg.asset_check(asset="incoming_activations", name="shards_valid", blocking=True, description=SHARDS_DOC,
                partitions_def=incoming_partitions, additional_ins={"incoming_audio": dg.AssetIn("incoming_audio")})
def incoming_activations_shards(incoming_activations: dict, incoming_audio: dict) -> dg.AssetCheckResult:
    return _shards(incoming_activations, load_manifest(incoming_audio["manifest_path"]))


INDEX_DOC = ("The set's current build has one features row and one vector per dictionary entry, examples, and "
             "the scalar indexes the query API looks rows up by.")


@dg.asset_check(asset="neuron_feature_index", name="index_consistent", description=INDEX_DOC,
                additional_ins={"activations": dg.AssetIn("activations")})
def neuron_index_consistent(neuron_feature_index: dict, activations: dict) -> dg.AssetCheckResult:
    hook = neuron_feature_index["set_id"].rsplit("/", 1)[1]  # "<model>/<hook>"; hooks hold no "/"
    width = validation.shard_width(next(iter(split_dirs(activations).values())), hook)
    return _result(validation.check_feature_set(neuron_feature_index["index_uri"], neuron_feature_index["set_id"],
                                                width))


@dg.asset_check(asset="sae_feature_index", name="index_consistent", description=INDEX_DOC,
                additional_ins={"topk_sae": dg.AssetIn("topk_sae")})
def sae_index_consistent(sae_feature_index: dict, topk_sae: dict) -> dg.AssetCheckResult:
    d_sae = validation.sae_dictionary_size(topk_sae["checkpoint_dir"])
    return _result(validation.check_feature_set(sae_feature_index["index_uri"], sae_feature_index["set_id"], d_sae))


COVERAGE_DOC = ("Each set the batch was merged into names every clip once, its clip counts (pointer row, merge state, "
                "coverage) agree, and every clip its examples name is in the clips table.")


@dg.asset_check(asset="incoming_index", name="merged_sets_consistent", description=COVERAGE_DOC,
                partitions_def=incoming_partitions)
def incoming_index_consistent(incoming_index: dict) -> dg.AssetCheckResult:
    outcomes = {set_id: validation.check_coverage(incoming_index["index_uri"], set_id)
                for set_id in incoming_index["sets"]}
    problems = [f"{set_id}: {p}" for set_id, outcome in outcomes.items() for p in outcome.problems]
    return _result(validation.CheckOutcome(not problems, {"sets": {k: o.metadata for k, o in outcomes.items()}},
                                           problems))


CHECKS = [
    asterisk_prompts_manifest, festival_speech_manifest, default_corpus_manifest, audio_folder_manifest,
    incoming_audio_manifest, activations_shards, incoming_activations_shards, neuron_index_consistent,
    sae_index_consistent, incoming_index_consistent,
]
