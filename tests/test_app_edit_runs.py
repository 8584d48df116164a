"""The app's feature-editing page (/edit) and SAE runs page (/runs), with a real small SAE.

Two TopK SAEs (k=16 and k=32) are trained briefly on real tiny.en `encoder.blocks.2` activations of the 8
Asterisk prompts of test_app (train_sae, logged to a temporary MLflow sqlite store, experiment freud-sae); the
k=32 one is indexed as an SAE feature set (build_feature_set, kind="sae", decoder directions). Browser tests
use test_app's headless-chromium dash_duo; screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from test_app import PROMPTS, _see, _type, clip_dir, dash_duo, manifest
except ImportError:  # tests collected as a package
    from tests.test_app import PROMPTS, _see, _type, clip_dir, dash_duo, manifest

__all__ = ["clip_dir", "dash_duo", "manifest"]  # fixtures: used by pytest, not by name

pytestmark = [pytest.mark.browser]

HOOK = "encoder.blocks.2"
EDIT_CLIP = "asterisk-hello-world"
# what freud_pipeline.features.editing.edit_clip reports, in order
EDIT_STAGES = ["Loading the SAE and Whisper…", "Running Whisper's encoder: original…",
               "Running Whisper's encoder: SAE reconstruction…", "Running Whisper's encoder: edited…",
               "Transcribing original, SAE reconstruction and edited…", "Comparing the activations…"]


# ---------------------------------------------------------------------------------------------------------------
# A real SAE, its MLflow runs and its feature set
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def residual_clips(clip_dir, tiny_en) -> dict[str, torch.Tensor]:
    """Real encoder.blocks.2 frames of each prompt, captured as Whisper runs it (one padded 30 s window)."""
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    capture = EncoderCapture(tiny_en, [HOOK])
    out = {}
    for name in PROMPTS:
        audio = load_audio(clip_dir / "clips" / f"{name}.wav")
        out[f"asterisk-{name}"] = capture.capture(log_mel(audio))[HOOK][0, : n_real_frames(len(audio))].clone()
    return out


@pytest.fixture(scope="session")
def sae_world(clip_dir, residual_clips, manifest):
    """Two MLflow runs (k=16, k=32) and the index with the k=32 SAE's feature set."""
    from freud_pipeline.features import FeatureIndex
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.sae import TrainConfig, train_sae

    frames = torch.cat(list(residual_clips.values()))
    uri = f"sqlite:///{clip_dir / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on 2 shared cores: one thread is as fast and does not fight
    try:
        runs = {}
        for k in (16, 32):
            cfg = TrainConfig(hook=HOOK, model_name="tiny.en", expansion_factor=4, k=k, lr=3e-3, warmup_steps=10,
                              steps=120, batch_size=256, log_every=40, eval_every=0, eval_batches=2,
                              dead_after_frames=50_000, device="cpu", seed=k)
            runs[k] = train_sae(frames, cfg, out_dir=clip_dir / f"sae-k{k}", mlflow_tracking_uri=uri,
                                experiment="freud-sae", run_name=f"topk-k{k}")
        result = runs[32]
        sae = result.sae

        def encode(acts):
            with torch.inference_mode():
                return sae.encode(acts.float()).numpy()

        set_id = f"tiny.en/{HOOK}/sae-topk-{result.run_id[:8]}"
        index_uri = str(clip_dir / "lancedb-sae")
        build_feature_set(
            encoded_clips(((c, a) for c, a in residual_clips.items()), encode), set_id=set_id, model="tiny.en",
            hook=HOOK, kind="sae", manifest_df=manifest, index_uri=index_uri, sae_run_id=result.run_id,
            sae_checkpoint=str(result.checkpoint_dir), decoder=decoder_directions(sae))
        latents = {c: encode(a) for c, a in residual_clips.items()}
    finally:
        torch.set_num_threads(threads)
    return {"uri": uri, "runs": runs, "set_id": set_id, "index": FeatureIndex(index_uri), "sae": sae,
            "latents": latents, "data_dir": clip_dir}


@pytest.fixture(scope="session")
def top_latent(sae_world) -> int:
    """The latent the edited clip activates most."""
    return int(np.argmax(sae_world["latents"][EDIT_CLIP].max(axis=0)))


