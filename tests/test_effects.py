"""Feature effects: ablating one SAE feature on its top clips (features.effects), their LanceDB store
(features.effect_store), the sae_feature_effects asset, `freud effects` and the edit page.

The SAE is test_app_edit_runs' real small one: TopK k=32, 1,536 latents, trained 120 steps on real tiny.en
`encoder.blocks.2` frames of the Asterisk prompts and indexed as a feature set; Whisper is the bundled tiny.en.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

try:
    from test_app import _see, clip_dir, dash_duo, manifest
    from test_app_edit_runs import EDIT_CLIP, HOOK, residual_clips, sae_world, top_latent
except ImportError:  # tests collected as a package
    from tests.test_app import _see, clip_dir, dash_duo, manifest
    from tests.test_app_edit_runs import EDIT_CLIP, HOOK, residual_clips, sae_world, top_latent

__all__ = ["clip_dir", "dash_duo", "manifest", "residual_clips", "sae_world", "top_latent"]  # fixtures


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on 2 shared cores: one intra-op thread is as fast and does not fight the other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(clip_dir, manifest) -> dict[str, tuple[np.ndarray, str]]:
    from freud_pipeline.audio.decode import load_audio

    return {row.clip_id: (load_audio(clip_dir / row.path), row.transcript) for row in manifest.itertuples()}


def _peaks(sae_world) -> tuple[list[str], np.ndarray]:
    """(clip ids, [clips, latents] maximum of each latent in each clip)."""
    names = list(sae_world["latents"])
    return names, np.stack([sae_world["latents"][c].max(axis=0) for c in names])


# ---------------------------------------------------------------------------------------------------------------
# features.effects
# ---------------------------------------------------------------------------------------------------------------


def test_a_silent_feature_changes_nothing_and_an_active_one_matches_the_edit_splice(
        sae_world, top_latent, clips, tiny_en, one_thread):
    from freud_pipeline.features.effects import feature_effects
    from freud_pipeline.sae.splice import cross_entropy, sae_replacement, splice, transcript_tokens
    from freud_pipeline.whisper.hooks import log_mel, n_real_frames

    names, peaks = _peaks(sae_world)
    row = peaks[names.index(EDIT_CLIP)]
    silent = int(np.argmax(np.where(row == 0, peaks.max(axis=0), -1)))  # fires elsewhere, never on this clip
    assert row[silent] == 0 and peaks[:, silent].max() > 0 and row[top_latent] > 0
    result = feature_effects(tiny_en, sae_world["sae"], HOOK, clips, {silent: [EDIT_CLIP], top_latent: [EDIT_CLIP]},
                             wer_features=0, chance_features=0)
    rows = {r["feature"]: r for r in result["features"]}
    assert rows[silent]["clip_delta_ce"] == [0.0] and rows[silent]["delta_ce"] == 0.0  # exactly: same batch
    assert rows[top_latent]["delta_ce"] != 0.0 and rows[top_latent]["n_clips"] == 1
    assert result["n_ablations"] == 2 and result["n_clips"] == 1 and rows[top_latent]["delta_wer"] is None
    # The baseline is the original model and the ablation is edit_clip's (keep_error, factor 0), spliced into a
    # full encoder pass: the same ΔCE as the residual-stream shortcut and the batch.
    audio, text = clips[EDIT_CLIP]
    prompt, tokens_of = transcript_tokens(tiny_en)
    mel = log_mel(audio).unsqueeze(0)
    with torch.inference_mode():
        original = cross_entropy(tiny_en, tiny_en.embed_audio(mel), [tokens_of(text)], len(prompt))[0]
        with splice(tiny_en, HOOK, sae_replacement(sae_world["sae"], keep_error=True, edit={top_latent: 0.0}),
                    n_real_frames(len(audio))):
            ablated = cross_entropy(tiny_en, tiny_en.embed_audio(mel), [tokens_of(text)], len(prompt))[0]
    n_tokens = len(tokens_of(text)) - len(prompt)
    assert rows[top_latent]["delta_ce"] == pytest.approx((ablated - original) / n_tokens, rel=2e-3, abs=1e-5)



def test_an_effect_is_the_features_own_ablating_and_doubling_move_ce_in_opposite_directions(
        sae_world, clips, tiny_en, one_thread):
    """A meaningful property that holds robustly for this briefly trained SAE (whose strongest features do not beat
    the random-direction chance level: measured, see the report): the ΔCE is a systematic response to the
    feature's direction, not noise. Ablating a feature (×0) and adding it once more (×2, edit_clip's splice)
    change CE in opposite directions, across the strongest features. And the chance level is what its controls
    measured."""
    from freud_pipeline.features.effects import feature_effects
    from freud_pipeline.sae.splice import cross_entropy, sae_replacement, splice, transcript_tokens
    from freud_pipeline.whisper.hooks import log_mel, n_real_frames

    names, peaks = _peaks(sae_world)
    strongest = [int(f) for f in np.argsort(-peaks.max(axis=0))[:8]]
    tops = {f: [names[int(np.argmax(peaks[:, f]))], names[int(np.argsort(-peaks[:, f])[1])]] for f in strongest}
    result = feature_effects(tiny_en, sae_world["sae"], HOOK, clips, tops, clips_per_feature=2, wer_features=0,
                             chance_features=4, batch_size=8)
    rows = {r["feature"]: r for r in result["features"]}
    prompt, tokens_of = transcript_tokens(tiny_en)
    pairs = []
    for f in strongest:  # on the feature's top clip
        audio, text = clips[tops[f][0]]
        mel, tokens = log_mel(audio).unsqueeze(0), [tokens_of(text)]
        with torch.inference_mode():
            original = cross_entropy(tiny_en, tiny_en.embed_audio(mel), tokens, len(prompt))[0]
            with splice(tiny_en, HOOK, sae_replacement(sae_world["sae"], keep_error=True, edit={f: 2.0}),
                        n_real_frames(len(audio))):
                doubled = cross_entropy(tiny_en, tiny_en.embed_audio(mel), tokens, len(prompt))[0]
        pairs.append((rows[f]["clip_delta_ce"][0], (doubled - original) / (len(tokens[0]) - len(prompt))))
    ablated, added = np.array(pairs).T
    assert np.corrcoef(ablated, added)[0, 1] < -0.8, pairs
    assert (np.sign(ablated) != np.sign(added)).sum() >= 6, pairs
    # The chance level: random directions of the same norm on the same frames, for 4 of the features.
    controls = [r for r in rows.values() if r["chance_delta_ce"] is not None]
    chance = np.array([r["chance_delta_ce"] for r in controls])
    assert len(controls) == result["chance"]["n_features"] == 4 and result["n_controls"] == 8
    assert result["chance"]["delta_ce"] == pytest.approx(chance.mean())
    assert result["chance"]["abs_p95"] == pytest.approx(np.quantile(np.abs(chance), 0.95))
    assert all(r["chance_delta_ce"] == pytest.approx(np.mean(r["chance_clip_delta_ce"])) for r in controls)
    for r in rows.values():  # a t interval over the two clips
        assert r["ci_low"] <= r["delta_ce"] <= r["ci_high"] and r["n_clips"] == 2
        assert r["delta_ce"] == pytest.approx(np.mean(r["clip_delta_ce"])) and r["delta_wer"] is None


# ---------------------------------------------------------------------------------------------------------------
# The asset, the store and `freud effects`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effects_world(sae_world, top_latent, clip_dir, tmp_path_factory, one_thread):
    """A copy of sae_world's index with `sae_feature_effects` materialised (real Dagster run, small config) for
    the edited clip's top feature and two others."""
    import dagster as dg

    from freud_pipeline.defs.effects import sae_feature_effects
    from freud_pipeline.defs.resources import FreudStorage

    uri = str(tmp_path_factory.mktemp("effects") / "lancedb")
    shutil.copytree(sae_world["index"].uri, uri)
    names, peaks = _peaks(sae_world)
    others = [int(f) for f in np.argsort(-peaks[names.index(EDIT_CLIP)]) if int(f) != top_latent][:2]
    features = [top_latent, *others]
    config = {"features": features, "clips_per_feature": 2, "wer_features": 1, "chance_features": 2,
              "batch_size": 8, "device": "cpu"}
    with dg.instance_for_test() as instance:
        result = dg.materialize([sae_feature_effects], instance=instance,
                                resources={"storage": FreudStorage(data_dir=str(clip_dir), lancedb_uri=uri)},
                                run_config={"ops": {"sae_feature_effects": {"config": config}}})
    assert result.success
    return {"uri": uri, "features": features, "output": result.output_for_node("sae_feature_effects"),
            "metadata": result.get_asset_materialization_events()[0].materialization.metadata}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from freud_pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_asset_stores_each_features_effect_in_lancedb(effects_world, sae_world):
    from freud_pipeline.features import effect_store

    set_id, uri = sae_world["set_id"], effects_world["uri"]
    out = effects_world["output"]
    assert out["set_id"] == set_id and out["n_features"] == 3  # the newest (only) SAE set of the index
    rows = effect_store.effects(set_id, uri=uri)
    assert [r["feature"] for r in rows] == sorted(effects_world["features"])
    index = sae_world["index"]
    build = next(s["build_id"] for s in index.sets() if s["set_id"] == set_id)
    for r in rows:  # each feature's own top clips, strongest first
        tops = [e["clip_id"] for e in index.top_examples(set_id, r["feature"], n=20) if e["value"] > 0]
        assert r["clip_ids"] == tops[:2] and r["n_clips"] == 2 and len(r["clip_delta_ce"]) == 2
        assert r["ci_low"] <= r["delta_ce"] <= r["ci_high"] and r["delta_ce"] != 0 and r["build_id"] == build
    [measured] = [r for r in rows if r["delta_wer"] is not None]  # ΔWER for the largest ΔCE only
    assert measured["delta_ce"] == max(r["delta_ce"] for r in rows) and measured["wer_clips"] == 2
    assert sum(r["chance_delta_ce"] is not None for r in rows) == 2
    summary = effect_store.effect_summary(set_id, uri=uri)
    assert summary["current"] and summary["n_features"] == 3 and summary["chance_n"] == 2
    assert summary["computation_id"] == out["computation_id"] and "original model" in summary["baseline"]
    assert effects_world["metadata"]["n_features"].value == 3
    assert effects_world["metadata"]["seconds_per_1000_features"].value > 0
    ranked = effect_store.features_by_effect(set_id, limit=2, uri=uri)
    assert [r["delta_ce"] for r in ranked] == sorted((r["delta_ce"] for r in rows), reverse=True)[:2]
    assert effect_store.features_by_effect(set_id, 1, descending=False, uri=uri)[0]["delta_ce"] == \
        min(r["delta_ce"] for r in rows)
    # nothing computed in sae_world's own index; a feature not measured is left out
    assert effect_store.effect_summary(set_id, uri=index.uri) is None
    assert effect_store.effects(set_id, uri=index.uri) == []
    unmeasured = next(f for f in range(1536) if f not in effects_world["features"])
    assert effect_store.effects(set_id, [unmeasured], uri=uri) == []


