"""Feature mining, labels, the LanceDB index and its query API, on real tiny.en MLP neurons.

Clips: recorded Asterisk prompts, and Festival sentences whose phone end times come from the synthesiser
itself (exact alignments). Activations are computed on trimmed (unpadded) mels to keep the test fast; the
feature code only sees arrays, so that does not change what is checked.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freud_pipeline.errors import FeatureIndexError, FeatureSetError
from freud_pipeline.features import FeatureIndex, UnknownClipError
from freud_pipeline.features.build import build_feature_set
from freud_pipeline.features.labels import interval_frames
from freud_pipeline.features.mining import encoded_clips, mine_features

HOOK = "encoder.blocks.2.mlp.1"
ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
PROMPTS = ["activated", "agent-loginok", "all-circuits-busy-now", "auth-thankyou", "call-forwarding",
           "call-waiting", "cancelled", "check-number-dial-again", "conf-getpin", "conf-invalid",
           "conf-locked", "conf-muted"]
SENTENCES = [
    "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.",
    "Please check the number and dial again.",
    "My mother made much more money in March.",
    "Zebras zigzag past the busy zoo.",
    "Fresh fish is served every Friday.",
    "Tiny kittens sit in the attic.",
    "Good morning, how are you today?",
]
TOP_K = 8


def _pcm16k(args: list[str]) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", *args, "-ar", "16000", "-ac", "1", "-f", "f32le", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype=np.float32).copy()


def _festival(out: Path) -> tuple[list[tuple[str, np.ndarray, str]], pd.DataFrame]:
    script = ["(voice_cmu_us_slt_arctic_hts)"]
    for i, text in enumerate(SENTENCES):
        stem = out / f"s{i}"
        script += [f'(set! utt (Utterance Text "{text}"))', "(utt.synth utt)",
                   f'(utt.save.wave utt "{stem}.wav" \'riff)', f'(utt.save.segs utt "{stem}.segs")',
                   f'(utt.save.words utt "{stem}.words")']
    (out / "make.scm").write_text("\n".join(script) + "\n")
    subprocess.run(["festival", "-b", str(out / "make.scm")], check=True, capture_output=True)
    clips, rows = [], []
    for i, text in enumerate(SENTENCES):
        clip_id = f"festival/{i}"  # held out by sha1(clip id): 3 of these 8
        segs = _xlabel(out / f"s{i}.segs")
        start = 0.0
        for end, label in segs:
            rows.append((clip_id, "phone", label, start, end))
            start = end
        previous = 0.0
        for end, word in _xlabel(out / f"s{i}.words"):
            # A word starts where its first non-pause segment starts.
            inside = [(s, e, l) for (s, (e, l)) in zip([0.0] + [e for e, _ in segs], segs) if previous < e <= end]
            rows.append((clip_id, "word", word.lower(), next((s for s, _, l in inside if l != "pau"), previous), end))
            previous = end
        clips.append((clip_id, _pcm16k(["-i", str(out / f"s{i}.wav")]), text))
    return clips, pd.DataFrame(rows, columns=["clip_id", "tier", "label", "start_s", "end_s"])


def _xlabel(path: Path) -> list[tuple[float, str]]:
    lines = path.read_text().split("#", 1)[1].strip().splitlines()
    return [(float(parts[0]), parts[2]) for parts in (line.split() for line in lines) if len(parts) >= 3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_en):
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    out = tmp_path_factory.mktemp("festival")
    festival, alignments = _festival(out)
    clips = [(f"asterisk/{name}", _pcm16k(["-f", "g722", "-i", str(ASTERISK / f"{name}.g722")]),
              name.replace("-", " ")) for name in PROMPTS] + festival
    capture = EncoderCapture(tiny_en, [HOOK])
    acts = {}
    for clip_id, audio, _ in clips:
        out_acts = capture.capture(log_mel(audio, tiny_en.dims.n_mels, pad=False))[HOOK][0]
        acts[clip_id] = out_acts[: n_real_frames(len(audio))].float().numpy()
    manifest = pd.DataFrame({
        "clip_id": [c for c, _, _ in clips], "path": [f"clips/{c}.wav" for c, _, _ in clips],
        "duration_s": [len(a) / 16000 for _, a, _ in clips], "sample_rate": 16000,
        "transcript": [t for _, _, t in clips], "speaker": "x",
        "source": [c.split("/")[0] for c, _, _ in clips], "split": "test"})
    return {"audio": {c: a for c, a, _ in clips}, "acts": acts, "manifest": manifest, "alignments": alignments}


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("lancedb"))
    acts = corpus["acts"]
    build_feature_set(iter(acts.items()), set_id="tiny.en/mlp2", model="tiny.en", hook=HOOK, kind="neuron",
                      manifest_df=corpus["manifest"], alignments_df=corpus["alignments"], index_uri=uri, top_k=TOP_K)
    festival = {c: a for c, a in acts.items() if c.startswith("festival/")}
    summary = build_feature_set(iter(festival.items()), set_id="tiny.en/mlp2/festival", model="tiny.en", hook=HOOK,
                                kind="neuron", manifest_df=corpus["manifest"], alignments_df=corpus["alignments"],
                                index_uri=uri, top_k=TOP_K)
    return {"uri": uri, "index": FeatureIndex(uri, read_consistency_interval=0), "festival_summary": summary}


def _brute(acts: dict[str, np.ndarray], feature: int):
    ids = list(acts)
    peaks = np.array([acts[c][:, feature].max() for c in ids])
    troughs = np.array([acts[c][:, feature].min() for c in ids])
    return ids, peaks, troughs


def _probe_features(acts) -> list[int]:
    stacked = np.stack([a.max(axis=0) for a in acts.values()])
    return [int(stacked.max(axis=0).argmax()), int(stacked.min(axis=0).argmin()), 7, 500, 1535]


def test_top_and_bottom_examples_match_brute_force(corpus, index):
    acts, ix = corpus["acts"], index["index"]
    for f in _probe_features(acts):
        ids, peaks, troughs = _brute(acts, f)
        top = ix.top_examples("tiny.en/mlp2", f, n=TOP_K)
        expected = np.argsort(-peaks, kind="stable")[:TOP_K]
        assert [e["clip_id"] for e in top] == [ids[i] for i in expected]
        assert np.allclose([e["value"] for e in top], peaks[expected])
        for e in top[:3]:
            trace = acts[e["clip_id"]][:, f]
            assert len(e["trace"]) == len(trace) and e["trace_offset_frame"] == 0  # whole clip
            assert np.allclose(e["trace"], trace.astype(np.float16), atol=1e-3)
            assert trace[e["peak_frame"]] == trace.max()
            assert e["peak_time_s"] == pytest.approx((e["peak_frame"] + 0.5) * 0.02)
            assert e["transcript"] == corpus["manifest"].set_index("clip_id").loc[e["clip_id"], "transcript"]

        bottom = ix.top_examples("tiny.en/mlp2", f, n=TOP_K, negative=True)
        negative = [i for i in np.argsort(troughs, kind="stable") if troughs[i] < 0][:TOP_K]
        assert [e["clip_id"] for e in bottom] == [ids[i] for i in negative]
        assert all(e["value"] < 0 and e["sign"] == "-" for e in bottom)

        extreme = np.where(peaks >= -troughs, peaks, troughs)
        absolute = ix.top_examples("tiny.en/mlp2", f, n=TOP_K, absolute=True)
        order = np.argsort(-np.abs(extreme), kind="stable")[:TOP_K]
        assert [e["clip_id"] for e in absolute] == [ids[i] for i in order]
        assert np.allclose([e["value"] for e in absolute], extreme[order])


def test_min_max_filters_act_on_each_clips_peak(corpus, index):
    acts, ix = corpus["acts"], index["index"]
    f = _probe_features(acts)[0]
    ids, peaks, _ = _brute(acts, f)
    ranked = np.sort(peaks)[::-1]
    hi, lo = float(ranked[2]), float(ranked[6])
    got = ix.top_examples("tiny.en/mlp2", f, n=10, min_value=lo, max_value=hi)
    want = [ids[i] for i in np.argsort(-peaks, kind="stable") if lo <= peaks[i] <= hi]
    assert [e["clip_id"] for e in got] == want and len(want) == 5
    assert ix.top_examples("tiny.en/mlp2", f, n=3, min_value=float(ranked[0]) + 1) == []
    # The original's recipe for strongly negative clips: max value 0 plus absolute value.
    negative = ix.top_examples("tiny.en/mlp2", f, n=20, absolute=True, max_value=0.0)
    values = [e["value"] for e in negative]
    assert values and max(values) <= 0 and values == sorted(values)  # most negative first


def test_feature_statistics_and_histogram(corpus, index):
    acts, ix = corpus["acts"], index["index"]
    frames = np.concatenate(list(acts.values()))
    for f in _probe_features(acts)[:3]:
        info = ix.feature("tiny.en/mlp2", f)
        column = frames[:, f]
        assert info["index"] == f and info["density"] == pytest.approx((column > 0).mean(), abs=1e-6)
        stats = info["stats"]
        assert stats["mean"] == pytest.approx(column.mean(), rel=1e-4, abs=1e-6)
        assert (stats["max"], stats["min"]) == pytest.approx((column.max(), column.min()))
        # Quantiles come from <= 64 sampled frames per clip on 8-per-octave bins. Compared by rank: tails of
        # sparse neurons have gaps where a small rank error is a large value error.
        for level, value in stats["quantiles"].items():
            assert (column < value).mean() - 0.05 <= float(level) <= (column <= value).mean() + 0.05
        hist = ix.feature_histogram("tiny.en/mlp2", f)
        _, peaks, _ = _brute(acts, f)
        assert sum(hist["counts"]) == len(acts)
        edges = np.asarray(hist["bin_edges"])
        assert np.allclose(np.diff(edges), edges[1] - edges[0])  # linear bins
        assert edges[0] <= peaks.min() and peaks.max() < edges[-1]
        assert np.histogram(peaks, bins=edges)[0].tolist() == hist["counts"]


def test_sets_and_errors(index):
    ix = index["index"]
    assert {s["set_id"] for s in ix.sets()} == {"tiny.en/mlp2", "tiny.en/mlp2/festival"}
    row = next(s for s in ix.sets() if s["set_id"] == "tiny.en/mlp2")
    assert (row["model"], row["hook"], row["kind"], row["n_features"]) == ("tiny.en", HOOK, "neuron", 1536)
    with pytest.raises(FeatureSetError, match="known sets: tiny.en/mlp2, tiny.en/mlp2/festival"):
        ix.top_examples("nope", 0)
    for bad in (-1, 1536):
        with pytest.raises(FeatureIndexError, match=r"valid indices are 0\.\.1535"):
            ix.feature("tiny.en/mlp2", bad)
    with pytest.raises(FeatureIndexError):
        ix.similar_features("tiny.en/mlp2", 99999)
    with pytest.raises(UnknownClipError, match="unknown clip"):
        ix.clip("missing/clip")


def test_frame_length_matches_whisper(tiny_en):
    """The one time grid (freud_pipeline.frames) is Whisper's: one encoder position per two log-mel hops."""
    from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE

    from freud_pipeline import frames

    assert (frames.SAMPLE_RATE, frames.HOP_LENGTH) == (SAMPLE_RATE, HOP_LENGTH)
    assert frames.MEL_FRAME_SECONDS == HOP_LENGTH / SAMPLE_RATE
    assert N_FRAMES // tiny_en.dims.n_audio_ctx * HOP_LENGTH == frames.SAMPLES_PER_FRAME
    assert frames.FRAME_SECONDS == frames.SAMPLES_PER_FRAME / SAMPLE_RATE


