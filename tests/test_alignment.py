"""Transcript normalisation and pocketsphinx forced alignment on real and synthetic speech."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from freud_pipeline.audio.alignment import AlignmentError, ForcedAligner, festival_pronunciations
from freud_pipeline.audio.datasets.festival import parse_segments
from freud_pipeline.audio.decode import SAMPLE_RATE, load_audio
from freud_pipeline.audio.phones import ARPABET
from freud_pipeline.audio.text import normalise_transcript, number_to_words, ordinal_to_words

try:
    from conftest import requires
except ImportError:  # tests collected as a package
    from tests.conftest import requires

ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
needs_asterisk = requires(ALLISON.is_dir(), "Debian asterisk-core-sounds-en-g722")
needs_festival = requires(shutil.which("festival") is not None, "Debian festival + festvox-us-slt-hts")


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("Press 1 or #.", "press one or pound"),
        ("press * to toggle pause, press # to enter a new dictation filename", "press star to toggle pause press pound to enter a new dictation filename"),
        ("Please leave your message after the tone. (simple tone sound plays)", "please leave your message after the tone"),
        ('IAX (note: does not say "2")', "iax"),
        ("at [@]", "at"),
        ("<beep ascending>", ""),
        ("Dial 500 to reach the 21st floor", "dial five hundred to reach the twenty first floor"),
        ("I'm sorry, that's 'not' valid!", "i'm sorry that's not valid"),
        ("Call-Forward on No Answer...", "call forward on no answer"),
        ("...has joined the conference.", "has joined the conference"),
        ("visit www.asterisk.org at 9 A.M.", "visit www dot asterisk dot org at nine a m"),
        ("3D audio", "three d audio"),
    ],
)
def test_normalise_transcript(raw, spoken):
    assert normalise_transcript(raw) == spoken
    assert normalise_transcript(spoken) == spoken  # idempotent


def test_numbers():
    assert number_to_words(0) == "zero"
    assert number_to_words(342) == "three hundred forty two"
    assert number_to_words(1_000_015) == "one million fifteen"
    assert [ordinal_to_words(n) for n in (1, 2, 3, 12, 40, 99)] == [
        "first", "second", "third", "twelfth", "fortieth", "ninety ninth"]


@pytest.fixture(scope="module")
def aligner() -> ForcedAligner:
    return ForcedAligner()


def check_intervals(alignment, duration_s: float) -> None:
    for tier in (alignment.words, alignment.phones):
        starts = [iv.start_s for iv in tier]
        assert starts == sorted(starts)
        assert all(0 <= iv.start_s < iv.end_s <= duration_s + 0.011 for iv in tier)
    assert {iv.label for iv in alignment.phones} <= ARPABET


@needs_asterisk
def test_align_real_prompt(aligner):
    audio = load_audio(ALLISON / "agent-pass.g722")
    text = "Please enter your password followed by the pound key."
    result = aligner.align(audio, text)
    assert [w.label for w in result.words] == normalise_transcript(text).split()
    check_intervals(result, len(audio) / SAMPLE_RATE)
    password = next(w for w in result.words if w.label == "password")
    inside = [p.label for p in result.phones if password.start_s <= p.start_s < password.end_s]
    assert inside == ["p", "ae", "s", "w", "er", "d"]


@needs_asterisk
def test_added_pronunciations_and_alternates(aligner):
    result = aligner.align(load_audio(ALLISON / "spy-iax.g722"), "IAX")
    assert [w.label for w in result.words] == ["iax"]  # a word CMUdict lacks


@needs_festival
def test_alignment_agrees_with_festival_timings(aligner, tmp_path):
    """Festival knows where its phones are; pocketsphinx should find the words within a few frames."""
    sentence = "The orange cat jumped onto the fence and watched the birds."
    script = tmp_path / "say.scm"
    from freud_pipeline.audio.datasets.festival import _DUMP_FUNCTION, VOICE

    script.write_text(
        f"({VOICE})\n{_DUMP_FUNCTION}\n(set! utt (utt.synth (Utterance Text \"{sentence}\")))\n"
        f"(utt.save.wave utt \"{tmp_path}/say.wav\" 'riff)\n(freud_dump utt \"{tmp_path}/say.lab\")\n"
    )
    subprocess.run(["festival", "-b", str(script)], check=True)
    truth = [r for r in parse_segments((tmp_path / "say.lab").read_text(), "c") if r["tier"] == "word"]
    audio = load_audio(tmp_path / "say.wav")
    result = aligner.align(audio, sentence)
    assert [w.label for w in result.words] == [r["label"] for r in truth]
    errors = [abs(w.start_s - r["start_s"]) for w, r in zip(result.words, truth)]
    assert np.median(errors) < 0.05 and max(errors) < 0.15


def test_unknown_words_are_a_clear_error():
    strict = ForcedAligner(letter_to_sound=False)
    with pytest.raises(AlignmentError, match="xqzzyv"):
        strict.align(np.zeros(SAMPLE_RATE, dtype=np.float32), "hello xqzzyv")
    with pytest.raises(AlignmentError, match="empty"):
        strict.align(np.zeros(SAMPLE_RATE, dtype=np.float32), "(silence)")


def test_too_little_audio_for_the_text(aligner):
    with pytest.raises(AlignmentError, match="could not align"):
        aligner.align(np.zeros(800, dtype=np.float32), "the quick brown fox jumped over the lazy dog again")


@needs_festival
def test_letter_to_sound_fallback():
    pronunciations = festival_pronunciations(["digium", "blorptastic"])
    assert set(pronunciations) == {"digium", "blorptastic"}
    assert all(set(p.lower().split()) <= ARPABET for p in pronunciations.values())
