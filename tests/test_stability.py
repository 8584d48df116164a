"""Seed stability and counterparts across SAEs, end to end: real Dagster materialisations on real tiny.en
`encoder.blocks.2` activations of Asterisk prompts (the `activations` asset), a real MLflow sqlite store and LanceDB.

`topk_sae` trains a tiny SAE (seed 0, registered as champion); `sae_seed_stability` with the same recipe reuses it
for seed 0 and trains seed 1; both SAEs are indexed as feature sets and `sae_counterparts` links their features.
Then the CLI (`freud stability`, `freud counterparts`) and the app (runs page, search page's feature card, in
headless chromium).
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

try:
    from test_app import _see, dash_duo
    from test_retraining import _rows
except ImportError:  # tests collected as a package
    from tests.test_app import _see, dash_duo
    from tests.test_retraining import _rows

__all__ = ["dash_duo"]  # fixture: used by pytest, not by name

HOOK = "encoder.blocks.2"
CORPUS = {"train": ["vm-options", "vm-message", "vm-savedto"], "dev": ["vm-review"], "test": ["vm-deleted"]}
TINY = {"hook": HOOK, "expansion_factor": 2, "k": 8, "lr": 3e-3, "steps": 40, "batch_size": 128, "warmup_steps": 2,
        "log_every": 20, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0, "dead_after_frames": 4096,
        "device": "cpu", "splice_clips": 0, "min_ce_recovered": None, "max_fvu": None, "max_dead_pct": None}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from freud_pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default corpus' train/dev activations (real asset), the champion `topk_sae`, `sae_seed_stability` over
    seeds 0 and 1, both SAEs indexed as feature sets and `sae_counterparts` materialised."""
    from freud_pipeline.activations import ActivationReader
    from freud_pipeline.audio.datasets.manifest import write_manifest
    from freud_pipeline.defs.activations import activations
    from freud_pipeline.defs.resources import FreudStorage, MlflowTracking
    from freud_pipeline.defs.sae import topk_sae
    from freud_pipeline.defs.stability import counterpart_sets_exist, sae_counterparts, sae_seed_stability
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.sae.checkpoint import load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on 2 shared cores
    root = tmp_path_factory.mktemp("stability")
    rows = [r for split, names in CORPUS.items() for r in _rows(root, names, split, "corpus")]
    manifest_path = write_manifest(rows, root / "datasets" / "corpus" / "manifest.parquet")

    @dg.asset(name="default_corpus")
    def corpus() -> dict:
        return {"manifest_path": str(manifest_path)}

    storage = FreudStorage(data_dir=str(root))
    resources = {"storage": storage, "mlflow": MlflowTracking(storage=storage),
                 "io_manager": dg.FilesystemIOManager(base_dir=str(root / "dagster_storage"))}
    assets = [corpus, activations, topk_sae, sae_seed_stability]
    out = {"root": root, "storage": storage, "uri": storage.tracking_uri, "index_uri": storage.index_uri}
    try:
        with dg.instance_for_test() as instance:
            assert dg.materialize([corpus], instance=instance, resources=resources).success
            for split in CORPUS:
                assert dg.materialize([corpus, activations], selection=[activations], partition_key=split,
                                      instance=instance, resources=resources, run_config={"ops": {"activations": {
                                          "config": {"hooks": [HOOK], "device": "cpu"}}}}).success
            trained = dg.materialize(assets, selection=[topk_sae], instance=instance, resources=resources,
                                     run_config={"ops": {"topk_sae": {"config": TINY}}})
            out["champion"] = trained.output_for_node("topk_sae")
            studied = dg.materialize(assets, selection=[sae_seed_stability], instance=instance, resources=resources,
                                     run_config={"ops": {"sae_seed_stability": {"config": {**TINY, "seeds": [0, 1]}}}})
            out["study"] = studied.output_for_node("sae_seed_stability")
            out["study_metadata"] = studied.get_asset_materialization_events()[0].materialization.metadata
            # Index both SAEs as feature sets (as sae_feature_index would), then link their features.
            reader = ActivationReader(root / "activations" / "tiny.en" / "default_corpus" / "train")
            saes, out["sets"], out["directions"] = {}, {}, {}
            for seed, run_id in out["study"]["runs"].items():
                directory = next(p for p in root.joinpath("sae").rglob(run_id) if p.is_dir())
                sae = saes[seed] = load_checkpoint(directory)
                set_id = f"tiny.en/{HOOK}/sae-topk-{run_id[:8]}"

                def encode(acts, sae=sae):
                    with torch.inference_mode():
                        return sae.encode(torch.from_numpy(acts)).numpy()

                out["directions"][set_id] = decoder_directions(sae)
                build_feature_set(encoded_clips(reader.iter_clips(HOOK, dtype="float32"), encode), set_id=set_id,
                                  model="tiny.en", hook=HOOK, kind="sae", manifest_df=pd.DataFrame(rows),
                                  index_uri=storage.index_uri, top_k=4, sae_run_id=run_id,
                                  sae_checkpoint=str(directory), decoder=out["directions"][set_id])
                out["sets"][seed] = set_id
            linked = dg.materialize([sae_counterparts, counterpart_sets_exist], instance=instance,
                                    resources=resources)
            out["counterparts"] = linked.output_for_node("sae_counterparts")
            out["check"] = linked.get_asset_check_evaluations()[0]
            out["materialize_counterparts"] = lambda: dg.materialize(
                [sae_counterparts, counterpart_sets_exist], instance=instance, resources=resources)
            yield out
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Seed stability
# ---------------------------------------------------------------------------------------------------------------