def _peaks_on(acts: dict, clip_ids, feature: int, phones_of: pd.DataFrame, members: set[str]) -> list[bool]:
    """For the TOP_K clips of `clip_ids` where `feature` peaks highest (above 0): is the peak frame's centre inside
    an interval of one of `members`?"""
    peaks = {c: acts[c][:, feature].max() for c in clip_ids if acts[c][:, feature].max() > 0}
    on = []
    for c in sorted(peaks, key=lambda c: -peaks[c])[:TOP_K]:
        t = (int(acts[c][:, feature].argmax()) + 0.5) * 0.02
        rows = phones_of[(phones_of["clip_id"] == c) & (phones_of["start_s"] <= t) & (phones_of["end_s"] > t)]
        on.append(bool(len(rows)) and rows["label"].iloc[0] in members)
    return on


def test_labels_on_festival_speech_match_the_phone_under_the_peaks(corpus, index):
    """Labels are learned on half the clips (one voice here: halves by clip) and checked on the other half."""
    from freud_pipeline.audio.phones import PHONE_CLASSES
    from freud_pipeline.features.labels import heldout_split

    ix, alignments, acts = index["index"], corpus["alignments"], corpus["acts"]
    summary = index["festival_summary"]["label_summary"]
    heldout, _ = heldout_split(alignments["clip_id"])
    train = sorted(set(alignments["clip_id"]) - heldout)
    assert summary["n_aligned_clips"] == len(SENTENCES) and summary["heldout_by"] == "clip"
    assert summary["n_train_clips"] == len(train) == len(SENTENCES) - len(heldout) and 0 < summary["n_labelled"] < 1536
    phones = alignments[alignments["tier"] == "phone"]
    labelled = [ix.feature("tiny.en/mlp2/festival", f) for f in range(1536)]
    labelled = [f for f in labelled if f["label_kind"] in ("phone", "class")]
    assert len(labelled) == summary["n_labelled"]
    for info in labelled[:5]:
        f, label = info["index"], info["label"]
        members = PHONE_CLASSES[label] if info["label_kind"] == "class" else {label}
        on = _peaks_on(acts, train, f, phones, members)
        assert info["label_n_peaks"] == len(on) and info["label_precision"] == pytest.approx(np.mean(on))
        held = _peaks_on(acts, sorted(heldout), f, phones, members)
        assert info["label_heldout_n"] == len(held)
        assert info["label_heldout_precision"] == pytest.approx(np.mean(held) if held else np.nan, nan_ok=True)
        # Recall, brute force over every training occurrence (fewer than the reservoir holds here).
        peaks = sorted((acts[c][:, f].max() for c in train if acts[c][:, f].max() > 0), reverse=True)[:TOP_K]
        threshold = 0.5 * np.median(peaks)
        fired = []
        for occ in phones[phones["label"].isin(members) & phones["clip_id"].isin(train)].itertuples():
            a, b = interval_frames(occ.start_s, occ.end_s)
            trace = acts[occ.clip_id][:, f]
            a = min(a, len(trace) - 1)
            fired.append(trace[a:max(b, a + 1)].max() > threshold)
        assert info["label_recall"] == pytest.approx(np.mean(fired), abs=1e-6)
        assert info["label_f1"] == pytest.approx(2 * info["label_precision"] * info["label_recall"]
                                                 / (info["label_precision"] + info["label_recall"]))
        assert info["label_p_value"] < 0.01 and info["label_lift"] >= 2
        assert f in [r["index"] for r in ix.features_by_label("tiny.en/mlp2/festival", label, limit=2000)]


