"""Labels that mean something: lift over base rates, significance, artefacts, phone classes, held-out voices.

Clips: recorded Asterisk prompts (speaker "allison", aligned by pocketsphinx) and Festival sentences (voice "slt",
the synthesiser's own timings), made by the dataset builders. Planted features are activation arrays over those
clips' real frames, firing where the real alignments say (or following the real audio's loudness); the last tests
index real tiny.en MLP neurons.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import require_extra
from freud_pipeline.features import FeatureIndex
from freud_pipeline.features.build import build_feature_set
from freud_pipeline.features.labels import (
    ALPHA, LOUD_SHARE, MIN_LIFT, ONSET_FRAMES, VALIDATED_PRECISION, AlignmentError, heldout_split, interval_frames,
)
from freud_pipeline.frames import FRAME_SECONDS, SAMPLE_RATE, SAMPLES_PER_FRAME, frame_loudness_db

ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
HOOK = "encoder.blocks.2.mlp.1"
TOP_K = 12
ONSET, N_DETECTOR, RANDOM, S_OR_Z, N_THEN_M, SILENT, LOUD = range(7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    require_extra(ALLISON.is_dir() and shutil.which("festival") is not None,
                  "Debian asterisk-core-sounds-en-g722, festival and festvox-us-slt-hts")
    from freud_pipeline.audio.datasets import build_asterisk_prompts, build_festival_speech

    root = tmp_path_factory.mktemp("label-corpus")
    builds = [build_asterisk_prompts(root / "asterisk", limit=30, data_root=root),
              build_festival_speech(root / "festival", n_sentences=10, seed=2, data_root=root)]
    manifest = pd.concat([pd.read_parquet(b.manifest_path) for b in builds], ignore_index=True)
    alignments = pd.concat([pd.read_parquet(b.alignments_path) for b in builds], ignore_index=True)
    frames = {r.clip_id: int(np.ceil(r.duration_s / FRAME_SECONDS)) for r in manifest.itertuples()}
    return {"root": root, "manifest": manifest, "alignments": alignments, "frames": frames}


def _frames_of(alignments: pd.DataFrame, clip_id: str, phones: set[str]) -> list[tuple[int, int]]:
    rows = alignments[(alignments.clip_id == clip_id) & (alignments.tier == "phone") & alignments.label.isin(phones)]
    return [tuple(int(x) for x in interval_frames(r.start_s, r.end_s)) for r in rows.itertuples()]


@pytest.fixture(scope="module")
def planted(corpus, tmp_path_factory):
    """Seven planted features over every clip's frames, indexed with build_feature_set (given the data root, so
    the labels see each clip's loudness)."""
    from freud_pipeline.audio.decode import load_audio

    rng = np.random.default_rng(0)
    manifest, alignments = corpus["manifest"], corpus["alignments"]
    speaker, path = dict(zip(manifest.clip_id, manifest.speaker)), dict(zip(manifest.clip_id, manifest.path))
    acts, loudness = {}, {}
    for clip_id, n_frames in corpus["frames"].items():
        a = rng.uniform(-0.1, 0.0, (n_frames, 7)).astype(np.float32)
        a[:3, ONSET] = 1 + rng.uniform()  # the first 60 ms of every clip
        for phone_set, feature in (({"n"}, N_DETECTOR), ({"s", "z"}, S_OR_Z),
                                   ({"n"} if speaker[clip_id] == "allison" else {"m"}, N_THEN_M)):
            for start, stop in _frames_of(alignments, clip_id, phone_set):
                a[start:stop, feature] = 1 + rng.uniform()
        a[:, RANDOM] = rng.uniform(0, 1, n_frames)
        loudness[clip_id] = level = frame_loudness_db(load_audio(corpus["root"] / path[clip_id]))[:n_frames]
        a[: len(level), LOUD] = np.maximum(level + 120, 0)  # the clip's level in dB above -120 dBFS
        acts[clip_id] = a
    uri = str(tmp_path_factory.mktemp("label-index"))
    summary = build_feature_set(iter(acts.items()), set_id="planted", model="tiny.en", hook=HOOK, kind="neuron",
                                manifest_df=manifest, alignments_df=alignments, index_uri=uri, top_k=TOP_K,
                                data_root=corpus["root"])
    return {"acts": acts, "loudness": loudness, "uri": uri, "ix": FeatureIndex(uri, read_consistency_interval=0),
            "summary": summary["label_summary"]}