def _app(world, **kwargs):
    from dash_app import create_app

    return create_app(world["index"], data_dir=world["data_dir"], mlflow_uri=world["uri"], **kwargs)


def _figure_traces(dash_duo, graph_id: str) -> dict[str, list]:
    return dash_duo.driver.execute_script(
        f"var gd = document.querySelector('#{graph_id} .js-plotly-plot');"
        "var out = {}; gd.data.forEach(function (d) { out[d.name] = Array.from(d.y); }); return out;")


# ---------------------------------------------------------------------------------------------------------------
# Library: freud_pipeline.features.editing / runs
# ---------------------------------------------------------------------------------------------------------------


def test_parse_edits():
    from freud_pipeline.features.editing import EditError, format_edits, parse_edits

    assert parse_edits("12:0, 40:1.5") == {12: 0.0, 40: 1.5}
    assert parse_edits("12 40=−1".replace("−", "-"), default_factor=2) == {12: 2.0, 40: -1.0}
    assert parse_edits("7 : -0.5; 8x3") == {7: -0.5, 8: 3.0}
    assert format_edits({12: 0.0, 40: 1.5}) == "12:0, 40:1.5"
    for bad, message in (("", "at least one"), ("abc", "cannot read"), ("3:x", "cannot read"),
                         ("1, 1:2", "twice"), ("5000", "out of range"), ("2:inf", "cannot read")):
        with pytest.raises(EditError, match=message):
            parse_edits(bad, n_latents=1536)


def test_edit_clip_ablates_only_where_the_latent_fires(sae_world, top_latent, clip_dir):
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.features.editing import EditError, edit_clip

    audio = load_audio(clip_dir / "clips" / "hello-world.wav")
    result = edit_clip(audio, sae_world["set_id"], {top_latent: 0.0}, keep_error=True, index=sae_world["index"])
    trace = result["traces"][top_latent]
    before, after = np.array(trace["before"]), np.array(trace["after"])
    expected = sae_world["latents"][EDIT_CLIP][:, top_latent]
    np.testing.assert_allclose(before, expected, rtol=1e-3, atol=1e-3)
    assert before.max() > 0 and (after == 0).all()
    change = np.array(result["activation_change"])
    assert change.shape == before.shape and change[before > 0].min() > 0
    assert change[before == 0].max() < 1e-3  # a factor acts only where the latent is active
    assert "hello" in result["transcripts"]["original"].lower()
    assert set(result["transcripts"]) == {"original", "spliced", "edited"}
    assert 0 < result["reconstruction_fvu"] < 1
    # keep_error with factor 1 is the identity: the edited model is the original model
    same = edit_clip(audio, (sae_world["runs"][32].checkpoint_dir, "tiny.en", HOOK), {top_latent: 1.0})
    assert same["transcripts"]["edited"] == same["transcripts"]["original"] and not same["changed"]
    assert max(same["activation_change"]) < 1e-3
    with pytest.raises(EditError, match="out of range"):
        edit_clip(audio, sae_world["set_id"], {10**6: 0.0}, index=sae_world["index"])


def test_edit_and_clip_features_report_their_stages(sae_world, top_latent, clip_dir):
    """The progress hooks the app's background callbacks use: stage texts, and an exception raised by the hook
    (how the app cancels a job) aborts the edit and leaves it free for the next one."""
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.features import editing

    audio = load_audio(clip_dir / "clips" / "hello-world.wav")
    stages = []
    result = editing.edit_clip(audio, sae_world["set_id"], {top_latent: 0.0}, index=sae_world["index"],
                               progress=stages.append)
    assert stages == EDIT_STAGES

    class Stop(Exception):
        pass

    def stop_before_decoding(text):
        if text.startswith("Transcribing"):
            raise Stop

    with pytest.raises(Stop):
        editing.edit_clip(audio, sae_world["set_id"], {top_latent: 0.0}, index=sae_world["index"],
                          progress=stop_before_decoding)
    from freud_pipeline.whisper.models import model_lock

    lock, free = model_lock(editing._edit_whisper("tiny.en", "cpu")), []

    def try_lock():  # from another thread: the lock is re-entrant, so this thread would always get it
        if lock.acquire(blocking=False):
            lock.release()
            free.append(True)

    probe = threading.Thread(target=try_lock)
    probe.start()
    probe.join()
    assert free == [True]  # the aborted edit released the model
    again = editing.edit_clip(audio, sae_world["set_id"], {top_latent: 0.0}, index=sae_world["index"])
    assert again["transcripts"] == result["transcripts"]  # no splice left behind on the model
    seen = []
    features = sae_world["index"].clip_features(audio, sae_world["set_id"], 3, progress=seen.append)
    assert len(features) == 3
    assert seen == ["Loading Whisper and the SAE…", "Running Whisper's encoder and the SAE…", "Ranking the features…"]