def test_labels_find_a_planted_phone_detector(tmp_path):
    """Feature 0 fires exactly on 's' frames, feature 1 never fires: label s, P = R = 1; no label. The word "sis"
    spans most of every clip, so the peaks landing in it are no evidence: no word label."""
    rng = np.random.default_rng(0)
    rows, clips = [], []
    for c in range(12):
        acts = rng.uniform(-0.2, 0.05, (100, 3)).astype(np.float32)
        acts[:, 1] = -0.1
        shift = 0.04 * c  # the s moves from clip to clip (a feature peaking at one frame would be an artefact)
        for k, (start, end) in enumerate([(0.2 + shift, 0.3 + shift), (0.9, 1.04), (1.5, 1.6)]):
            label = "s" if k != 1 else "m"
            rows.append((f"c{c}", "phone", label, start, end))
            a, b = interval_frames(start, end)
            if label == "s":
                acts[a:b, 0] = 1.0 + 0.1 * c
        rows.append((f"c{c}", "word", "sis", 0.2 + shift, 1.6))
        clips.append((f"c{c}", acts))
    alignments = pd.DataFrame(rows, columns=["clip_id", "tier", "label", "start_s", "end_s"])
    build_feature_set(clips, set_id="planted", model="tiny.en", hook=HOOK, kind="neuron", manifest_df=None,
                      alignments_df=alignments, index_uri=str(tmp_path), top_k=4)
    ix = FeatureIndex(str(tmp_path), read_consistency_interval=0)
    detector = ix.feature("planted", 0)
    assert (detector["label"], detector["label_kind"], detector["word_label"]) == ("s", "phone", None)
    assert detector["label_precision"] == detector["label_recall"] == detector["label_f1"] == 1.0
    assert detector["label_heldout_precision"] == 1.0 and detector["label_validated"]
    assert ix.feature("planted", 1)["label"] is None
    assert ix.features_by_label("planted", "S")[0]["index"] == 0  # best F1 first
    summary = ix.sets()[0]["label_summary"]
    assert summary["phones_covered"] == ["s"] and summary["n_f1_at_least_0_5"] >= 1