def test_a_new_computation_replaces_the_old_one_for_readers(effects_world, sae_world, tmp_path):
    from freud_pipeline.features import effect_store
    from freud_pipeline.features.store import connect, current_set

    uri = str(tmp_path / "lancedb")
    shutil.copytree(effects_world["uri"], uri)
    set_id = sae_world["set_id"]
    first = effect_store.effect_summary(set_id, uri=uri)["computation_id"]
    rows = effect_store.effects(set_id, uri=uri)
    ids = []
    for shift in (1.0, 2.0):  # two more computations of the same features (values shifted, to tell them apart)
        result = {"features": [{**r, "delta_ce": r["delta_ce"] + shift} for r in rows],
                  "chance": {"delta_ce": 0.0, "ci_low": -0.1, "ci_high": 0.1, "abs_p95": 0.2, "n_features": 2}}
        ids.append(effect_store.write_effects(current_set(set_id, uri), result, uri=uri))
    summary = effect_store.effect_summary(set_id, uri=uri)
    assert summary["computation_id"] == ids[1] and summary["previous_computation"] == ids[0]
    assert [r["delta_ce"] for r in effect_store.effects(set_id, uri=uri)] == \
        pytest.approx([r["delta_ce"] + 2.0 for r in rows])
    stored = connect(uri).open_table(effect_store.EFFECTS).search().limit(None).to_list()
    assert {r["computation_id"] for r in stored} == set(ids) and first not in ids  # the oldest one is gone