def test_runs_listing_and_comparison(sae_world, tmp_path):
    from freud_pipeline.features.runs import compare_runs, feature_sets_by_run, headline, list_runs, run_url

    runs = list_runs(sae_world["uri"])
    assert [r["k"] for r in runs] == ["32", "16"]  # newest first
    for run in runs:
        assert 0 < run["fvu"] < 1 and run["l0"] == pytest.approx(float(run["k"]), rel=0.05)
        assert run["dead_pct"] is not None and run["architecture"] == "topk" and run["hook"] == HOOK
        assert run_url(run).startswith("http://127.0.0.1:5000/#/experiments/")
    cmp = compare_runs(runs[0], runs[1])
    assert "k" in cmp["differing"] and "hook" not in cmp["differing"]
    assert [r["name"] for r in cmp["metrics"][:3]] == ["fvu", "l0", "dead_pct"]
    by_run = feature_sets_by_run(sae_world["index"].sets())
    assert list(by_run) == [sae_world["runs"][32].run_id]
    assert list_runs(f"sqlite:///{tmp_path / 'none.db'}") == []
    # the topk_sae asset logs its held-out splice evaluation as splice/...; the final evaluation wins over steps
    logged = {"splice/ce_recovered": 0.8, "splice/ce_recovered_vs_mean": 0.9, "splice/wer_spliced": 0.0,
              "splice/wer_original": 0.1, "eval/fvu": 0.2, "fvu": 0.3, "eval/dead_fraction": 0.05, "l0": 31.0}
    assert headline(logged) == {"fvu": 0.2, "l0": 31.0, "dead_pct": 5.0, "ce_recovered": 0.8, "wer": 0.0,
                                "delta_wer": -0.1, "delta_wer_ci_low": None, "delta_wer_ci_high": None}
    logged |= {"splice/delta_wer": -0.1, "splice/delta_wer_ci_low": -0.2, "splice/delta_wer_ci_high": 0.01}
    assert headline(logged)["delta_wer_ci_low"] == -0.2 and headline(logged)["delta_wer_ci_high"] == 0.01
    assert not (tmp_path / "none.db").exists()


def test_app_is_served_threaded(monkeypatch):
    """`python -m dash_app --workers 1` serves with Flask's threaded server (slow work runs on background threads)."""
    import werkzeug.serving

    import dash_app

    seen = {}
    monkeypatch.setattr(werkzeug.serving, "run_simple", lambda *a, **kw: seen.update(kw))
    assert dash_app.main(["--port", "8123", "--workers", "1"]) == 0
    assert seen["threaded"] is True


def test_app_is_served_by_gunicorn_workers(tmp_path):
    """The default server: gunicorn with 2 worker processes (threads in each) on 127.0.0.1, answering pages."""
    import http.client
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dash_app", "--port", str(port), "--data-dir", str(tmp_path)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/search")
                response = conn.getresponse()
                response.read()
                conn.request("GET", "/audio/no-such-clip")
                missing = conn.getresponse().status
                status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200 and missing == 404
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Using worker: gthread" in out and out.count("Booting worker") == 2
    assert f"Listening at: http://127.0.0.1:{port}" in out


