"""The whole asset graph materialised in-process on a small subset, with the real components."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from freud_pipeline.cli.demo import demo_run_config


def output(results, node: str):
    for result in results:
        if any(e.step_key == node for e in result.get_asset_materialization_events()):
            return result.output_for_node(node)
    raise KeyError(node)


@pytest.fixture(scope="module")
def materialised(session_data_dir):
    from freud_pipeline.defs.definitions import materialize_default

    run_config = demo_run_config(small=True)
    run_config["ops"]["asterisk_prompts"]["config"]["limit"] = 24
    run_config["ops"]["festival_speech"]["config"]["n_sentences"] = 8
    # A short SAE run, spliced into 4 held-out clips; thresholds a 120-step SAE meets with a margin (the demo
    # config keeps the defaults: FVU <= 0.5, dead <= 50 %, CE recovered >= 0.5).
    run_config["ops"]["topk_sae"]["config"].update({
        "steps": 120, "batch_size": 256, "splice_clips": 4, "max_fvu": 0.8, "min_ce_recovered": 0.0,
    })
    with dg.instance_for_test() as instance:
        results = materialize_default(run_config, instance)
        yield results, instance


def test_every_asset_and_partition_materialises(materialised):
    results, instance = materialised
    assert all(r.success for r in results) and len(results) == 5  # corpus, 3 splits, index
    keys = {e.asset_key.to_user_string() for r in results for e in r.get_asset_materialization_events()}
    assert keys == {"asterisk_prompts", "festival_speech", "default_corpus", "activations", "topk_sae",
                    "neuron_feature_index", "sae_feature_index"}
    partitions = instance.get_materialized_partitions(dg.AssetKey("activations"))
    assert partitions == {"train", "dev", "test"}


def test_corpus_has_all_splits_and_alignments(materialised):
    corpus = output(materialised[0], "default_corpus")
    manifest = pd.read_parquet(corpus["manifest_path"])
    assert set(manifest["source"]) == {"asterisk_prompts", "festival_speech"}
    assert set(manifest["split"]) == {"train", "dev", "test"}
    alignments = pd.read_parquet(corpus["alignments_path"])
    assert {"word", "phone"} == set(alignments["tier"])


def test_sae_run_is_in_mlflow(materialised):
    sae = output(materialised[0], "topk_sae")
    from freud_pipeline import settings

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri())
    run = client.get_run(sae["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["architecture"] == "topk"
    assert any(k.startswith("fvu") or k.endswith("fvu") for k in run.data.metrics)
    assert run.data.tags["hook"] == "encoder.blocks.2"


def test_feature_index_answers_for_neurons_and_sae(materialised):
    from freud_pipeline.features import FeatureIndex

    neuron, sae = output(materialised[0], "neuron_feature_index"), output(materialised[0], "sae_feature_index")
    index = FeatureIndex(neuron["index_uri"])
    sets = {s["set_id"]: s for s in index.sets()}
    assert sets[neuron["set_id"]]["n_features"] == 1536 and sets[neuron["set_id"]]["kind"] == "neuron"
    assert sets[sae["set_id"]]["kind"] == "sae"
    # The set is pinned to the SAE run it was mined with: its immutable run directory and the weights' digest.
    trained = output(materialised[0], "topk_sae")
    assert sets[sae["set_id"]]["sae_run_id"] == trained["run_id"]
    assert sets[sae["set_id"]]["sae_sha256"] == trained["sha256"]
    assert sets[sae["set_id"]]["sae_checkpoint"] == trained["checkpoint_dir"]
    examples = index.top_examples(neuron["set_id"], 0, n=5)
    assert 1 <= len(examples) <= 5
    assert [e["value"] for e in examples] == sorted((e["value"] for e in examples), reverse=True)


def test_sae_is_evaluated_checked_and_registered(materialised):
    from freud_pipeline import settings
    from freud_pipeline.sae.registry import CHAMPION

    results = materialised[0]
    index_run = next(r for r in results if any(e.step_key == "topk_sae" for e in r.get_asset_materialization_events()))
    sae = index_run.output_for_node("topk_sae")
    # The blocking check ran and passed; its verdict is the one the registry acted on.
    (evaluation,) = [e for e in index_run.get_asset_check_evaluations() if e.check_name == "sae_quality"]
    assert evaluation.passed and evaluation.asset_key == dg.AssetKey("topk_sae")
    assert {"fvu", "dead_pct", "ce_recovered", "threshold/fvu_max"} <= set(evaluation.metadata)
    assert sae["quality"]["passed"] and sae["registry"]["promoted"]
    assert sae["registry"]["name"] == "freud-sae.tiny_en.encoder_blocks_2.topk"
    from pathlib import Path

    from freud_pipeline.sae.checkpoint import checkpoint_sha256

    run_dir = Path(sae["checkpoint_dir"])  # sae/<model>-<hook>-<architecture>/<run id>, complete
    assert run_dir.name == sae["run_id"] and run_dir.parent.name == "tiny.en-encoder.blocks.2-topk"
    assert sae["sha256"] == checkpoint_sha256(run_dir) and (run_dir / "quality_report.json").is_file()

    (materialization,) = [e.materialization for e in index_run.get_asset_materialization_events()
                          if e.step_key == "topk_sae"]
    metadata = materialization.metadata
    assert metadata["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
    assert metadata["mlflow_run"].value.endswith(sae["run_id"])
    for key in ("fvu", "explained_variance", "l0", "dead_pct", "dense_pct", "ce_original", "ce_spliced", "ce_zero",
                "ce_mean", "ce_recovered", "wer_original", "wer_spliced"):
        assert key in metadata, key
    assert metadata["splice_n_clips"].value == 4
    assert 0 <= metadata["fvu"].value <= 0.8 and metadata["ce_zero"].value > metadata["ce_original"].value

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri())
    run = client.get_run(sae["run_id"])
    assert run.data.tags["dagster_run_id"] == index_run.run_id
    assert run.data.tags["dagster_asset_key"] == "topk_sae" and run.data.tags["whisper_model"] == "tiny.en"
    assert run.data.tags["dataset_version"] and run.data.tags["quality_check"] == "passed"
    assert {"splice/ce_recovered", "splice/wer_spliced", "eval/fvu", "eval/dead_fraction"} <= set(run.data.metrics)
    assert "eval/quality_report.json" in {a.path for a in client.list_artifacts(sae["run_id"], "eval")}
    champion = client.get_model_version_by_alias(sae["registry"]["name"], CHAMPION)
    assert champion.run_id == sae["run_id"] and champion.source == f"runs:/{sae['run_id']}/checkpoint"
    assert champion.tags["quality_check"] == "passed"


def test_a_width_and_k_sweep_logs_each_run_to_mlflow_with_its_splice_evaluation(materialised):
    """The sae_sweep asset: one run per (expansion factor, k), each spliced into held-out clips with ΔWER and its
    interval, tagged with the sweep, none registered; what the runs page's trade-off plot shows."""
    from freud_pipeline import settings
    from freud_pipeline.defs.definitions import defs
    from freud_pipeline.defs.runner import materialize_asset
    from freud_pipeline.features.runs import list_runs

    _, instance = materialised
    config = {"steps": 30, "batch_size": 256, "splice_clips": 3, "max_fvu": None, "min_ce_recovered": None,
              "max_dead_pct": None, "register_model": False, "expansion_factors": [2, 4], "ks": [8],
              "sweep_name": "test-sweep", "checkpoint_every": 0, "device": "cpu"}
    run = materialize_asset(defs, "sae_sweep", config=config, instance=instance)
    assert run.success
    sweep = run.output_for_node("sae_sweep")
    assert [(r["expansion_factor"], r["k"]) for r in sweep["runs"]] == [(2, 8), (4, 8)]
    logged = {r["run_id"]: r for r in list_runs(settings.mlflow_tracking_uri())}
    for row in sweep["runs"]:
        run_row = logged[row["run_id"]]
        assert run_row["tags"]["sweep"] == "test-sweep" and "registered_model" not in run_row["tags"]
        assert run_row["n_latents"] == str(384 * row["expansion_factor"])
        assert run_row["delta_wer"] is not None
        assert run_row["delta_wer_ci_low"] <= run_row["delta_wer"] <= run_row["delta_wer_ci_high"]
        assert run_row["metrics"]["splice/n_clips"] == 3


