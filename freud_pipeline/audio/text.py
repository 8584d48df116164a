"""Transcript normalisation: spoken-form, lower-case words separated by single spaces (what jiwer and a
pronunciation dictionary expect). "Press 1 or #" -> "press one or pound". `word_error_rate` is FREUD's one WER."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_ORDINAL_ENDINGS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                    "nine": "ninth", "twelve": "twelfth"}
# Symbols people read aloud on the phone; other punctuation is dropped.
_SPOKEN_SYMBOLS = {"#": " pound ", "*": " star ", "&": " and ", "%": " percent ", "@": " at "}


def number_to_words(n: int) -> str:
    """Cardinal English words for a non-negative integer: 342 -> "three hundred forty two"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{number_to_words(head)} {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """3 -> "third", 21 -> "twenty first", 40 -> "fortieth"."""
    *head, last = number_to_words(n).split()
    if last in _ORDINAL_ENDINGS:
        last = _ORDINAL_ENDINGS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def _spell_number(match: re.Match) -> str:
    digits, suffix = match.group(1).replace(",", ""), (match.group(2) or "").lower()
    if "." in digits:  # 1.5 -> one point five
        whole, frac = digits.split(".")
        return f" {number_to_words(int(whole))} point {' '.join(_ONES[int(d)] for d in frac)} {suffix} "
    if len(digits) > 1 and digits.startswith("0") or len(digits) > 15:  # codes like 007 are read digit by digit
        return " " + " ".join(_ONES[int(d)] for d in digits) + f" {suffix} "
    if suffix in ("st", "nd", "rd", "th"):
        return f" {ordinal_to_words(int(digits))} "
    return f" {number_to_words(int(digits))} {suffix} "


def normalise_transcript(text: str) -> str:
    """Spoken-form transcript: no stage directions, numerals and phone symbols as words, lower-case, no punctuation."""
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]|<[^>]*>", " ", text)  # (stage directions), [sound], <beep> markers
    text = re.sub(r"\b(?:[A-Za-z]\.){2,}", lambda m: " " + " ".join(m.group(0).split(".")) + " ", text)  # A.M.
    for symbol, spoken in _SPOKEN_SYMBOLS.items():
        text = text.replace(symbol, spoken)
    text = re.sub(r"(?<=\w)\.(?=[A-Za-z0-9])(?!\d)", " dot ", text)  # www.asterisk.org
    text = re.sub(r"(\d[\d,]*(?:\.\d+)?)([A-Za-z]*)", _spell_number, text)  # 500 -> five hundred, 3D -> three d
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)  # hyphens and punctuation split or vanish
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # keep only word-internal apostrophes (don't, party's)
    return " ".join(text.split())


def _normalised_pairs(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> tuple[list[str], list[str]]:
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    refs, hyps = [normalise_transcript(t) for t in refs], [normalise_transcript(t) for t in hyps]
    if not refs or not all(refs):
        raise ValueError("every reference needs at least one word after normalisation")
    return refs, hyps


def word_error_rate(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Corpus WER of hypotheses against references, both put through `normalise_transcript` first: the one WER
    every part of FREUD reports, so numbers from different places compare. References must not normalise to ""."""
    import jiwer

    refs, hyps = _normalised_pairs(references, hypotheses)
    return float(jiwer.wer(refs, hyps))


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, after the same normalisation as `word_error_rate`: (substitutions + deletions + insertions,
    reference words). Their sums' ratio is word_error_rate's corpus WER; per-clip counts are what a bootstrap over
    clips resamples."""
    import jiwer

    refs, hyps = _normalised_pairs(references, hypotheses)
    errors, words = [], []
    for ref, hyp in zip(refs, hyps):
        out = jiwer.process_words(ref, hyp)
        errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(out.substitutions + out.deletions + out.hits)
    return np.asarray(errors), np.asarray(words)