def test_a_job_started_on_one_server_is_collected_from_another(tmp_path, clip_dir):
    """Two app processes on one data directory stand for two gunicorn workers: an upload's analysis started on
    one is polled for, and collected, on the other (one signing secret, one job cache)."""
    import base64
    import socket
    import subprocess
    import sys
    from urllib.parse import quote

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-m", "dash_app", "--port", str(port), "--workers", "1",
                               "--data-dir", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    first, second = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        deps = None
        deadline = time.monotonic() + 90
        while deps is None or not all(_up(url) for url in (first, second)):
            assert time.monotonic() < deadline, "the app servers did not start"
            try:
                deps = json.loads(urllib.request.urlopen(first + "/_dash-dependencies", timeout=5).read())
            except OSError:
                time.sleep(0.5)
        analyse = next(d for d in deps if "upload-error.children" in d["output"]
                       and any(i["id"] == "upload-audio" for i in d["inputs"]))
        wav = (clip_dir / "clips" / "hello-world.wav").read_bytes()
        body = _payload(analyse, {"upload-audio.contents": "data:audio/wav;base64," + base64.b64encode(wav).decode(),
                                  "upload-set.value": "no-such-set", "upload-topn.value": "32"},
                        {"upload-audio.filename": "hello-world.wav"})
        _, handles = _post(first, body)
        assert handles["job"].startswith(f"{procs[0].pid}-")  # runs in the first server's process
        query = f"?cacheKey={quote(handles['cacheKey'])}&job={quote(handles['job'])}"
        deadline, answer = time.monotonic() + 60, {}
        while "response" not in answer:
            assert time.monotonic() < deadline, "no result came back through the second server"
            time.sleep(0.2)
            _, answer = _post(second, body, query)
        # the empty index's message, in its place next to the upload control
        assert "feature index" in answer["response"]["upload-error"]["children"]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/_dash-layout", timeout=5).status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Browser: /edit
# ---------------------------------------------------------------------------------------------------------------


def test_edit_page_ablating_the_top_feature(dash_duo, sae_world, top_latent):
    dash_duo.start_server(_app(sae_world))
    dash_duo.driver.get(dash_duo.server_url + f"/edit?clip={EDIT_CLIP}")
    dash_duo.wait_for_contains_text("#edit-source-summary", EDIT_CLIP, timeout=60)
    dash_duo.wait_for_element("#edit-pick-list button", timeout=60)
    first = dash_duo.find_elements("#edit-pick-list button")[0]
    assert first.text.split()[0] == str(top_latent)  # the clip's top feature is the first quick pick
    first.click()
    dash_duo.wait_for_text_to_equal("#edit-features", str(top_latent))
    assert dash_duo.find_element("#edit-factor").get_attribute("value") == "0"  # default: ablate
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_element("#edit-graph .js-plotly-plot", timeout=120)
    traces = _figure_traces(dash_duo, "edit-graph")
    after, before = traces[f"feature {top_latent} after (×0)"], traces[f"feature {top_latent} before"]
    change = traces["activation change ‖Δx‖"]
    assert max(before) > 0 and all(v == 0 for v in after)
    assert max(change) > 0
    assert "hello" in dash_duo.find_element("#edit-transcript-original").text.lower()
    assert dash_duo.find_element("#edit-transcript-edited").text.strip()
    assert dash_duo.find_element("#edit-verdict").text
    link = dash_duo.find_element(f"#edit-table a[href*='index={top_latent}']")
    assert sae_world["set_id"].split("/")[0] in link.get_attribute("href")
    dash_duo.wait_for_element("#edit-spectrogram .js-plotly-plot")
    _see(dash_duo, "edit-ablate-top-feature", "#edit-graph", "#edit-spectrogram", "#edit-spectrogram image",
         "#edit-player")


