"""The whole asset graph materialised in-process on a small subset, with the real components."""

from __future__ import annotations

import dagster as dg
import mlflow
import pandas as pd
import pytest

from freud_pipeline.cli.demo import demo_run_config


@pytest.fixture(scope="module")
def materialised(session_data_dir):
    from freud_pipeline.defs.definitions import DEFAULT_ASSETS, resources

    run_config = demo_run_config(small=True)
    run_config["ops"]["asterisk_prompts"]["config"]["limit"] = 24
    run_config["ops"]["festival_speech"]["config"]["n_sentences"] = 8
    run_config["ops"]["topk_sae"]["config"].update({"steps": 120, "batch_size": 256})
    with dg.instance_for_test() as instance:
        result = dg.materialize(DEFAULT_ASSETS, resources=resources(), run_config=run_config, instance=instance)
        yield result, instance


def test_every_asset_materialises(materialised):
    result, _ = materialised
    assert result.success
    keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert keys == {"asterisk_prompts", "festival_speech", "default_corpus", "activations", "topk_sae",
                    "neuron_feature_index", "sae_feature_index"}


def test_corpus_has_all_splits_and_alignments(materialised):
    result, _ = materialised
    corpus = result.output_for_node("default_corpus")
    manifest = pd.read_parquet(corpus["manifest_path"])
    assert set(manifest["source"]) == {"asterisk_prompts", "festival_speech"}
    assert set(manifest["split"]) == {"train", "dev", "test"}
    alignments = pd.read_parquet(corpus["alignments_path"])
    assert {"word", "phone"} == set(alignments["tier"])


def test_sae_run_is_in_mlflow(materialised):
    result, _ = materialised
    sae = result.output_for_node("topk_sae")
    from freud_pipeline import settings

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri())
    run = client.get_run(sae["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["architecture"] == "topk" and "fvu" in run.data.metrics
    assert run.data.tags["hook"] == "encoder.blocks.2"


def test_feature_index_answers_for_neurons_and_sae(materialised):
    result, _ = materialised
    from freud_pipeline.features import FeatureIndex

    index = FeatureIndex(result.output_for_node("neuron_feature_index")["index_uri"])
    sets = {s["set_id"]: s for s in index.sets()}
    neuron_set = result.output_for_node("neuron_feature_index")["set_id"]
    sae_set = result.output_for_node("sae_feature_index")["set_id"]
    assert sets[neuron_set]["n_features"] == 1536 and sets[neuron_set]["kind"] == "neuron"
    assert sets[sae_set]["kind"] == "sae"
    examples = index.top_examples(neuron_set, 0, n=5)
    assert 1 <= len(examples) <= 5
    assert examples == sorted(examples, key=lambda e: -e["value"])