def test_seed_stability_reuses_the_champion_and_records_shares_against_chance(world):
    from freud_pipeline.features import matches
    from freud_pipeline.sae.matching import match_dictionaries
    from freud_pipeline.sae.registry import champion_version, registered_model_name

    champion, study = world["champion"], world["study"]
    # Seed 0 is the champion run (same recipe, same data); seed 1 was trained, as a child of the study's run.
    assert study["reused_champion"] == champion["run_id"] == study["runs"]["0"]
    client = MlflowClient(world["uri"])
    seed1 = client.get_run(study["runs"]["1"])
    assert seed1.data.tags["mlflow.parentRunId"] == study["study_id"] and seed1.data.params["seed"] == "1"
    # ... and neither registered nor promoted, nor kept where the retention rule prunes.
    name = registered_model_name("tiny.en", HOOK, "topk")
    assert champion_version(client, name).run_id == champion["run_id"]
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [champion["run_id"]]
    seed1_dir = world["root"] / "sae" / "seed_stability" / f"tiny.en-{HOOK}-topk" / study["runs"]["1"]
    assert seed1_dir.is_dir() and not (Path(champion["runs_dir"]) / study["runs"]["1"]).exists()

    # MLflow: the study's parent run holds the shares and the chance level at each threshold.
    parent = client.get_run(study["study_id"])
    assert parent.data.tags["freud.kind"] == "seed_stability"
    metrics = parent.data.metrics
    for t in ("0.5", "0.7", "0.9"):
        assert 0.0 <= metrics[f"seed_stability/share_matched_{t}"] <= 1.0
        assert 0.0 <= metrics[f"seed_stability/chance_{t}"] <= 1.0
    assert metrics["seed_stability/chance_0.7"] == 0.0  # 768 random directions in 384-d never reach 0.7
    assert metrics["seed_stability/share_matched_0.5"] >= metrics["seed_stability/share_matched_0.9"]
    recorded = world["study_metadata"]["seed_stability/share_matched_0.7"].value
    assert recorded == metrics["seed_stability/share_matched_0.7"]

    # LanceDB: one row for the pair, the same numbers; they are what matching the two checkpoints gives.
    [row] = matches.seed_stability(world["index_uri"])
    assert (row["seed_a"], row["seed_b"], row["run_a"], row["run_b"]) == (0, 1, study["runs"]["0"], study["runs"]["1"])
    assert (row["n_latents"], row["d_in"], row["steps"]) == (768, 384, TINY["steps"])
    assert row["mlflow_run_id"] == study["study_id"] and row["recipe"]["k"] == 8
    for point in row["curve"]:
        assert point["share_matched"] == pytest.approx(metrics[f"seed_stability/share_matched_{point['threshold']:g}"])
        assert point["chance"] == pytest.approx(metrics[f"seed_stability/chance_{point['threshold']:g}"])
    dec = list(world["directions"].values())
    again = match_dictionaries(dec[0], dec[1])
    assert [again.share_matched(p["threshold"]) for p in row["curve"]] == pytest.approx(
        [p["share_matched"] for p in row["curve"]])
    assert row["mean_cosine"] == pytest.approx(again.mean_cosine(), abs=1e-5)
    # The one-to-one matches themselves (kind "seed").
    for feature in (0, 100, 767):
        [found] = matches.counterparts(matches.run_set(row["run_a"]), feature, world["index_uri"], kind="seed")
        assert found["set_id"] == matches.run_set(row["run_b"]) and found["index"] == again.counterpart[feature]