def test_edit_page_upload_errors_and_flip(dash_duo, sae_world, top_latent, clip_dir):
    dash_duo.start_server(_app(sae_world))
    dash_duo.wait_for_element("#nav-edit").click()
    dash_duo.wait_for_element("#edit-go")
    assert "active" in dash_duo.find_element("#nav-edit").get_attribute("class")
    # nothing loaded yet: the message sits next to the audio control
    _type(dash_duo, "#edit-features", "3")
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_contains_text("#edit-audio-error", "Upload or record a clip")
    # an unknown dataset clip
    _type(dash_duo, "#edit-clip-id", "nope")
    dash_duo.find_element("#edit-clip-go").click()
    dash_duo.wait_for_contains_text("#edit-clip-error", "No clip 'nope'")
    # upload a WAV
    dash_duo.find_element("#edit-upload input").send_keys(str(clip_dir / "clips" / "hello-world.wav"))
    dash_duo.wait_for_contains_text("#edit-source-summary", "hello-world.wav", timeout=60)
    assert dash_duo.find_element("#edit-clip-error").text == ""
    # bad features and factor: messages next to their controls, cleared by the next change
    _type(dash_duo, "#edit-features", "abc")
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_contains_text("#edit-features-error", "Cannot read 'abc'")
    _type(dash_duo, "#edit-features", "99999")
    dash_duo.wait_for_text_to_equal("#edit-features-error", "")
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_contains_text("#edit-features-error", "out of range")
    _type(dash_duo, "#edit-factor", "lots")
    dash_duo.wait_for_text_to_equal("#edit-features-error", "")
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_contains_text("#edit-factor-error", "must be a number")
    _see(dash_duo, "edit-errors")
    # flip the top feature, without the error term
    _type(dash_duo, "#edit-factor", "0")
    _type(dash_duo, "#edit-features", f"{top_latent}:-3")
    dash_duo.find_element("#edit-keep-error input").click()
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_element("#edit-graph .js-plotly-plot", timeout=120)
    assert dash_duo.find_element("#edit-factor-error").text == ""
    traces = _figure_traces(dash_duo, "edit-graph")
    before, after = traces[f"feature {top_latent} before"], traces[f"feature {top_latent} after (×-3)"]
    assert min(after) == pytest.approx(-3 * max(before), rel=1e-3)
    assert "SAE reconstruction" in dash_duo.find_element("#edit-transcripts").text
    assert dash_duo.find_element("#edit-player").get_attribute("src").startswith("data:audio/wav;base64,")
    _see(dash_duo, "edit-upload-flip", "#edit-graph", "#edit-spectrogram", "#edit-spectrogram image", "#edit-player")


def test_search_and_upload_pages_link_into_the_edit_page(dash_duo, sae_world, top_latent, clip_dir):
    """An SAE feature's search result and an uploaded clip's feature open /edit with that feature ablated."""
    set_id = sae_world["set_id"]
    dash_duo.start_server(_app(sae_world))
    dash_duo.driver.get(dash_duo.server_url + f"/search?set={set_id}&index={top_latent}&n=3")
    dash_duo.wait_for_element("#result-0 .edit-link", timeout=60)
    href = dash_duo.find_element("#result-0 .edit-link").get_attribute("href")
    clip_id = dash_duo.find_element("#result-0 .clip-id").text
    assert f"/edit?clip={clip_id}" in href and f"features={top_latent}%3A0" in href
    dash_duo.find_element("#result-0 .edit-link").click()
    dash_duo.wait_for_contains_text("#edit-source-summary", clip_id, timeout=60)
    assert dash_duo.find_element("#edit-features").get_attribute("value") == f"{top_latent}:0"
    # the upload page hands its (uploaded) clip over by token, not by path
    dash_duo.driver.get(dash_duo.server_url + f"/upload?set={set_id}")
    dash_duo.find_element("#upload-audio input").send_keys(str(clip_dir / "clips" / "hello-world.wav"))
    dash_duo.wait_for_element("#upload-edit-link", timeout=90)
    href = dash_duo.find_element("#upload-edit-link").get_attribute("href")
    assert "/edit?upload=" in href and "clips" not in href and "%3A0" in href
    # a JS click: the link may wrap onto two lines, and Selenium aims at the centre of its bounding box
    dash_duo.driver.execute_script("arguments[0].click();", dash_duo.find_element("#upload-edit-link"))
    dash_duo.wait_for_contains_text("#edit-source-summary", "clip from the upload page", timeout=60)
    dash_duo.find_element("#edit-go").click()
    dash_duo.wait_for_element("#edit-graph .js-plotly-plot", timeout=120)
    assert dash_duo.find_element("#edit-features-error").text == ""


_WATCH_PROGRESS = """
window.progressSeen = [];
var box = document.getElementById('edit-progress'), text = document.getElementById('edit-progress-text');
new MutationObserver(function () {
    if (box.style.display !== 'none') { window.progressSeen.push(text.textContent); }
}).observe(box, {attributes: true, childList: true, subtree: true, characterData: true});
"""