def test_similar_features_neuron_signature_and_sae_decoder(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 120, 16)).astype(np.float32)
    base[:, :, 1] = 2 * base[:, :, 0] + 0.05 * rng.standard_normal((40, 120))  # feature 1 ~ feature 0
    clips = [(f"c{i}", base[i]) for i in range(40)]
    build_feature_set(clips, set_id="neurons", model="tiny.en", hook=HOOK, kind="neuron", manifest_df=None,
                      index_uri=str(tmp_path), top_k=4)
    ix = FeatureIndex(str(tmp_path), read_consistency_interval=0)
    similar = ix.similar_features("neurons", 0, n=5)
    assert similar[0]["index"] == 1 and similar[0]["similarity"] > 0.9 and similar[0]["method"] == "signature"
    assert len(similar) == 5 and 0 not in [s["index"] for s in similar]
    assert [s["similarity"] for s in similar] == sorted((s["similarity"] for s in similar), reverse=True)

    # SAE set: latents from a ReLU encoder (the caller's callable), similarity from decoder directions.
    encoder = rng.standard_normal((16, 32)).astype(np.float32)
    decoder = rng.standard_normal((32, 16)).astype(np.float32)
    decoder[5] = decoder[4] * 3 + 0.01
    latents = encoded_clips(clips, lambda x: np.maximum(x @ encoder, 0))
    build_feature_set(latents, set_id="sae", model="tiny.en", hook=HOOK, kind="sae", manifest_df=None,
                      index_uri=str(tmp_path), decoder=decoder, top_k=4, sae_checkpoint="unused")
    assert ix.similar_features("sae", 4, n=3)[0]["index"] == 5
    assert ix.top_examples("sae", 4, negative=True) == []  # no bottom lists for SAE latents
    assert ix.sets()[-1]["vector_kind"] == "decoder"


