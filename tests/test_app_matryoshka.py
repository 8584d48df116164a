"""A Matryoshka BatchTopK SAE in the app (issue 15: every SAE architecture appears in the app and the runs page).

The SAE is trained briefly (train_sae, logged to a temporary MLflow sqlite store, experiment freud-sae) on real
tiny.en `encoder.blocks.2` activations of test_app's Asterisk prompts, indexed as an SAE feature set
(build_feature_set, kind="sae", decoder directions; set id as the pipeline names it,
`<model>/<hook>/sae-<architecture>-<run>`), then browsed with test_app's headless-chromium dash_duo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    from test_app import _see, _type, clip_dir, dash_duo, manifest
    from test_app_edit_runs import residual_clips
except ImportError:  # tests collected as a package
    from tests.test_app import _see, _type, clip_dir, dash_duo, manifest
    from tests.test_app_edit_runs import residual_clips

__all__ = ["clip_dir", "dash_duo", "manifest", "residual_clips"]  # fixtures: used by pytest, not by name

pytestmark = [pytest.mark.browser]

HOOK = "encoder.blocks.2"
ARCH = "matryoshka_batchtopk"


def test_a_matryoshka_sae_is_browsed_in_the_app(dash_duo, clip_dir, residual_clips, manifest, tmp_path):
    """Its set is the search page's default; the strongest latent of its first (coarsest) prefix shows its card
    and top clips; the runs page lists the run with its architecture and links the set. The search page names
    the architecture only in the set id (URL, dropdown value): its visible set label has none."""
    from dash_app import create_app
    from freud_pipeline.features import FeatureIndex
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.sae import MatryoshkaBatchTopKSAE, TrainConfig, train_sae

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on shared cores: one thread is as fast
    try:
        cfg = TrainConfig(architecture=ARCH, hook=HOOK, model_name="tiny.en", expansion_factor=2, k=16,
                          matryoshka_prefixes=[0.125, 0.5], lr=3e-3, warmup_steps=10, steps=60, batch_size=256,
                          log_every=20, eval_every=0, eval_batches=2, dead_after_frames=50_000, device="cpu")
        result = train_sae(torch.cat(list(residual_clips.values())), cfg, out_dir=tmp_path / "sae",
                           mlflow_tracking_uri=uri, experiment="freud-sae", run_name="matryoshka")
        sae = result.sae
        assert isinstance(sae, MatryoshkaBatchTopKSAE) and sae.matryoshka_prefixes == [96, 384, 768]

        def encode(acts):
            with torch.inference_mode():
                return sae.encode(acts.float()).numpy()

        set_id = f"tiny.en/{HOOK}/sae-{ARCH}-{result.run_id[:8]}"
        index_uri = str(tmp_path / "lancedb")
        build_feature_set(
            encoded_clips(residual_clips.items(), encode), set_id=set_id, model="tiny.en", hook=HOOK, kind="sae",
            manifest_df=manifest, index_uri=index_uri, sae_run_id=result.run_id,
            sae_checkpoint=str(result.checkpoint_dir), decoder=decoder_directions(sae))
        peaks = np.stack([encode(a).max(0) for a in residual_clips.values()])
    finally:
        torch.set_num_threads(threads)
    index = FeatureIndex(index_uri)
    coarse = peaks[:, : sae.matryoshka_prefixes[0]].max(0)
    feature = int(coarse.argmax())
    assert coarse[feature] > 0

    dash_duo.start_server(create_app(index, data_dir=clip_dir, mlflow_uri=uri))
    dash_duo.driver.get(dash_duo.server_url + "/search")  # a bare /search opens the newest SAE set
    label = f"tiny.en · {HOOK} · SAE matryoshka_batchtopk, 768 latents, run {result.run_id[:8]}"
    dash_duo.wait_for_contains_text("#search-set", label, timeout=60)
    _type(dash_duo, "#search-index", str(feature))
    _type(dash_duo, "#search-n", "3")
    dash_duo.find_element("#search-go").click()
    dash_duo.wait_for_element("#result-0 .clip-graph .js-plotly-plot", timeout=60)
    assert f"sae-{ARCH}-{result.run_id[:8]}" in dash_duo.driver.current_url and f"index={feature}" in \
        dash_duo.driver.current_url
    title = dash_duo.find_element("#feature-card .card-title").text
    assert title.startswith(f"Feature {feature}") and label in title
    assert dash_duo.find_element("#result-0 .clip-id").text == index.top_examples(set_id, feature, n=1)[0]["clip_id"]
    _see(dash_duo, "search-matryoshka", "#clip-graph-0")

    dash_duo.wait_for_element("#nav-runs").click()
    dash_duo.wait_for_contains_text("#runs-count", "1 run", timeout=60)
    assert dash_duo.find_element("#runs-table td[data-dash-column='architecture']").text == ARCH
    assert dash_duo.find_element("#runs-table a.run-set-link").text == set_id