def test_edit_progress_shows_stages_and_cancel_stops_an_edit(dash_duo, sae_world, top_latent, clip_dir, tmp_path):
    """An edit of a long upload runs in the background: the indicator shows its stages, Cancel ends it (no
    result), and the next edit's result replaces the indicator. The browser polls the latest stage only, so it
    may miss a short one: each job's whole sequence of stages is read from the app's background manager."""
    from dash.testing.wait import until

    from dash_app.background import STARTING

    long_wav = tmp_path / "long.wav"
    long_wav.write_bytes(_wav(_long_clip(clip_dir)))
    app = _app(sae_world)
    dash_duo.start_server(app)
    dash_duo.driver.get(dash_duo.server_url + "/edit")
    dash_duo.find_element("#edit-upload input").send_keys(str(long_wav))
    dash_duo.wait_for_contains_text("#edit-source-summary", "long.wav", timeout=60)
    dash_duo.wait_for_element("#edit-pick-list button", timeout=90)
    _type(dash_duo, "#edit-features", f"{top_latent}:0")
    dash_duo.driver.execute_script(_WATCH_PROGRESS)
    progress, go, cancel = (dash_duo.find_element(f"#{i}") for i in ("edit-progress", "edit-go", "edit-cancel"))
    assert not progress.is_displayed() and not cancel.is_displayed()
    manager = app.freud_background  # its cache also holds earlier tests' jobs (one data directory)
    earlier = set(manager.jobs())
    # first edit: cancelled while Whisper works
    go.click()
    until(lambda: "Whisper" in dash_duo.find_element("#edit-progress-text").text, 60)
    assert progress.is_displayed() and not go.is_enabled() and cancel.is_displayed()
    _see(dash_duo, "edit-progress", settle=0.5)  # soon: Cancel is to stop it part-way
    cancel.click()
    until(lambda: not progress.is_displayed(), 10)
    assert go.is_enabled() and not cancel.is_displayed() and not dash_duo.find_elements("#edit-output")
    # second edit: runs to the end (after the cancelled one has stopped at its next stage)
    go.click()
    dash_duo.wait_for_element("#edit-graph .js-plotly-plot", timeout=180)
    until(lambda: not progress.is_displayed(), 10)
    # the first edit stopped part-way through its stages; the second reported every stage, in order
    jobs = [job for job in manager.jobs() if job not in earlier]
    edits = [stages for stages in map(manager.stages, jobs) if [EDIT_STAGES[0]] in stages]
    assert len(edits) == 2, edits
    cancelled, finished = edits
    full = [[stage] for stage in [*EDIT_STAGES, "Drawing the results…"]]
    # the second may have waited for the model while the cancelled one ran on to its next stage
    waited = [["Waiting for another edit to finish…"]]
    assert finished in (full, full[:1] + waited + full[1:]), finished
    assert 1 <= len(cancelled) < len(EDIT_STAGES) and cancelled == full[: len(cancelled)], cancelled
    # and the indicator showed those stages (decoding a long clip takes many polls), no other text
    seen = [text for text in dash_duo.driver.execute_script("return window.progressSeen;") if text != STARTING]
    assert EDIT_STAGES[4] in seen and all([text] in finished for text in seen), seen
    assert dash_duo.find_element("#edit-transcript-original").text.strip()
    assert go.is_enabled() and not cancel.is_displayed()


def _wav(audio: np.ndarray) -> bytes:
    import io
    import wave

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return out.getvalue()


def test_edit_page_records_from_the_fake_microphone(dash_duo, sae_world):
    """The edit page's recorder (the shared freud.record, writing to its own store) loads a recording."""
    dash_duo.start_server(_app(sae_world))
    dash_duo.driver.get(dash_duo.server_url + "/edit")
    dash_duo.wait_for_element("#edit-record-button").click()
    dash_duo.wait_for_text_to_equal("#edit-record-button", "■ Stop", timeout=15)
    assert "press Stop to use it" in dash_duo.find_element("#edit-record-status").text
    time.sleep(1.5)
    dash_duo.find_element("#edit-record-button").click()
    dash_duo.wait_for_contains_text("#edit-source-summary", "recording.webm", timeout=60)
    assert dash_duo.find_element("#edit-audio-error").text == ""
    _see(dash_duo, "edit-recording")


def test_edit_page_without_sae_set(dash_duo, feature_index_stub):
    from dash_app import create_app

    dash_duo.start_server(create_app(feature_index_stub))
    dash_duo.driver.get(dash_duo.server_url + "/edit")
    dash_duo.wait_for_contains_text("#edit-no-sae", "No SAE feature set to edit")
    _see(dash_duo, "edit-no-sae-set")


@pytest.fixture
def feature_index_stub():
    class NeuronOnly:
        def sets(self):
            return [{"set_id": "tiny.en:encoder.blocks.2.mlp.1", "model": "tiny.en", "hook": "encoder.blocks.2.mlp.1",
                     "kind": "neuron", "n_features": 1536}]

    return NeuronOnly()