def _peak_frames(acts: dict, clip_ids, feature: int) -> dict[str, int]:
    """Peak frame of `feature` in its TOP_K strongest clips among `clip_ids` (clips where it fires at all)."""
    peaks = {c: acts[c][:, feature].max() for c in clip_ids if acts[c][:, feature].max() > 0}
    best = sorted(peaks, key=lambda c: -peaks[c])[:TOP_K]
    return {c: int(acts[c][:, feature].argmax()) for c in best}


def test_onset_feature_is_an_artefact_not_a_phone(planted):
    info = planted["ix"].feature("planted", ONSET)
    assert (info["label"], info["label_kind"], info["artefact"]) == ("clip onset", "artefact", True)
    assert info["label_precision"] == 1.0 and info["label_heldout_precision"] == 1.0
    assert not info["label_validated"] and info["word_label"] is None  # validated: phone/class labels only
    assert "first 100 ms" in info["label_reason"]


def test_phone_detector_gets_its_phone_with_a_significant_lift(corpus, planted):
    info = planted["ix"].feature("planted", N_DETECTOR)
    assert (info["label"], info["label_kind"], info["artefact"]) == ("n", "phone", False)
    assert info["label_precision"] == 1.0 and info["label_p_value"] < ALPHA and info["label_lift"] >= MIN_LIFT
    # The base rate, brute force: the share of the training clips' frames an "n" covers.
    train = corpus["manifest"][corpus["manifest"].speaker == "allison"].clip_id
    on_n = sum(b - a for c in train for a, b in _frames_of(corpus["alignments"], c, {"n"}))
    base = on_n / sum(corpus["frames"][c] for c in train)
    assert info["label_base_rate"] == pytest.approx(base, rel=1e-5)
    assert info["label_lift"] == pytest.approx(1 / base, rel=1e-5) and info["label_n_peaks"] == TOP_K
    assert 0 < info["label_recall"] <= 1 and info["label_validated"]
    assert N_DETECTOR in [r["index"] for r in planted["ix"].features_by_label("planted", "n")]


def test_a_feature_firing_at_random_gets_no_label(planted):
    random = planted["ix"].feature("planted", RANDOM)
    assert random["label"] is None and random["label_kind"] is None and random["word_label"] is None
    assert random["label_reason"].startswith("no phone or class clearly above chance")
    assert random["label_lift"] is None and not random["label_validated"]
    silent = planted["ix"].feature("planted", SILENT)  # never above the fire threshold: no peaks at all
    assert silent["label"] is None and silent["label_n_peaks"] == 0 and silent["label_reason"].startswith("only 0")


def test_a_phone_class_wins_when_it_explains_the_peaks_better(planted):
    info = planted["ix"].feature("planted", S_OR_Z)  # fires on s and z alike: neither phone alone explains it
    assert (info["label"], info["label_kind"]) == ("alveolar sibilant", "class")
    assert info["label_precision"] == 1.0 and "(s/z)" in info["label_reason"] and info["label_validated"]


