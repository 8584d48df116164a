"""Forced alignment of a known transcript to 16 kHz audio with pocketsphinx (bundled en-us model + CMUdict).

Two passes, as pocketsphinx requires: `set_align_text` + a pass for word boundaries, then `set_alignment` + a
second pass for phone boundaries. Words CMUdict lacks get a pronunciation from EXTRA_PRONUNCIATIONS or, failing
that, from Festival's letter-to-sound rules when Festival is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.audio.phones import to_arpabet
from freud_pipeline.audio.text import normalise_transcript
from freud_pipeline.errors import FreudError

# Telephony and Asterisk vocabulary missing from CMUdict (ARPAbet, as CMUdict writes it).
EXTRA_PRONUNCIATIONS: dict[str, str] = {
    "backtick": "B AE K T IH K",
    "caret": "K EH R AH T",
    "dahdi": "D AA D IY",
    "digium": "D IH JH IY AH M",
    "forevermore": "F ER EH V ER M AO R",
    "iax": "AY EY EH K S",
    "iax(2)": "IY K S",  # Asterisk people also say "eeks"
    "ivr": "AY V IY AA R",
    "lowercase": "L OW ER K EY S",
    "mgcp": "EH M JH IY S IY P IY",
    "pbx": "P IY B IY EH K S",
    "prepend": "P R IY P EH N D",
    "prepending": "P R IY P EH N D IH NG",
    "rerecord": "R IY R IH K AO R D",
    "semicolon": "S EH M IY K OW L AH N",
    "touchtone": "T AH CH T OW N",
    "undelete": "AH N D IH L IY T",
    "undeleted": "AH N D IH L IY T IH D",
    "unistim": "Y UW N IH S T IH M",
    "unmute": "AH N M Y UW T",
    "unmuted": "AH N M Y UW T IH D",
    "uppercase": "AH P ER K EY S",
    "waldo's": "W AO L D OW Z",
    "www": "D AH B AH L Y UW D AH B AH L Y UW D AH B AH L Y UW",
    "xray": "EH K S R EY",
}


class AlignmentError(FreudError, ValueError):
    """A transcript could not be aligned to its audio."""


@dataclass(frozen=True)
class Interval:
    label: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Alignment:
    words: list[Interval] = field(default_factory=list)
    phones: list[Interval] = field(default_factory=list)

    def rows(self, clip_id: str) -> list[dict]:
        """Rows of the alignments table (clip_id, tier, label, start_s, end_s)."""
        return [
            {"clip_id": clip_id, "tier": tier, "label": iv.label, "start_s": iv.start_s, "end_s": iv.end_s}
            for tier, intervals in (("word", self.words), ("phone", self.phones))
            for iv in intervals
        ]


def festival_pronunciations(words: Iterable[str]) -> dict[str, str]:
    """CMU-style pronunciations from Festival's lexicon and letter-to-sound rules ({} without Festival)."""
    words = sorted({w for w in words if re.fullmatch(r"[a-z']+", w)})
    if not words or shutil.which("festival") is None:
        return {}
    script = "".join(f'(print (lex.lookup "{w}" nil))\n' for w in words)
    with tempfile.NamedTemporaryFile("w", suffix=".scm") as fh:
        fh.write("(voice_cmu_us_slt_arctic_hts)\n" + script)
        fh.flush()
        out = subprocess.run(["festival", "-b", fh.name], capture_output=True, text=True, timeout=120).stdout
    result = {}
    # Each line looks like ("digium" nil (((d ay) 1) ((jh iy) 0) ((ax m) 0)))
    for line in out.splitlines():
        match = re.match(r'\("([^"]+)" \S+ (.*)\)$', line.strip())
        if match and match.group(1) in words:
            phones = [to_arpabet(p) for syl in re.findall(r"\(\(([^()]*)\) \d\)", match.group(2)) for p in syl.split()]
            if phones and None not in phones:
                result[match.group(1)] = " ".join(p.upper() for p in phones)
    return result


class ForcedAligner:
    """Reusable aligner (loading the model is the slow part). Not thread-safe: use one per thread or process."""

    def __init__(self, extra_pronunciations: Mapping[str, str] | None = None, letter_to_sound: bool = True):
        from pocketsphinx import Decoder  # imported lazily: only alignment needs it

        self._decoder = Decoder(samprate=SAMPLE_RATE, bestpath=False, loglevel="FATAL")
        self._frame_rate = float(self._decoder.config["frate"])
        self._letter_to_sound = letter_to_sound
        self._add_words({**EXTRA_PRONUNCIATIONS, **(extra_pronunciations or {})})

    def _add_words(self, pronunciations: Mapping[str, str]) -> None:
        new = [(w, p) for w, p in pronunciations.items() if self._decoder.lookup_word(w) is None]
        for i, (word, phones) in enumerate(new):
            # Rebuilding the search is slow, so do it once, after the last word.
            self._decoder.add_word(word, phones, update=i == len(new) - 1)

    def missing_words(self, words: Iterable[str]) -> list[str]:
        return sorted({w for w in words if self._decoder.lookup_word(w) is None})

    def add_pronunciations(self, words: Iterable[str]) -> list[str]:
        """Give unknown words a letter-to-sound pronunciation; returns those still unknown."""
        missing = self.missing_words(words)
        if missing and self._letter_to_sound:
            self._add_words(festival_pronunciations(missing))
            missing = self.missing_words(missing)
        return missing

    def align(self, audio: np.ndarray, transcript: str) -> Alignment:
        """Word and phone intervals (seconds) of `transcript` in 16 kHz mono `audio`."""
        text = normalise_transcript(transcript)
        if not text:
            raise AlignmentError("The transcript is empty after normalisation; there is nothing to align.")
        if missing := self.add_pronunciations(text.split()):
            raise AlignmentError(f"No pronunciation for {missing}; add them with ForcedAligner(extra_pronunciations=...).")
        pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2").tobytes()
        decoder = self._decoder
        try:
            decoder.set_align_text(text)
            self._decode(pcm)
            decoder.set_alignment()
            self._decode(pcm)
            result = decoder.get_alignment()
        except RuntimeError as exc:
            raise AlignmentError(f"pocketsphinx could not align {text!r} to {len(audio) / SAMPLE_RATE:.2f} s of audio: {exc}") from exc
        words = [self._interval(w, re.sub(r"\(\d+\)$", "", w.name)) for w in result.words() if not w.name.startswith(("<", "["))]
        phones = [self._interval(p, label) for p in result.phones() if (label := to_arpabet(p.name))]
        if len(words) != len(text.split()) or not phones:
            raise AlignmentError(f"pocketsphinx aligned {len(words)} of the {len(text.split())} words of {text!r}.")
        return Alignment(words, phones)

    def _decode(self, pcm: bytes) -> None:
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()

    def _interval(self, entry, label: str) -> Interval:
        return Interval(label, round(entry.start / self._frame_rate, 3), round((entry.start + entry.duration) / self._frame_rate, 3))


_default_aligner: ForcedAligner | None = None


def align(audio: np.ndarray, transcript: str) -> Alignment:
    """Align with a process-wide ForcedAligner (created on first use)."""
    global _default_aligner
    if _default_aligner is None:
        _default_aligner = ForcedAligner()
    return _default_aligner.align(audio, transcript)


def align_file(path: str | Path, transcript: str) -> Alignment:
    from freud_pipeline.audio.decode import load_audio

    return align(load_audio(path), transcript)