def test_decoder_directions_of_any_sae():
    import torch

    from freud_pipeline.features.build import decoder_directions

    class LinearSAE(torch.nn.Module):
        n_latents = 10

        def __init__(self):
            super().__init__()
            self.dec = torch.nn.Linear(10, 4)

        def decode(self, latents):
            return self.dec(latents)

    sae = LinearSAE()
    assert np.allclose(decoder_directions(sae, batch=3), sae.dec.weight.detach().numpy().T, atol=1e-6)


def test_search_clips_and_clip(index, session_data_dir):
    ix = index["index"]
    hits = ix.search_clips("shell")  # stemmed full-text match of "shells"
    assert hits and hits[0]["clip_id"] == "festival/0"
    assert {"festival/2", "asterisk/check-number-dial-again"} <= {h["clip_id"] for h in ix.search_clips("number")}
    assert "asterisk/conf-getpin" in {h["clip_id"] for h in ix.search_clips("getp")}  # substring fallback
    clip = ix.clip("festival/3")
    assert clip["transcript"] == SENTENCES[3] and clip["audio_path"] == str(session_data_dir / "clips/festival/3.wav")


def test_clip_features_runs_whisper_like_the_pipeline(corpus, index, tiny_en):
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    audio = corpus["audio"]["asterisk/check-number-dial-again"]
    got = index["index"].clip_features(audio, "tiny.en/mlp2", n=5)
    padded = EncoderCapture(tiny_en, [HOOK]).capture(log_mel(audio))[HOOK][0, : n_real_frames(len(audio))].numpy()
    peaks = padded.max(axis=0)
    assert [g["index"] for g in got] == np.argsort(-peaks, kind="stable")[:5].tolist()
    assert np.allclose([g["value"] for g in got], np.sort(peaks)[::-1][:5], atol=1e-4)
    assert len(got[0]["trace"]) == n_real_frames(len(audio)) and "label" in got[0]


def test_clip_features_encodes_with_the_sets_sae(corpus, index, monkeypatch, tmp_path):
    import torch

    from freud_pipeline.features import query

    class TinySAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.eye(1536)[:, :64])

        def encode(self, x):
            return torch.relu(x @ self.weight)

    monkeypatch.setattr(query, "_sae", lambda checkpoint, sha256, device: TinySAE())
    latents = encoded_clips(corpus["acts"].items(), lambda x: np.maximum(x[:, :64], 0))
    build_feature_set(latents, set_id="sae64", model="tiny.en", hook=HOOK, kind="sae", manifest_df=None,
                      index_uri=str(tmp_path), sae_checkpoint=str(tmp_path / "ckpt"), top_k=4)
    got = FeatureIndex(str(tmp_path)).clip_features(corpus["audio"]["festival/0"], "sae64", n=3)
    assert len(got) == 3 and all(0 <= g["index"] < 64 and g["value"] >= 0 for g in got)