def test_heldout_precision_is_measured_on_the_voice_the_labels_never_saw(corpus, planted):
    summary, ix, acts = planted["summary"], planted["ix"], planted["acts"]
    assert (summary["heldout_by"], summary["train_speakers"], summary["heldout_speakers"]) == \
        ("speaker", ["allison"], ["slt"])
    slt = corpus["manifest"][corpus["manifest"].speaker == "slt"].clip_id.tolist()
    assert summary["n_heldout_clips"] == len(slt)
    for feature, phone in ((N_DETECTOR, "n"), (N_THEN_M, "n")):
        info = ix.feature("planted", feature)
        assert info["label"] == phone  # learned on allison, where both fire on "n"
        peaks = _peak_frames(acts, slt, feature)
        on_label = [any(a <= frame < b for a, b in _frames_of(corpus["alignments"], c, {phone}))
                    for c, frame in peaks.items()]
        assert info["label_heldout_n"] == len(peaks) > 0
        assert info["label_heldout_precision"] == pytest.approx(np.mean(on_label))
    assert ix.feature("planted", N_DETECTOR)["label_heldout_precision"] == 1.0
    switched = ix.feature("planted", N_THEN_M)  # on slt it fires on "m": the "n" label does not hold there
    assert switched["label_heldout_precision"] == 0.0 and not switched["label_validated"]
    assert summary["n_validated"] == 2 and summary["share_validated"] == pytest.approx(2 / 7)
    assert summary["artefacts"]["clip onset"] == 1 and summary["n_labelled"] == 3
    assert summary["artefacts"]["loudness"] == 1


def test_a_feature_following_loudness_is_a_loudness_artefact_not_a_phone(corpus, planted):
    info = planted["ix"].feature("planted", LOUD)
    assert (info["label"], info["label_kind"], info["artefact"]) == ("loudness", "artefact", True)
    assert info["label_p_value"] < ALPHA and info["label_lift"] > 1 and info["word_label"] is None
    assert info["label_precision"] == 1.0 and "loudest 10% of frames" in info["label_reason"]
    # The base rate, brute force: the share of the training clips' frames among their clip's loudest 10%.
    levels, manifest = planted["loudness"], corpus["manifest"]
    train = manifest[manifest.speaker == "allison"].clip_id
    loud = {c: np.pad((level >= np.quantile(level, 1 - LOUD_SHARE)) & (level > level.min()),
                      (0, corpus["frames"][c] - len(level))) for c, level in levels.items()}
    base = sum(loud[c].sum() for c in train) / sum(corpus["frames"][c] for c in train)
    assert info["label_base_rate"] == pytest.approx(base, rel=1e-5) and LOUD_SHARE <= base < 2 * LOUD_SHARE
    peaks = _peak_frames(planted["acts"], manifest[manifest.speaker == "slt"].clip_id, LOUD)
    assert info["label_heldout_n"] == len(peaks) > 0
    assert info["label_heldout_precision"] == pytest.approx(np.mean([loud[c][t] for c, t in peaks.items()]))


def test_a_vowel_detector_on_loud_frames_keeps_its_vowel(corpus, planted):
    """Loudness competes with the phones: a detector of "ah" whose peaks all sit on loud frames is still "ah"
    (the phone explains its peaks better); the clip's loudness itself is the artefact. Without the levels, no
    loudness test."""
    from freud_pipeline.features.build import clip_loudness
    from freud_pipeline.features.labels import LabelCollector

    manifest, alignments, levels = corpus["manifest"], corpus["alignments"], planted["loudness"]
    acts = {}
    for clip_id, n_frames in corpus["frames"].items():
        a = np.zeros((n_frames, 2), np.float32)
        a[: len(levels[clip_id]), 1] = levels[clip_id] + 120
        for start, stop in _frames_of(alignments, clip_id, {"ah"}):
            a[start:stop, 0] = a[start:stop, 1]
        acts[clip_id] = a
    results = []
    for loudness in (clip_loudness(manifest, corpus["root"]), None):
        collector = LabelCollector(alignments, 2, TOP_K, manifest=manifest, loudness=loudness)
        for clip_id, a in acts.items():
            collector.observe(clip_id, a)
        results.append(collector.result())
    tested, untested = results
    assert (tested.label, tested.kind) == (["ah", "loudness"], ["phone", "artefact"])
    train = manifest[manifest.speaker == "allison"].clip_id
    on_loud = [levels[c][t] >= np.quantile(levels[c], 1 - LOUD_SHARE) for c, t in _peak_frames(acts, train, 0).items()]
    assert np.mean(on_loud) >= 0.5  # the loudness test passed for it too, and lost to the phone
    assert untested.label[0] == "ah" and untested.label[1] != "loudness"
    assert "loudness" not in untested.summary["artefacts"]
    assert untested.p_value[0] < tested.p_value[0]  # one test fewer in the Bonferroni adjustment


