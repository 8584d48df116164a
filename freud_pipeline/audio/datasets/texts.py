"""Public-domain English text read at build time from installed Debian packages, as sentences Festival reads.

- `dict-devil`: Ambrose Bierce, *The Devil's Dictionary* (1911); its Debian copyright file: "in the public
  domain, its copyright has expired".
- `dict-jargon`: *The Jargon File* 4.4.7; its Debian copyright file: "License: public-domain".

Both ship as dictd files (`/usr/share/dictd/*.dict.dz`, gzip-compatible). Sentences are kept when they are plain
prose that a speech synthesiser reads as written: 6 to 30 words, ASCII letters and ordinary punctuation, no
digits, no acronyms or symbols; cross-reference braces are dropped.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from freud_pipeline.errors import DatasetUnavailableError

DICTD_DIR = Path("/usr/share/dictd")
TEXT_SOURCES = {"devil": "dict-devil", "jargon": "dict-jargon"}  # dictd file stem -> Debian package
MIN_WORDS, MAX_WORDS = 6, 30

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")
_ALLOWED = re.compile(r"[A-Za-z ,.;:!?'\"-]+")
_ABBREVIATION = re.compile(r"\b(?:[A-Za-z]\.){2,}|\b(?:Mr|Mrs|Dr|St|vs|etc|cf|Jr|Sr|No)\.", re.IGNORECASE)


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a dictd file: blank-line separated blocks, whitespace joined; verse (short lines) and
    the database's own header entries are left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines or "00-database" in block or sum(map(len, lines)) / len(lines) < 45 and len(lines) > 1:
            continue
        out.append(" ".join(lines))
    return out


def clean_sentence(sentence: str) -> str | None:
    """The sentence as Festival should read it, or None when it is not plain readable prose."""
    sentence = re.sub(r"[{}]", "", sentence).replace('"', "")  # {cross reference} -> cross reference
    sentence = re.sub(r"\s*--\s*", ", ", sentence)
    sentence = re.sub(r"\s+", " ", sentence).strip().strip("'").strip()
    if not _ALLOWED.fullmatch(sentence) or _ABBREVIATION.search(sentence) or re.search(r"[,;:-][.!?]$", sentence):
        return None
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return None
    if any(sum(c.isupper() for c in w) > 1 for w in words):  # acronyms, headwords in capitals
        return None
    return sentence


def sentences_from_text(text: str) -> list[str]:
    """Distinct clean sentences of one text, in order of first appearance."""
    seen: dict[str, None] = {}
    for paragraph in _paragraphs(text):
        for raw in _SENTENCE_END.split(paragraph):
            if (sentence := clean_sentence(raw)) is not None:
                seen.setdefault(sentence, None)
    return list(seen)


def load_corpus_sentences(sources: tuple[str, ...] = tuple(TEXT_SOURCES), dictd_dir: Path = DICTD_DIR) -> list[str]:
    """Distinct sentences of the named public-domain texts (default: all), in a stable order."""
    sentences: dict[str, None] = {}
    for name in sources:
        if name not in TEXT_SOURCES:
            raise ValueError(f"unknown text source {name!r}; known: {', '.join(TEXT_SOURCES)}")
        path = dictd_dir / f"{name}.dict.dz"
        if not path.exists():
            raise DatasetUnavailableError(f"{path} not found: apt-get install {TEXT_SOURCES[name]}")
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            for sentence in sentences_from_text(fh.read()):
                sentences.setdefault(sentence, None)
    return list(sentences)
