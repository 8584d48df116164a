"""`freud top-features | top-examples | feature | sets` against a small real index.

The index holds real tiny.en `encoder.blocks.2.mlp.1` activations of recorded Asterisk prompts (decoded from
G.722 with ffmpeg), mined and published by `build_feature_set` into a temporary LanceDB, as in
tests/test_features.py. Each command's JSON must parse strictly (no NaN) and equal FeatureIndex's answer.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import asterisk_audio
from freud_pipeline.cli import main
from freud_pipeline.cli.features import jsonable
from freud_pipeline.features import FeatureIndex
from freud_pipeline.features.build import build_feature_set
from freud_pipeline.features.store import LABEL_QUALITY

HOOK = "encoder.blocks.2.mlp.1"
SET = "tiny.en/mlp2"
PROMPTS = ["activated", "agent-loginok", "auth-thankyou", "call-forwarding", "cancelled", "conf-getpin",
           "conf-locked", "vm-goodbye"]
TOP_K = 6


def _strict_json(text: str):
    def reject(constant):
        raise AssertionError(f"invalid JSON constant {constant!r} in the output")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_en):
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    capture = EncoderCapture(tiny_en, [HOOK])
    acts, audio = {}, {}
    for name in PROMPTS:
        clip_id = f"asterisk/{name}"
        audio[clip_id] = asterisk_audio(name)
        # Trimmed mels keep the fixture fast; the feature code only sees arrays.
        out = capture.capture(log_mel(audio[clip_id], tiny_en.dims.n_mels, pad=False))[HOOK][0]
        acts[clip_id] = out[: n_real_frames(len(audio[clip_id]))].float().numpy()
    manifest = pd.DataFrame({
        "clip_id": list(acts), "path": [f"clips/{c}.wav" for c in acts],
        "duration_s": [len(audio[c]) / 16000 for c in acts], "sample_rate": 16000,
        "transcript": [c.split("/")[1].replace("-", " ") for c in acts], "speaker": "allison",
        "source": "asterisk", "split": "test"})
    uri = str(tmp_path_factory.mktemp("cli-lancedb"))
    build_feature_set(iter(acts.items()), set_id=SET, model="tiny.en", hook=HOOK, kind="neuron",
                      manifest_df=manifest, index_uri=uri, top_k=TOP_K)
    stacked = np.stack([a.max(axis=0) for a in acts.values()])
    strongest = int(stacked.max(axis=0).argmax())
    return {"uri": uri, "ix": FeatureIndex(uri, read_consistency_interval=0), "acts": acts, "strongest": strongest}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sets_json_matches_the_index(index, capsys):
    code, out, _ = _run(capsys, "sets", "--index-uri", index["uri"], "--json")
    assert code == 0
    got = _strict_json(out)
    assert got == jsonable(index["ix"].sets())
    assert [(s["set_id"], s["hook"], s["kind"], s["n_features"]) for s in got] == [(SET, HOOK, "neuron", 1536)]
    assert isinstance(got[0]["created_at"], str)

    code, out, _ = _run(capsys, "sets", "--index-uri", index["uri"])
    assert code == 0 and SET in out and "1536" in out and "set_id" in out.splitlines()[0]


def test_top_examples_json_matches_the_index(index, capsys):
    ix, f = index["ix"], index["strongest"]
    for feature in (f, 7, 1535):
        code, out, _ = _run(capsys, "top-examples", "--set", SET, "--index", str(feature), "--n", "4",
                            "--index-uri", index["uri"], "--json")
        assert code == 0
        got = _strict_json(out)
        want = ix.top_examples(SET, feature, n=4)
        assert len(got) == 4 and all("trace" not in row for row in got)  # no traces unless asked for
        assert got == jsonable([{k: v for k, v in row.items() if k != "trace"} for row in want])
        assert [r["clip_id"] for r in got] == [r["clip_id"] for r in want]

    code, out, _ = _run(capsys, "top-examples", "--set", SET, "--index", str(f), "--index-uri", index["uri"],
                        "--json", "--traces")
    got = _strict_json(out)
    want = ix.top_examples(SET, f, n=20)
    assert code == 0 and len(got) == TOP_K == len(want)
    for row, expected in zip(got, want):
        assert np.allclose(row["trace"], expected["trace"])
        assert len(row["trace"]) == len(index["acts"][row["clip_id"]])  # one value per frame of the clip


def test_typical_examples_json_matches_the_index_and_each_value_is_its_clips_peak(index, capsys):
    ix, f = index["ix"], index["strongest"]
    code, out, _ = _run(capsys, "typical-examples", "--set", SET, "--index", str(f), "--index-uri", index["uri"],
                        "--json")
    got = _strict_json(out)
    assert code == 0 and got == jsonable(ix.typical_examples(SET, f)) and got
    for row in got:  # drawn per octave of the clip's peak: the value is that clip's true peak, inside its band
        assert row["value"] == pytest.approx(float(index["acts"][row["clip_id"]][:, f].max()), rel=1e-6)
        assert row["low"] <= row["value"] < row["high"]
    code, out, _ = _run(capsys, "typical-examples", "--set", SET, "--index", str(f), "--per-level", "1",
                        "--index-uri", index["uri"])
    assert code == 0 and "level(s) of its peak" in out and got[0]["clip_id"] in out
    code, _, err = _run(capsys, "typical-examples", "--set", SET, "--index", "1536", "--index-uri", index["uri"])
    assert code == 2 and "out of range" in err


def test_top_examples_filters_pass_through(index, capsys):
    ix, f = index["ix"], index["strongest"]
    values = [e["value"] for e in ix.top_examples(SET, f, n=TOP_K)]
    lo, hi = values[4], values[1]
    code, out, _ = _run(capsys, "top-examples", "--set", SET, "--index", str(f), "--min", repr(lo), "--max",
                        repr(hi), "--index-uri", index["uri"], "--json")
    got = _strict_json(out)
    want = ix.top_examples(SET, f, min_value=lo, max_value=hi)
    assert code == 0 and [r["clip_id"] for r in got] == [r["clip_id"] for r in want] and len(got) == 4

    code, out, _ = _run(capsys, "top-examples", "--set", SET, "--index", str(f), "--absolute", "--max", "0",
                        "--index-uri", index["uri"], "--json")
    got = _strict_json(out)
    want = ix.top_examples(SET, f, absolute=True, max_value=0.0)
    assert code == 0 and [(r["clip_id"], r["value"]) for r in got] == [(r["clip_id"], r["value"]) for r in want]
    assert all(r["value"] <= 0 for r in got)

    code, out, _ = _run(capsys, "top-examples", "--set", SET, "--index", str(f), "--n", "3", "--index-uri",
                        index["uri"])
    lines = out.splitlines()
    assert code == 0 and f"feature {f}: 3 clip(s)" in lines[0] and "clip_id" in lines[1]
    assert lines[3].split()[1] == ix.top_examples(SET, f, n=1)[0]["clip_id"]


def test_feature_json_has_statistics_label_and_scores(index, capsys):
    ix, f = index["ix"], index["strongest"]
    code, out, _ = _run(capsys, "feature", "--set", SET, "--index", str(f), "--index-uri", index["uri"], "--json")
    assert code == 0
    got = _strict_json(out)  # no alignments: label scores are NaN in the index, null here
    assert got == jsonable(ix.feature(SET, f))
    assert got["index"] == f and got["label"] is None and got["label_f1"] is None
    frames = np.concatenate(list(index["acts"].values()))[:, f]
    assert got["stats"]["max"] == pytest.approx(float(frames.max()))
    assert got["density"] == pytest.approx(float((frames > 0).mean()), abs=1e-6)
    assert set(got["stats"]["quantiles"]) == {"0.5", "0.9", "0.99"}

    code, out, _ = _run(capsys, "feature", "--set", SET, "--index", str(f), "--index-uri", index["uri"])
    assert code == 0 and f"feature {f}" in out and "density" in out and "quantiles" in out


def test_default_index_uri_comes_from_settings(index, capsys, monkeypatch):
    monkeypatch.setenv("FREUD_LANCEDB_URI", index["uri"])
    code, out, _ = _run(capsys, "sets", "--json")
    assert code == 0 and [s["set_id"] for s in _strict_json(out)] == [SET]


@pytest.mark.parametrize("argv, message", [
    (["top-examples", "--set", "nope", "--index", "0"], "unknown feature set 'nope'; known sets: tiny.en/mlp2"),
    (["feature", "--set", "nope", "--index", "0"], "unknown feature set 'nope'; known sets: tiny.en/mlp2"),
    (["top-examples", "--set", SET, "--index", "1536"], "feature 1536 is out of range for set 'tiny.en/mlp2': "
                                                       "valid indices are 0..1535"),
    (["feature", "--set", SET, "--index", "-1"], "feature -1 is out of range"),
])
def test_bad_set_or_index_is_a_one_line_error_with_exit_code_2(index, capsys, argv, message):
    for extra in ([], ["--json"]):
        code, out, err = _run(capsys, *argv, "--index-uri", index["uri"], *extra)
        assert code == 2 and out == ""
        assert err.startswith("freud: error: ") and message in err and err.count("\n") == 1


def test_missing_index_or_audio_is_an_error(index, tmp_path, capsys):
    code, _, err = _run(capsys, "sets", "--index-uri", str(tmp_path / "none"))
    assert code == 2 and "no feature index at" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "top-features", str(tmp_path / "missing.wav"), "--set", SET,
                        "--index-uri", index["uri"])
    assert code == 2 and err.startswith("freud: error: ") and err.count("\n") == 1


def test_top_features_of_a_wav_file(index, tmp_path, capsys):
    from freud_pipeline.audio.decode import load_audio, write_wav

    wav = write_wav(tmp_path / "thanks.wav", asterisk_audio("auth-thankyou"))
    code, out, err = _run(capsys, "top-features", str(wav), "--set", SET, "--n", "5", "--index-uri",
                          index["uri"], "--json")
    assert code == 0, err
    got = _strict_json(out)
    want = index["ix"].clip_features(load_audio(wav), SET, n=5, include_artefacts=False)  # the CLI's default
    assert len(got) == 5 and all("trace" not in row for row in got)
    assert [r["index"] for r in got] == [r["index"] for r in want]
    assert np.allclose([r["value"] for r in got], [r["value"] for r in want], rtol=1e-5)
    assert [r["peak_time_s"] for r in got] == [r["peak_time_s"] for r in want]
    assert got == sorted(got, key=lambda r: -r["value"]) and set(got[0]) == {
        "index", "value", "peak_time_s", "label", "artefact", "label_validated", *LABEL_QUALITY}

    code, out, _ = _run(capsys, "top-features", str(wav), "--set", SET, "--n", "2", "--index-uri", index["uri"],
                        "--json", "--traces")
    got = _strict_json(out)
    assert code == 0 and len(got[0]["trace"]) == len(want[0]["trace"])

    code, out, _ = _run(capsys, "top-features", str(wav), "--set", SET, "--n", "3", "--index-uri", index["uri"])
    lines = out.splitlines()
    assert code == 0 and "top 3 features" in lines[0] and lines[3].split()[1] == str(want[0]["index"])

    code, _, err = _run(capsys, "top-features", str(wav), "--set", "nope", "--index-uri", index["uri"])
    assert code == 2 and "unknown feature set 'nope'" in err