def test_long_clips_keep_a_window_around_the_peak_and_wide_sets_stream():
    rng = np.random.default_rng(2)
    long = rng.uniform(0, 1, (3200, 3)).astype(np.float32)
    long[2900, 0] = 5.0
    result = mine_features([("long", long), ("short", long[:100])], top_k=2, trace_radius=750)
    rows = result.top.rows(0, 1)
    assert rows["trace_len"][0, 0] == 1500 and rows["peak_frame"][0, 0] == 2900
    offset = rows["trace_offset"][0, 0]
    assert offset == 3200 - 1500  # centred window, clamped to the clip's end
    assert np.allclose(rows["traces"][0, 0], long[offset:offset + 1500, 0].astype(np.float16))
    # 24,576 features: vectorised per clip, bounded state.
    started = time.monotonic()
    wide = ((f"w{i}", np.maximum(rng.standard_normal((50, 24576), dtype=np.float32) - 1.5, 0)) for i in range(10))
    result = mine_features(wide, top_k=4, bottom_k=0)
    assert result.n_features == 24576 and result.top.count.min() == 4
    assert time.monotonic() - started < 30


def test_torch_reductions_match_numpy():
    """The torch branch (used for accelerator tensors, e.g. SAE latents on a GPU) agrees with numpy's."""
    import torch

    from freud_pipeline.features.mining import _gather_traces, _summarise

    acts = np.random.default_rng(3).standard_normal((300, 40)).astype(np.float32)
    sample = np.array([0, 5, 299])
    a, b = _summarise(acts, 0.1, sample), _summarise(torch.from_numpy(acts), 0.1, sample)
    for name in ("peak", "peak_frame", "trough", "trough_frame", "n_fire", "sampled"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.allclose(a.total, b.total, atol=1e-3)
    features, offsets = np.array([3, 7, 39]), np.array([0, 100, 200])
    for length in (300, 100):
        assert np.array_equal(_gather_traces(acts, features, offsets, length),
                              _gather_traces(torch.from_numpy(acts), features, offsets, length))


def test_reader_keeps_answering_during_a_rebuild(corpus, tmp_path):
    acts = {c: a for c, a in list(corpus["acts"].items())[:6]}
    uri = str(tmp_path)

    def build(scale):
        build_feature_set(((c, a * scale) for c, a in acts.items()), set_id="live", model="tiny.en", hook=HOOK,
                          kind="neuron", manifest_df=corpus["manifest"], index_uri=uri, top_k=4)

    build(1.0)
    f = int(np.stack([a.max(axis=0) for a in acts.values()]).max(axis=0).argmax())
    best = max(a[:, f].max() for a in acts.values())
    allowed = {round(float(best * s), 3) for s in (1.0, 2.0, 3.0)}
    ix = FeatureIndex(uri, read_consistency_interval=0)
    seen, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                examples = ix.top_examples("live", f, n=4)
                value = round(examples[0]["value"], 3)
                assert value in allowed and len(examples) == 4, value
                assert ix.feature("live", f)["stats"]["max"] is not None
                seen.add(value)
            except Exception as exc:  # noqa: BLE001 - any failure during the rebuild is the bug
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        build(2.0)
        build(3.0)
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    assert round(float(best * 3), 3) in seen and len(seen) >= 2


def test_query_latency_warm(index, capsys):
    ix = index["index"]
    features = list(range(0, 1536, 37))
    timings = {}
    for name, call in {
        "top_examples": lambda f: ix.top_examples("tiny.en/mlp2", f, n=TOP_K),
        "feature": lambda f: ix.feature("tiny.en/mlp2", f),
        "similar_features": lambda f: ix.similar_features("tiny.en/mlp2", f, n=10),
        "feature_histogram": lambda f: ix.feature_histogram("tiny.en/mlp2", f),
    }.items():
        call(0)
        samples = []
        for f in features:
            started = time.perf_counter()
            call(f)
            samples.append((time.perf_counter() - started) * 1000)
        timings[name] = (np.percentile(samples, 50), np.percentile(samples, 95))
    with capsys.disabled():
        print("\nwarm latency ms (p50, p95):", {k: (round(a, 1), round(b, 1)) for k, (a, b) in timings.items()})
    assert all(p95 < 500 for _, p95 in timings.values())  # generous: shared 2-core CI machines