# --- new audio in the watched folder reaches the index (issue 14) -------------------------------------------


def _sensor_batch(instance, folder, monkeypatch) -> str:
    """One tick of the real sensor over `folder`, its partition added as the daemon would add it."""
    from freud_pipeline.defs.resources import FreudStorage
    from freud_pipeline.defs.sensors import new_audio_sensor

    monkeypatch.setenv("FREUD_WATCH_DIR", str(folder))
    monkeypatch.setenv("FREUD_WATCH_SETTLE_S", "0")
    result = new_audio_sensor(dg.build_sensor_context(instance=instance, resources={"storage": FreudStorage()}))
    keys = [k for request in result.dynamic_partitions_requests for k in request.partition_keys]
    instance.add_dynamic_partitions("incoming_audio", keys)
    assert len(keys) == 1 and [r.partition_key for r in result.run_requests] == keys
    return keys[0]


def _metadata(run, asset: str) -> dict:
    event = next(e for e in run.get_asset_materialization_events() if e.asset_key.to_user_string() == asset)
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_files_dropped_in_the_watched_folder_become_searchable_clips_of_the_index(materialised, tmp_path,
                                                                                    monkeypatch):
    """Sensor tick -> incoming_job (convert, collect, merge) on the materialised pipeline: the new clip is in the
    neuron and SAE sets, tops every neuron it beats, is found by its words (index and app) with its provenance; a
    broken file is skipped with its reason; running the batch again changes nothing."""
    import numpy as np

    from freud_pipeline.activations import ActivationReader
    from freud_pipeline.audio.decode import write_wav
    from freud_pipeline.defs.definitions import defs
    from freud_pipeline.features import FeatureIndex
    from test_app_edit_runs import _callback, _payload
    from conftest import asterisk_audio

    results, instance = materialised
    neuron, sae = output(results, "neuron_feature_index"), output(results, "sae_feature_index")
    uri, set_id = neuron["index_uri"], neuron["set_id"]
    index = FeatureIndex(uri)
    before = {s["set_id"]: s for s in index.sets()}
    corpus = pd.read_parquet(output(results, "default_corpus")["manifest_path"])
    # A prompt no other test puts into the shared data directory (an identical clip would tie with it).
    prompt, text, word = next(p for p in (("conf-placeintoconf", "you will now be placed into the conference",
                                           "conference"),
                                          ("vm-nobodyavail", "nobody is available to take your call at the moment",
                                           "nobody"))
                              if not corpus["clip_id"].str.contains(p[0]).any())
    folder = tmp_path / "watched"
    write_wav(folder / "planted.wav", asterisk_audio(prompt))
    (folder / "planted.txt").write_text(text + "\n")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    key = _sensor_batch(instance, folder, monkeypatch)
    old_top = np.array([index.top_examples(set_id, i, n=1)[0]["value"] for i in range(1536)])

    job = defs.resolve_job_def("incoming_job")
    run = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    assert run.success
    skipped = _metadata(run, "incoming_audio")["skipped"]
    assert [s["file"].rsplit("/", 1)[-1] for s in skipped] == ["broken.wav"] and skipped[0]["reason"]
    merged = _metadata(run, "incoming_index")["sets"]
    assert merged[set_id]["merged"] and merged[set_id]["n_new_clips"] == 1
    assert merged[sae["set_id"]]["merged"]
    (check,) = [e for e in run.get_asset_check_evaluations() if e.check_name == "merged_sets_consistent"]
    assert check.passed, check.description

    after = {s["set_id"]: s for s in index.sets()}
    for name in (set_id, sae["set_id"]):
        assert after[name]["n_clips"] == before[name]["n_clips"] + 1
        parts = after[name]["coverage"]["partitions"]
        assert any(p["dataset"] == "incoming_audio" and p["partition"] == key for p in parts)
    # The clip, by its words, with where it came from.
    (clip_id,) = ActivationReader(run.output_for_node("incoming_activations")["directory"]).clip_ids()
    found = {c["clip_id"]: c for c in index.search_clips(word)}
    assert clip_id in found and found[clip_id]["batch"] == key and found[clip_id]["arrived_at"]
    # Every neuron the new clip beats now has it as its top example; the others keep theirs.
    peaks = dict(ActivationReader(run.output_for_node("incoming_activations")["directory"])
                 .iter_clips("encoder.blocks.2.mlp.1", dtype="float32"))[clip_id].max(axis=0)
    new_top = [index.top_examples(set_id, i, n=1)[0] for i in range(1536)]
    beaten = np.flatnonzero(peaks > old_top)
    assert beaten.size > 0  # a new clip beats the corpus somewhere
    assert all(new_top[i]["clip_id"] == clip_id for i in beaten)
    assert all(new_top[i]["value"] == old_top[i] for i in np.flatnonzero(peaks < old_top))
    # The app's search page shows it as the top example of such a neuron, with its provenance.
    from dash_app import create_app

    from freud_pipeline.settings import data_dir

    app = create_app(index, data_dir=str(data_dir()))
    client = app.server.test_client()
    deps = client.get("/_dash-dependencies").get_json()
    body = _payload(_callback(deps, "search-results.children"),
                    {"url.search": f"?set={set_id}&index={int(beaten[0])}&n=3", "search-page.id": "search-page"},
                    {"url.pathname": "/search"})
    page = client.post("/_dash-update-component", data=body, content_type="application/json").get_data(as_text=True)
    assert clip_id in page and f"batch {key}" in page

    # Re-materialising the batch changes nothing.
    again = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    assert again.success
    assert all(not m["merged"] for m in _metadata(again, "incoming_index")["sets"].values())
    assert {s["set_id"]: s["build_id"] for s in index.sets()} == {k: v["build_id"] for k, v in after.items()}



@pytest.mark.parametrize("name", ["demo_jumprelu", "demo_matryoshka"])
def test_each_architecture_trains_through_freud_collect(materialised, name, tmp_path, monkeypatch):
    """`freud collect --config configs/train/<name>.yaml` on the embedded data: the shipped recipe, shortened (few
    steps, 4 spliced clips, the gate of a short run), through the real CLI and the pipeline's instance; the run
    lands in MLflow with its architecture and is on the runs page's list."""
    import yaml

    from freud_pipeline.cli import main
    from freud_pipeline.features.runs import list_runs

    results, instance = materialised
    run = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train" / f"{name}.yaml").read_text())
    run["config"].update({"steps": 40, "batch_size": 256, "checkpoint_every": 20, "eval_every": 0,
                          "splice_clips": 4, "max_fvu": 0.95, "max_dead_pct": 100.0, "min_ce_recovered": 0.0})
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(run))
    monkeypatch.setenv("DAGSTER_HOME", instance.root_directory)  # the instance the default slice went into
    assert main(["collect", "--config", str(config)]) == 0
    architecture = run["config"]["architecture"]
    assert any(r["architecture"] == architecture and r["hook"] == run["config"]["hook"] for r in list_runs())
