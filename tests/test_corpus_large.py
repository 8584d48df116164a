"""The large corpus on real data: every English Festival voice with exact timings, a split that holds out whole
voices, the other-language Asterisk prompts as real unaligned clips, thousands of public-domain sentences, and
the Dagster assets that combine them."""

from __future__ import annotations

import re
import shutil
import wave
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from freud_pipeline.audio.datasets import load_alignments, load_manifest
from freud_pipeline.audio.datasets.asterisk_languages import LANGUAGES, build_asterisk_languages
from freud_pipeline.audio.datasets.festival_voices import (
    VOICES,
    TimingError,
    available_voices,
    build_festival_voices,
    check_timings,
    read_segments,
    voice_split,
)
from freud_pipeline.audio.datasets.texts import TEXT_SOURCES, clean_sentence, load_corpus_sentences
from freud_pipeline.audio.decode import SAMPLE_RATE
from tests.conftest import require_extra

SAMPLE = 1.0 / SAMPLE_RATE


def _texts_installed() -> bool:
    return all(Path(f"/usr/share/dictd/{name}.dict.dz").exists() for name in TEXT_SOURCES)


def _languages_installed() -> bool:
    return all(Path("/usr/share/asterisk/sounds", folder).is_dir() for folder, _ in LANGUAGES.values())


def _need_voices() -> None:
    require_extra(shutil.which("festival") is not None and set(available_voices()) == set(VOICES)
                  and _texts_installed(), "Festival with festvox-us-slt-hts, festvox-kallpc16k, festvox-kdlpc16k "
                  "and dict-devil, dict-jargon")


@pytest.fixture(scope="module")
def voices_build(tmp_path_factory):
    _need_voices()
    root = tmp_path_factory.mktemp("large")
    # Short clips (>= 12 words) keep the test quick; the large configuration reads >= 45 words per clip.
    build = build_festival_voices(root / "datasets" / "festival_voices", clips_per_voice=2, clip_words=12,
                                  holdout_voices=("ked",), data_root=root)
    return root, build


def _samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels()) == (SAMPLE_RATE, 1)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def test_every_voice_yields_exact_timings(voices_build):
    root, build = voices_build
    manifest, alignments = load_manifest(build.manifest_path), load_alignments(build.alignments_path)
    assert set(manifest["speaker"]) == set(VOICES) and len(manifest) == 2 * len(VOICES)
    for clip in manifest.itertuples():
        audio = _samples(root / clip.path)
        assert clip.duration_s == pytest.approx(len(audio) / SAMPLE_RATE, abs=SAMPLE)
        # Festival's own segments, pauses included, tile the whole clip: the last ends at the last sample.
        segments = read_segments((root / clip.path).with_suffix(".lab"))
        ends = np.array([end for _, _, end in segments])
        assert np.all(np.diff(ends) > 0), clip.clip_id
        assert abs(ends[-1] - len(audio) / SAMPLE_RATE) <= SAMPLE, clip.clip_id
        # ... and they sit on the audio: pauses are near-silent, phones are not.
        def rms(start, end):
            part = audio[int(start * SAMPLE_RATE) + 160 : int(end * SAMPLE_RATE) - 160]
            return float(np.sqrt(np.mean(part**2))) if len(part) else None
        pauses = [r for p, s, e in segments if p == "pau" and (r := rms(s, e)) is not None]
        speech = [r for p, s, e in segments if p != "pau" and (r := rms(s, e)) is not None]
        assert max(pauses) < 0.1 * np.median(speech), clip.clip_id

        rows = alignments[alignments.clip_id == clip.clip_id]
        phones, words = rows[rows.tier == "phone"], rows[rows.tier == "word"]
        assert len(phones) and len(words)
        assert np.all(np.diff(phones.end_s.to_numpy()) > 0) and np.all(phones.start_s < phones.end_s)
        assert phones.end_s.max() <= clip.duration_s + SAMPLE
        for word in words.itertuples():  # every word is exactly covered by its phones
            inside = phones[(phones.start_s >= word.start_s - SAMPLE) & (phones.end_s <= word.end_s + SAMPLE)]
            assert len(inside), word.label
            assert inside.start_s.min() == pytest.approx(word.start_s, abs=SAMPLE)
            assert inside.end_s.max() == pytest.approx(word.end_s, abs=SAMPLE)
        assert clip.transcript == " ".join(words.label)