# ---------------------------------------------------------------------------------------------------------------
# Browser: /runs
# ---------------------------------------------------------------------------------------------------------------


def test_runs_page_lists_and_compares_two_runs(dash_duo, sae_world):
    dash_duo.start_server(_app(sae_world))
    dash_duo.wait_for_element("#nav-runs").click()
    dash_duo.wait_for_contains_text("#runs-count", "2 runs", timeout=60)
    rows = dash_duo.find_elements("#runs-table tbody tr")
    assert len([r for r in rows if r.find_elements("css selector", "td")]) == 2
    header = dash_duo.find_element("#runs-table").text
    for name in ("FVU", "L0", "dead %", "CE recovered", "WER", "ΔWER", "feature set", "MLflow"):
        assert name in header
    # The trade-off plot: both runs in the FVU panel (these runs were trained without a splice evaluation,
    # which the ΔWER panel says).
    points = dash_duo.driver.execute_script(
        "const g = document.querySelector('#runs-tradeoff .js-plotly-plot');"
        "return g.data.filter(t => t.xaxis === 'x' || !t.xaxis).reduce((n, t) => n + t.x.length, 0);")
    assert points == 2
    assert "no run has a splice evaluation" in dash_duo.find_element("#runs-tradeoff").text
    set_links = dash_duo.find_elements("#runs-table a.run-set-link")
    assert len(set_links) == 1 and sae_world["set_id"] in set_links[0].text
    mlflow = dash_duo.find_elements("#runs-table a[target='_blank']")
    assert len(mlflow) == 2 and all(a.get_attribute("href").startswith("http://127.0.0.1:5000/#/experiments/")
                                    for a in mlflow)
    dash_duo.wait_for_contains_text("#runs-compare-hint", "Tick two runs")
    for box in dash_duo.find_elements("#runs-table input[type='checkbox']")[:2]:
        box.click()
    dash_duo.wait_for_element("#runs-compare-table", timeout=30)
    assert dash_duo.find_element("#runs-differing").text.split(", ")[0] == "k" or \
        "k" in dash_duo.find_element("#runs-differing").text.split(", ")
    k_row = next(r for r in dash_duo.find_elements("#runs-compare-table tr.differs")
                 if r.find_elements("css selector", "td") and r.find_elements("css selector", "td")[0].text == "k")
    cells = [td.text for td in k_row.find_elements("css selector", "td")]
    assert sorted(cells[1:]) == ["16", "32"]
    assert "fff3e0" in k_row.find_elements("css selector", "td")[1].get_attribute("style") or \
        "255, 243, 224" in k_row.find_elements("css selector", "td")[1].get_attribute("style")
    table = dash_duo.find_element("#runs-compare-table").text
    assert table.count("FVU (final eval)") == 1 and table.count("dead % (final eval)") == 1
    _see(dash_duo, "runs-compare")
    # sort by FVU (native sorting) keeps both rows
    dash_duo.find_element("#runs-table th[data-dash-column='fvu'] .column-header--sort").click()
    time.sleep(0.5)
    assert len(dash_duo.find_elements("#runs-table tbody tr td[data-dash-column='fvu']")) == 2
    # the run's feature set opens in the search page
    dash_duo.find_element("#runs-table a.run-set-link").click()
    dash_duo.wait_for_element("#search-set", timeout=30)
    assert "set=" in dash_duo.driver.current_url


def test_runs_page_without_runs(dash_duo, sae_world, tmp_path):
    from dash_app import create_app

    dash_duo.start_server(create_app(sae_world["index"], data_dir=sae_world["data_dir"],
                                     mlflow_uri=f"sqlite:///{tmp_path / 'empty.db'}"))
    dash_duo.driver.get(dash_duo.server_url + "/runs")
    dash_duo.wait_for_contains_text("#runs-empty", "No SAE runs yet", timeout=60)
    _see(dash_duo, "runs-empty")


# ---------------------------------------------------------------------------------------------------------------
# Concurrency: a search is answered while an edit runs
# ---------------------------------------------------------------------------------------------------------------


def _callback(deps: list[dict], output_part: str) -> dict:
    return next(d for d in deps if output_part in d["output"])