def test_frame_loudness_is_the_rms_level_of_each_20_ms_frame():
    rng = np.random.default_rng(1)
    loud, quiet = rng.choice([-0.5, 0.5], SAMPLE_RATE // 2), rng.choice([-0.005, 0.005], SAMPLE_RATE // 2 + 100)
    level = frame_loudness_db(np.r_[loud, quiet].astype(np.float32))
    half = SAMPLE_RATE // 2 // SAMPLES_PER_FRAME
    assert len(level) == int(np.ceil((SAMPLE_RATE + 100) / SAMPLES_PER_FRAME))  # the partial last frame too
    assert level[:half] == pytest.approx(20 * np.log10(0.5), abs=1e-4)
    assert level[half:] == pytest.approx(20 * np.log10(0.005), abs=1e-4)  # 40 dB below: 20 log10(100)
    assert frame_loudness_db(np.zeros(10)).tolist() == [-200.0] and frame_loudness_db(np.zeros(0)).size == 0


def test_recall_compares_float16_samples_with_thresholds_exactly():
    """Recall counts sampled occurrences above a threshold without converting the float16 reservoir: the result
    equals the float comparison for every kind of value (ties, +-0, +-inf, NaN, thresholds beyond float16's range)."""
    from freud_pipeline.features.labels import _above

    rng = np.random.default_rng(0)
    sample = (rng.standard_normal((64, 3000)) * rng.exponential(1, 3000)).astype(np.float16)
    sample[0, :5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    threshold = rng.standard_normal(3000) * 0.5
    threshold[10:20] = sample[3, 10:20]  # exactly on a sample
    threshold[20:30] = np.nextafter(sample[3, 20:30].astype(np.float32), np.float32(-1))  # just below one
    threshold[30:40] = [0.0, -0.0, np.nan, 7e4, -7e4, 1e-9, -1e-9, 65504.0, 0.1, 0.5 * (0.1 + 0.3)]
    assert np.array_equal(_above(sample, threshold), sample.astype(np.float32) > threshold)


def test_the_commonest_word_is_found_without_a_count_per_word():
    """A feature's word is the commonest of its peaks' words (the smallest id among ties), found from its K peaks
    alone: the same as counting every word of the vocabulary per feature, for rows with ties, gaps and no word."""
    from freud_pipeline.features.labels import _commonest, _row_counts

    rng = np.random.default_rng(1)
    for _ in range(200):
        rows, k, words = int(rng.integers(1, 40)), int(rng.integers(1, 33)), int(rng.integers(1, 20))
        ids = rng.integers(-1, words, (rows, k))
        ids[rng.random((rows, k)) < rng.random()] = -1  # from none missing to all missing
        counts = _row_counts(ids, words)
        best, count = _commonest(ids, block=int(rng.integers(1, 50)))
        assert np.array_equal(best, counts.argmax(axis=1))
        assert np.array_equal(count, counts[np.arange(rows), counts.argmax(axis=1)])


def test_heldout_split_by_speaker_or_by_clip():
    manifest = pd.DataFrame({"clip_id": [f"c{i}" for i in range(40)],
                             "speaker": ["a"] * 20 + ["b"] * 12 + ["c"] * 8})
    held, info = heldout_split(manifest.clip_id, manifest)
    assert held == set(manifest.clip_id[20:32]) and info["heldout_speakers"] == ["b"]  # the second largest
    held, info = heldout_split(manifest.clip_id, manifest, heldout_speakers=["c"])
    assert held == set(manifest.clip_id[32:]) and info["train_speakers"] == ["a", "b"]
    with pytest.raises(AlignmentError, match="no aligned clips"):
        heldout_split(manifest.clip_id, manifest, heldout_speakers=["zz"])
    one = manifest.assign(speaker="a")
    held, info = heldout_split(one.clip_id, one)
    again, _ = heldout_split(reversed(one.clip_id.tolist()), None)
    assert info["heldout_by"] == "clip" and held == again and 0 < len(held) < 40


def test_tables_written_before_the_quality_columns_still_read(corpus, planted, tmp_path):
    import lancedb

    uri = str(tmp_path / "old")
    shutil.copytree(planted["uri"], uri)
    old_columns = ["label_reason", "label_lift", "label_p_value", "label_base_rate", "label_n_peaks",
                   "label_heldout_precision", "label_heldout_n"]
    lancedb.connect(uri).open_table("features").drop_columns(old_columns)
    info = FeatureIndex(uri, read_consistency_interval=0).feature("planted", N_DETECTOR)
    assert info["label"] == "n" and info["label_lift"] is None and not info["label_validated"]
    clips = {c: a for c, a in list(planted["acts"].items())}
    build_feature_set(iter(clips.items()), set_id="again", model="tiny.en", hook=HOOK, kind="neuron",
                      manifest_df=corpus["manifest"], alignments_df=corpus["alignments"], index_uri=uri, top_k=TOP_K)
    assert FeatureIndex(uri, read_consistency_interval=0).feature("again", N_DETECTOR)["label_lift"] >= MIN_LIFT


def test_upload_page_leaves_artefacts_out_of_the_bars_and_names_them():
    from dash_app.pages.upload import split_artefacts

    ranked = [{"index": 96, "value": 9.0, "artefact": True, "label": "clip onset"},
              {"index": 3, "value": 5.0, "artefact": False}, {"index": 7, "value": 4.0, "artefact": False},
              {"index": 8, "value": 3.0, "artefact": True, "label": "clip end"}]
    shown, left_out = split_artefacts(ranked, 2)
    assert [f["index"] for f in shown] == [3, 7] and [f["index"] for f in left_out] == [96]


# ---------------------------------------------------------------- real tiny.en neurons


@pytest.fixture(scope="module")
def neurons(corpus, tiny_en, tmp_path_factory):
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    capture = EncoderCapture(tiny_en, [HOOK])
    acts, audio = {}, {}
    for row in corpus["manifest"].itertuples():
        audio[row.clip_id] = load_audio(corpus["root"] / row.path)
        # Trimmed mels keep the fixture fast; the label code only sees arrays.
        out = capture.capture(log_mel(audio[row.clip_id], tiny_en.dims.n_mels, pad=False))[HOOK][0]
        acts[row.clip_id] = out[: n_real_frames(len(audio[row.clip_id]))].float().numpy()
    uri = str(tmp_path_factory.mktemp("neuron-labels"))
    summary = build_feature_set(iter(acts.items()), set_id="mlp2", model="tiny.en", hook=HOOK, kind="neuron",
                                manifest_df=corpus["manifest"], alignments_df=corpus["alignments"], index_uri=uri,
                                top_k=TOP_K, data_root=corpus["root"])
    return {"acts": acts, "audio": audio, "uri": uri, "ix": FeatureIndex(uri, read_consistency_interval=0),
            "summary": summary["label_summary"]}


def test_the_validated_share_is_reported_beside_its_shuffled_label_chance_level(neurons):
    """Every set's label summary carries the chance level of its validated share: the same held-out peaks with the
    labels permuted across features. Real tiny.en neurons validate far above it; the CLI prints both."""
    summary = neurons["summary"]
    share, chance = summary["share_validated"], summary["share_validated_chance"]
    assert 0 <= chance < share and summary["share_validated_chance_sd"] >= 0
    assert summary["validated_over_chance"] == pytest.approx(share / chance) and share / chance >= 3


def test_no_neuron_peaking_at_the_clip_onset_is_presented_as_a_phone_detector(corpus, neurons, tmp_path, capsys):
    from freud_pipeline.audio.decode import write_wav
    from freud_pipeline.cli import main

    ix, acts = neurons["ix"], neurons["acts"]
    train = corpus["manifest"][corpus["manifest"].speaker == "allison"].clip_id.tolist()
    onset_neurons = []
    for f in range(acts[train[0]].shape[1]):  # brute force: where do its strongest training clips peak?
        frames = _peak_frames(acts, train, f)
        if frames and np.mean([t < ONSET_FRAMES for t in frames.values()]) >= 0.5:
            onset_neurons.append(f)
    assert onset_neurons, "tiny.en block-2 MLP has clip-onset neurons on these clips"
    for f in onset_neurons:
        info = ix.feature("mlp2", f)
        assert info["label_kind"] not in ("phone", "class"), (f, info["label"], info["label_reason"])
    assert any(ix.feature("mlp2", f)["label"] == "clip onset" for f in onset_neurons)

    clip = "asterisk-agent-loginok" if "asterisk-agent-loginok" in neurons["audio"] else train[0]
    everything = ix.clip_features(neurons["audio"][clip], "mlp2", n=40)
    assert all(r["artefact"] == (ix.feature("mlp2", r["index"])["label_kind"] == "artefact") for r in everything)
    assert {"label_kind", "label_lift", "label_p_value", "label_heldout_precision",
            "label_validated"} <= set(everything[0])
    described = ix.clip_features(neurons["audio"][clip], "mlp2", n=10, include_artefacts=False)
    assert len(described) == 10 and not any(r["artefact"] for r in described)
    assert [r["index"] for r in described] == [r["index"] for r in everything if not r["artefact"]][:10]

    wav = write_wav(tmp_path / "clip.wav", neurons["audio"][clip])
    for extra, artefacts_allowed in (([], False), (["--artefacts"], True)):
        code = main(["top-features", str(wav), "--set", "mlp2", "--n", "40", "--index-uri", neurons["uri"], "--json",
                     *extra])
        rows = json.loads(capsys.readouterr().out)
        assert code == 0 and len(rows) == 40 and all("label_heldout_precision" in r for r in rows)
        assert any(r["artefact"] for r in rows) == (artefacts_allowed and any(r["artefact"] for r in everything))
    code = main(["feature", "--set", "mlp2", "--index", str(onset_neurons[0]), "--index-uri", neurons["uri"]])
    out = capsys.readouterr().out
    assert code == 0 and "artefact" in out and "held-out precision" in out


def test_feature_card_shows_lift_significance_and_heldout_precision(neurons, planted):
    from dash_app.components import feature_card

    def text(element) -> str:
        if isinstance(element, dict):
            return text(element.get("props", {}).get("children"))
        if isinstance(element, (list, tuple)):
            return "".join(text(e) for e in element)
        return "" if element is None else str(element)

    ix = planted["ix"]
    card = text(feature_card(ix.feature("planted", N_DETECTOR), set_id="planted", index=1, set_label="x", similar=[]))
    assert "lift" in card and "p " in card and "held-out precision 1.00" in card and "evidence" in card
    card = text(feature_card(ix.feature("planted", RANDOM), set_id="planted", index=2, set_label="x", similar=[]))
    assert "label: unlabelled" in card and "no phone or class clearly above chance" in card
    card = text(feature_card(ix.feature("planted", ONSET), set_id="planted", index=0, set_label="x", similar=[]))
    assert "artefact clip onset" in card
    assert VALIDATED_PRECISION == 0.5