def test_freud_effects_prints_them_sorted_and_names_bad_input(effects_world, sae_world, capsys):
    set_id, uri = sae_world["set_id"], effects_world["uri"]
    code, out, _ = _cli(capsys, "effects", set_id, "--json", "--index-uri", uri)
    assert code == 0
    data = json.loads(out)
    effects = [r["delta_ce"] for r in data["effects"]]
    assert len(effects) == 3 and effects == sorted(effects, reverse=True)
    assert data["summary"]["chance_n"] == 2 and data["summary"]["set_id"] == set_id
    code, out, _ = _cli(capsys, "effects", set_id, "--sort", "feature", "--limit", "2", "--json", "--index-uri", uri)
    assert [r["feature"] for r in json.loads(out)["effects"]] == sorted(effects_world["features"])[:2]
    top = effects_world["features"][0]
    code, out, _ = _cli(capsys, "effects", set_id, "--feature", str(top), "--json", "--index-uri", uri)
    assert [r["feature"] for r in json.loads(out)["effects"]] == [top]
    code, out, _ = _cli(capsys, "effects", set_id, "--index-uri", uri)
    assert code == 0 and "chance" in out and "above chance" in out and str(top) in out
    code, _, err = _cli(capsys, "effects", "no/such/set", "--index-uri", uri)
    assert code == 2 and "unknown feature set 'no/such/set'" in err
    code, _, err = _cli(capsys, "effects", set_id, "--feature", "99999", "--index-uri", uri)
    assert code == 2 and "out of range" in err and "0..1535" in err
    code, _, err = _cli(capsys, "effects", set_id, "--index-uri", sae_world["index"].uri)
    assert code == 2 and "no feature effects computed" in err and "sae_feature_effects" in err