def test_timing_check_refuses_segments_that_miss_the_audio():
    segments = [("pau", 0.0, 0.2), ("ae", 0.2, 0.5), ("pau", 0.5, 0.7)]
    check_timings(segments, round(0.7 * SAMPLE_RATE), "ok")
    with pytest.raises(TimingError, match="audio at"):
        check_timings(segments, round(0.72 * SAMPLE_RATE), "diphone tail")
    with pytest.raises(TimingError, match="breaks the sequence"):
        check_timings([("pau", 0.0, 0.2), ("ae", 0.25, 0.7)], round(0.7 * SAMPLE_RATE), "gap")


def test_split_holds_out_whole_voices(voices_build):
    _, build = voices_build
    manifest = load_manifest(build.manifest_path)
    assert set(manifest.loc[manifest.speaker == "ked", "split"]) == {"test"}
    assert "test" not in set(manifest.loc[manifest.speaker != "ked", "split"])
    ids = [f"slt-s0-g{i:05d}" for i in range(300)]
    assert {voice_split(i, "slt", ("slt",)) for i in ids} == {"test"}
    assert {voice_split(i, "slt", ("kal",)) for i in ids} == {"train", "dev"}


def test_other_language_prompts_build_a_manifest_of_real_clips(tmp_path):
    require_extra(_languages_installed(), "asterisk-core-sounds-{fr,es,it,ru}-g722 and their transcripts")
    build = build_asterisk_languages(tmp_path / "datasets" / "langs", limit=2, data_root=tmp_path)
    manifest = load_manifest(build.manifest_path)
    assert build.alignments_path is None and not (tmp_path / "datasets" / "langs" / "alignments.parquet").exists()
    assert sorted(manifest.groupby("language").size().items()) == [(lang, 2) for lang in sorted(LANGUAGES)]
    assert set(manifest.speaker) == {speaker for _, speaker in LANGUAGES.values()}
    for clip in manifest.itertuples():
        audio = _samples(tmp_path / clip.path)
        assert clip.duration_s == pytest.approx(len(audio) / SAMPLE_RATE) and clip.duration_s > 0.2
        assert np.sqrt(np.mean(audio**2)) > 100, clip.clip_id  # recorded speech, not silence
        assert clip.transcript
    assert all(re.search("[а-я]", t) for t in manifest.loc[manifest.language == "ru", "transcript"])
    assert any(name == "no transcript" or name.startswith("non-speech") or name == "silence"
               for _, name in build.skipped)


def test_text_source_yields_thousands_of_distinct_readable_sentences():
    require_extra(_texts_installed(), "dict-devil and dict-jargon (public-domain texts)")
    sentences = load_corpus_sentences()
    assert len(sentences) >= 3000 and len(set(sentences)) == len(sentences)
    assert all(clean_sentence(s) == s and not re.search(r"\d", s) for s in sentences)
    assert len({w.lower().strip(".,;:!?'") for s in sentences for w in s.split()}) >= 10_000  # varied vocabulary
    assert clean_sentence("Press 1 for the BSOD, {foo}.") is None


def test_large_corpus_assets_combine_the_parts(tmp_path):
    _need_voices()
    require_extra(_languages_installed() and Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(),
                  "Asterisk prompt sets")
    from freud_pipeline.defs import datasets as dataset_assets
    from freud_pipeline.defs.resources import FreudStorage

    assets = [dataset_assets.asterisk_prompts, dataset_assets.festival_voices, dataset_assets.asterisk_languages,
              dataset_assets.large_corpus]
    result = dg.materialize(assets, resources={"storage": FreudStorage(data_dir=str(tmp_path))}, run_config={"ops": {
        "asterisk_prompts": {"config": {"limit": 2, "align": False}},
        "festival_voices": {"config": {"clips_per_voice": 1, "clip_words": 8, "voices": ["slt", "kal"],
                                       "holdout_voices": ["kal"]}},
        "asterisk_languages": {"config": {"limit": 1, "languages": ["fr", "it"]}},
    }})
    assert result.success
    out = result.output_for_node("large_corpus")
    manifest = load_manifest(out["manifest_path"])
    assert manifest.groupby("source").size().to_dict() == {
        "asterisk_prompts": 2, "festival_voices": 2, "asterisk_languages": 2}
    assert set(manifest.language) == {"en", "fr", "it"} and manifest.speaker.nunique() == 5
    aligned = set(load_alignments(out["alignments_path"]).clip_id)
    assert aligned == set(manifest.loc[manifest.source == "festival_voices", "clip_id"])
    meta = result.asset_materializations_for_node("large_corpus")[0].metadata
    assert meta["n_speakers"].value == 5