def test_the_champion_is_reused_only_for_the_same_recipe_on_the_same_data(world):
    from freud_pipeline.defs.stability import reusable_champion
    from freud_pipeline.sae.config import TrainConfig

    client = MlflowClient(world["uri"])
    fields = {k: v for k, v in TINY.items() if k in TrainConfig.model_fields}
    recipe = TrainConfig(**fields, model_name="tiny.en")
    digest = client.get_run(world["champion"]["run_id"]).data.tags["freud.selection_digest"]
    found, why = reusable_champion(client, recipe, digest)
    assert found["run_id"] == world["champion"]["run_id"] and "is this recipe" in why
    # operational fields do not matter; the seed, k or the data do
    assert reusable_champion(client, recipe.model_copy(update={"log_every": 7, "device": "auto"}), digest)[0]
    for changed, reason in (({"k": 4}, "differs in k (8 vs 4)"), ({"seed": 1}, "differs in seed")):
        found, why = reusable_champion(client, recipe.model_copy(update=changed), digest)
        assert found is None and reason in why
    assert "other data" in reusable_champion(client, recipe, "0" * 64)[1]


def test_freud_stability_prints_the_recorded_study(world, capsys):
    code, out, _ = _cli(capsys, "stability", "--json", "--index-uri", world["index_uri"])
    assert code == 0
    [row] = json.loads(out)
    assert row["study_id"] == world["study"]["study_id"] and [c["threshold"] for c in row["curve"]] == [0.5, 0.7, 0.9]
    code, out, _ = _cli(capsys, "stability", "--index-uri", world["index_uri"])
    assert code == 0 and "share matched" in out and "chance (random)" in out and "seed 0" in out
    code, _, err = _cli(capsys, "stability", "--index-uri", str(world["root"] / "no-index"))
    assert code == 2 and "no feature index at" in err


# ---------------------------------------------------------------------------------------------------------------
# Counterparts across SAE sets
# ---------------------------------------------------------------------------------------------------------------


def test_counterparts_link_every_feature_to_its_closest_in_the_other_set(world):
    from freud_pipeline.errors import FeatureIndexError, FeatureSetError
    from freud_pipeline.features import matches
    from freud_pipeline.sae.matching import closest_counterparts

    assert world["check"].passed
    summary = world["counterparts"]
    assert {(p["set_a"], p["set_b"]) for p in summary["pairs"]} == {
        (world["sets"]["0"], world["sets"]["1"]), (world["sets"]["1"], world["sets"]["0"])}
    a, b = world["sets"]["0"], world["sets"]["1"]
    indices, cosines = closest_counterparts(world["directions"][a], world["directions"][b], top=3)
    for feature in (0, 5, 767):
        found = matches.counterparts(a, feature, world["index_uri"])
        assert [f["set_id"] for f in found] == [b] * 3 and [f["rank"] for f in found] == [1, 2, 3]
        assert [f["index"] for f in found] == indices[feature].tolist()
        assert [f["cosine"] for f in found] == pytest.approx(cosines[feature].tolist(), abs=1e-5)
    with pytest.raises(FeatureSetError, match="unknown feature set 'nope'"):
        matches.counterparts("nope", 0, world["index_uri"])
    with pytest.raises(FeatureIndexError, match="out of range .* 0..767"):
        matches.counterparts(a, 768, world["index_uri"])
    # A stored pair naming a set that does not exist fails the check; the next run drops it; current pairs stay.
    matches.write_matches("tiny.en/ghost", a, indices[:, :1], cosines[:, :1], kind="cross", uri=world["index_uri"])
    assert any("no feature set tiny.en/ghost" in p for p in matches.check_counterparts(world["index_uri"]))
    again = world["materialize_counterparts"]()
    summary = again.output_for_node("sae_counterparts")
    assert (summary["removed"], summary["skipped"], summary["pairs"]) == (1, 2, [])
    assert again.get_asset_check_evaluations()[0].passed


