"""Real recorded speech in other languages: the Asterisk core prompt sets in French, Spanish, Italian and Russian
(Debian `asterisk-core-sounds-{fr,es,it,ru}-g722`, transcripts in `asterisk-core-sounds-{fr,es,it,ru}`;
CC-BY-SA-3.0). Unaligned material for SAE training and non-English contrast: the manifest carries `speaker` and
`language`, the transcripts as written (lower case, no punctuation); there are no alignments.

Speakers: French (Canada) "June", Spanish (Mexico) "Allison" (the speaker of the English set), Italian "Carlo",
Russian an unnamed IVR voice. Prompts without a transcript (beeps, some letters), silence and bracketed
non-speech are left out and reported in `DatasetBuild.skipped`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from freud_pipeline.audio.datasets._common import convert_all, slug
from freud_pipeline.audio.datasets.asterisk import read_transcripts
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

SOURCE = "asterisk_languages"
SOUNDS_ROOT = Path("/usr/share/asterisk/sounds")
DOC_ROOT = Path("/usr/share/doc")
# language -> (sound folder, speaker)
LANGUAGES = {
    "fr": ("fr_CA_f_June", "june"),
    "es": ("es_MX_f_Allison", "allison"),
    "it": ("it_IT_m_Carlo", "carlo"),
    "ru": ("ru_RU_f_IvrvoiceRU", "ivrvoice_ru"),
}


def written_transcript(raw: str) -> str:
    """Lower-case words of a transcript in any language: bracketed markers and punctuation dropped."""
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", raw).replace("\ufeff", "")
    return " ".join(re.sub(r"[^\w'\s]|_", " ", text).lower().split())


def _paths(language: str, sounds_root: Path, doc_root: Path) -> tuple[Path, Path]:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    sounds = sounds_root / LANGUAGES[language][0]
    transcripts = doc_root / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"
    if not sounds.is_dir() or not transcripts.exists():
        raise DatasetUnavailableError(f"Asterisk {language} prompts not found ({sounds}, {transcripts}): apt-get install "
                                      f"asterisk-core-sounds-{language}-g722 asterisk-core-sounds-{language}")
    return sounds, transcripts


def _speech_prompts(language: str, sounds: Path, transcripts_path: Path, skipped: list) -> list[tuple[str, Path, str]]:
    """(name, g722 file, transcript) of the speech prompts of one language, in name order."""
    transcripts = read_transcripts(transcripts_path)
    speech = []
    for path in sorted(sounds.rglob("*.g722")):
        name = path.relative_to(sounds).with_suffix("").as_posix()
        raw = transcripts.get(name)
        if raw is None:
            skipped.append((str(path), "no transcript"))
        elif name.startswith("silence/"):
            skipped.append((str(path), "silence"))
        elif not (text := written_transcript(raw)):
            skipped.append((str(path), f"non-speech: {raw}"))
        else:
            speech.append((name, path, text))
    return speech


def build_asterisk_languages(
    out_dir: Path,
    languages: tuple[str, ...] = tuple(LANGUAGES),
    limit: int | None = None,
    *,
    data_root: Path | None = None,
    sounds_root: Path = SOUNDS_ROOT,
    doc_root: Path = DOC_ROOT,
    workers: int | None = None,
) -> DatasetBuild:
    """Convert the speech prompts of each language to 16 kHz WAV under out_dir/audio/<language>/ and write the
    manifest (no alignments). `limit` keeps the first N speech prompts of each language in name order."""
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    skipped: list[tuple[str, str]] = []
    prompts = []  # (language, name, g722 file, transcript)
    for language in languages:
        speech = _speech_prompts(language, *_paths(language, sounds_root, doc_root), skipped)
        prompts += [(language, *p) for p in speech[:limit]]
    jobs = [(path, out_dir / "audio" / lang / f"{slug(name)}.wav", "g722") for lang, name, path, _ in prompts]
    durations, failed = convert_all(jobs, workers, desc="asterisk languages", mono_sources=True)
    skipped += failed
    rows = []
    for (lang, name, _, text), (_, dst, _) in zip(prompts, jobs):
        if dst not in durations:
            continue
        clip_id = f"asterisk-{lang}-{slug(name)}"
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": text, "speaker": LANGUAGES[lang][1], "source": SOURCE,
            "split": assign_split(clip_id), "language": lang,
        })
    build = finish_build(SOURCE, out_dir, rows, None, skipped)
    log.info("asterisk languages %s: %d clips (%.0f s), %d skipped", ",".join(languages), build.n_clips,
             build.total_seconds, len(skipped))
    return build