def _payload(dep: dict, inputs: dict, state: dict | None = None) -> bytes:
    def items(specs, values):
        return [{"id": s["id"], "property": s["property"], "value": values.get(f"{s['id']}.{s['property']}")}
                for s in specs]

    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1].split("@")[0]}
               for o in dep["output"].strip(".").split("...")]
    body = {"output": dep["output"], "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": items(dep["inputs"], inputs), "state": items(dep["state"], state or {}),
            "changedPropIds": [f"{dep['inputs'][0]['id']}.{dep['inputs'][0]['property']}"]}
    return json.dumps(body).encode()


def _post(url: str, body: bytes, query: str = "") -> tuple[float, dict]:
    request = urllib.request.Request(url + "/_dash-update-component" + query, data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        data = json.loads(response.read())
    return time.perf_counter() - started, data


def _long_clip(clip_dir) -> np.ndarray:
    """The prompts back to back, twice, cut at 30 s of real speech: an edit of it decodes many tokens."""
    from freud_pipeline.audio.decode import load_audio

    parts = [load_audio(clip_dir / "clips" / f"{name}.wav") for name in PROMPTS]
    return np.concatenate(parts + parts)[: 30 * 16000]


def test_search_is_answered_while_an_edit_runs(sae_world, top_latent, clip_dir):
    """The edit is a background job: the request that starts it returns at once, the client polls (as the
    browser does) for progress and the result, and searches sent meanwhile are answered while it still runs."""
    from urllib.parse import quote

    from werkzeug.serving import make_server

    from dash_app.background import RUNNING

    app = _app(sae_world)
    server = make_server("127.0.0.1", 0, app.server, threaded=True)  # what app.run does (threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    manager = app.freud_background
    try:
        deps = json.loads(urllib.request.urlopen(url + "/_dash-dependencies", timeout=30).read())
        search = _callback(deps, "search-results.children")
        edit = next(d for d in deps if d["output"].startswith("..edit-results.children@")
                    and any(i["id"] == "edit-go" for i in d["inputs"]))
        search_body = _payload(search, {"url.search": f"?set={sae_world['set_id']}&index={top_latent}&n=5",
                                        "search-page.id": "search-page"}, {"url.pathname": "/search"})
        _post(url, search_body)  # warm: the clip audio and figures
        # a long upload, stored as the edit page's upload control stores one
        token = app.freud_access.uploads.put(_long_clip(clip_dir))
        edit_body = _payload(edit, {"edit-go.n_clicks": 1}, {
            "edit-source.data": {"kind": "upload", "token": token, "label": "long.wav"},
            "edit-set.value": sae_world["set_id"], "edit-features.value": f"{top_latent}:0",
            "edit-factor.value": "0", "edit-keep-error.value": ["keep"]})
        started = time.perf_counter()
        seconds, handles = _post(url, edit_body)
        assert "response" not in handles and seconds < 5  # started, not waited for
        job = handles["job"].rpartition("~")[0]  # the signed handle's value: "<pid>-<uuid hex>"
        query = f"?cacheKey={quote(handles['cacheKey'])}&job={quote(handles['job'])}"
        searches, progress, result = [], [], None
        n_latents = int(next(s for s in sae_world["index"].sets() if s["set_id"] == sae_world["set_id"])["n_features"])
        while result is None and time.perf_counter() - started < 300:
            feature = (top_latent + len(searches) + 1) % n_latents  # a new feature each time: no cached page
            seconds, answer = _post(url, _payload(search, {
                "url.search": f"?set={sae_world['set_id']}&index={feature}&n=5", "search-page.id": "search-page"},
                {"url.pathname": "/search"}))
            assert "search-results" in answer["response"]
            searches.append((seconds, manager.job_state(job) == RUNNING))  # was the edit running when it came?
            _, poll = _post(url, edit_body, query)
            progress += list((poll.get("progress") or {}).values())
            if "response" in poll:
                result = poll
            time.sleep(0.05)
        assert result is not None and "edit-results" in result["response"]
        assert "edit-transcripts" in json.dumps(result["response"]["edit-results"])
        answered_during = [s for s, running in searches if running]
        assert answered_during, "no search was answered while the edit was running"
        assert any("Transcribing" in str(p) or "encoder" in str(p) for p in progress), progress
    finally:
        server.shutdown()