def test_freud_counterparts_prints_them_and_names_bad_input(world, capsys):
    from freud_pipeline.features import matches

    a = world["sets"]["0"]
    code, out, _ = _cli(capsys, "counterparts", a, "5", "--json", "--index-uri", world["index_uri"])
    assert code == 0 and json.loads(out) == matches.counterparts(a, 5, world["index_uri"])
    code, out, _ = _cli(capsys, "counterparts", a, "5", "--index-uri", world["index_uri"])
    assert code == 0 and world["sets"]["1"] in out and "cosine" in out
    code, _, err = _cli(capsys, "counterparts", "nope", "5", "--index-uri", world["index_uri"])
    assert code == 2 and "unknown feature set 'nope'" in err and a in err
    code, _, err = _cli(capsys, "counterparts", a, "9999", "--index-uri", world["index_uri"])
    assert code == 2 and "feature 9999 is out of range" in err


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_runs_page_shows_seed_stability_and_feature_cards_link_counterparts(dash_duo, world):
    from dash_app import create_app
    from freud_pipeline.features import FeatureIndex, matches

    index = FeatureIndex(world["index_uri"])
    dash_duo.start_server(create_app(index, data_dir=world["root"], mlflow_uri=world["uri"]))
    dash_duo.driver.get(dash_duo.server_url + "/runs")
    dash_duo.wait_for_element("#runs-stability-studies", timeout=60)
    [row] = matches.seed_stability(world["index_uri"])
    text = dash_duo.find_element("#runs-stability").text
    assert "seeds" in text and "0 vs 1" in text and "cosine ≥ 0.7" in text
    shares = [e.text for e in dash_duo.find_elements("#runs-stability .stability-share")]
    chances = [e.text for e in dash_duo.find_elements("#runs-stability .stability-chance")]
    assert shares == [f"{c['share_matched']:.1%}" for c in row["curve"]]
    assert chances == [f"(chance {c['chance']:.1%})" for c in row["curve"]]
    dash_duo.wait_for_contains_text("#runs-count", "2 runs", timeout=30)  # the study's parent run is not a row
    _see(dash_duo, "runs-seed-stability")

    a, b = world["sets"]["0"], world["sets"]["1"]
    feature = 5
    expected = matches.counterparts(a, feature, world["index_uri"])
    dash_duo.driver.get(dash_duo.server_url + f"/search?set={a}&index={feature}")
    dash_duo.wait_for_element("#feature-counterparts a.counterpart", timeout=60)
    links = dash_duo.find_elements("#feature-counterparts a.counterpart")
    assert [link.text for link in links] == [f"{c['index']} ({c['cosine']:.2f})" for c in expected]
    assert b in dash_duo.find_element("#feature-counterparts").text
    _see(dash_duo, "search-counterparts")
    links[0].click()
    dash_duo.wait_for_contains_text("#feature-card h3", f"Feature {expected[0]['index']}", timeout=30)
    assert f"index={expected[0]['index']}" in dash_duo.driver.current_url and "sae-topk-" in dash_duo.driver.current_url
    back = [int(link.text.split()[0]) for link in dash_duo.find_elements("#feature-counterparts a.counterpart")]
    assert back == [c["index"] for c in matches.counterparts(b, expected[0]["index"], world["index_uri"])]