# ---------------------------------------------------------------------------------------------------------------
# Browser: the edit page
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_edit_page_shows_the_stored_effect_of_the_edited_features(dash_duo, effects_world, sae_world, top_latent):
    from dash_app import create_app
    from freud_pipeline.features import FeatureIndex, effect_store

    set_id = sae_world["set_id"]
    stored = effect_store.effects(set_id, [top_latent], uri=effects_world["uri"])[0]
    unmeasured = next(f for f in range(1536) if f not in effects_world["features"])
    app = create_app(FeatureIndex(effects_world["uri"]), data_dir=sae_world["data_dir"], mlflow_uri=sae_world["uri"])
    dash_duo.start_server(app)
    dash_duo.driver.get(dash_duo.server_url + f"/edit?clip={EDIT_CLIP}&features={top_latent}:0,{unmeasured}:0")
    dash_duo.wait_for_contains_text("#edit-source-summary", EDIT_CLIP, timeout=60)
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_element("#edit-effects-table", timeout=120)
    rows = {r.find_elements("css selector", "td")[0].text: r.text
            for r in dash_duo.find_elements("#edit-effects-table tbody tr")}
    assert f"{stored['delta_ce']:+.4f}" in rows[str(top_latent)]
    assert f"[{stored['ci_low']:+.4f}, {stored['ci_high']:+.4f}]" in rows[str(top_latent)]
    assert "not computed" in rows[str(unmeasured)]
    chance = dash_duo.find_element("#edit-effects-chance").text
    assert "Chance" in chance and "random direction" in chance
    _see(dash_duo, "edit-feature-effects", "#edit-graph")


def test_search_page_shows_a_features_effect_and_ranks_features_by_it(dash_duo, effects_world, sae_world,
                                                                       top_latent):
    """The search page of an SAE feature: its stored ΔCE beside the chance level, and the measured features ranked
    by ΔCE as links, largest first."""
    from dash_app import create_app
    from freud_pipeline.features import FeatureIndex, effect_store

    set_id = sae_world["set_id"]
    stored = effect_store.effects(set_id, [top_latent], uri=effects_world["uri"])[0]
    ranked = effect_store.features_by_effect(set_id, uri=effects_world["uri"])
    app = create_app(FeatureIndex(effects_world["uri"]), data_dir=sae_world["data_dir"], mlflow_uri=sae_world["uri"])
    dash_duo.start_server(app)
    dash_duo.driver.get(dash_duo.server_url + f"/search?set={set_id}&index={top_latent}&n=2")
    dash_duo.wait_for_element("#feature-effect-value", timeout=60)
    assert f"ΔCE {stored['delta_ce']:+.4f}" in dash_duo.find_element("#feature-effect-value").text
    assert "random directions" in dash_duo.find_element("#feature-effect").text
    dash_duo.find_element("#features-by-effect summary").click()
    links = [a.text for a in dash_duo.find_elements("#features-by-effect a")]
    assert links == [f"feature {r['feature']}" for r in ranked]
    _see(dash_duo, "search-feature-effect", "#clip-graph-0")
