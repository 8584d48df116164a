"""Real recorded speech: the Asterisk core sound prompts (one female US speaker, "Allison", CC-BY-SA-3.0).

Needs Debian `asterisk-core-sounds-en-g722` (16 kHz G.722 audio) and `asterisk-core-sounds-en` (transcripts).
Only speech goes into the manifest; silence, tones and prompts whose text does not match the audio are
reported in `DatasetBuild.skipped`.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

from freud_pipeline.audio.datasets._common import align_with_cache, convert_all, slug
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.audio.text import normalise_transcript
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SOURCE = "asterisk_prompts"
# Longer prompts in this set are not what their transcript says (one 73 s recording).
MAX_PROMPT_SECONDS = 60.0
# Spelling mistakes in the transcript file; the audio says the corrected word.
_TYPOS = {
    "umute": "unmute",
    "represenatives": "representatives",
    "indentified": "identified",
    "witheld": "withheld",
    "exclaimation": "exclamation",
    "fourtieth": "fortieth",
}


def read_transcripts(path: Path = TRANSCRIPTS) -> dict[str, str]:
    """Prompt name (e.g. "digits/1") -> raw transcript, from lines "name: text"."""
    opener = gzip.open if path.suffix == ".gz" else open
    transcripts = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            transcripts[name.strip()] = text.strip()
    return transcripts


def spoken_transcript(raw: str) -> str:
    """Normalised transcript with the file's known typos corrected ('' for silence or non-speech)."""
    words = normalise_transcript(raw).split()
    return " ".join(_TYPOS.get(w, w) for w in words)


def build_asterisk_prompts(
    out_dir: Path,
    limit: int | None = None,
    align: bool = True,
    *,
    data_root: Path | None = None,
    sounds_dir: Path = SOUNDS_DIR,
    transcripts_path: Path = TRANSCRIPTS,
    workers: int | None = None,
) -> DatasetBuild:
    """Convert the speech prompts to 16 kHz WAV under out_dir/audio and write manifest (+ alignments).

    `limit` keeps the first N speech prompts in name order (deterministic). Re-running skips files already
    converted and reuses alignments whose transcript did not change.
    """
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    if not sounds_dir.is_dir() or not transcripts_path.exists():
        raise DatasetUnavailableError(
            f"Asterisk prompts not found ({sounds_dir}, {transcripts_path}). Install them: "
            "apt-get install asterisk-core-sounds-en-g722 asterisk-core-sounds-en"
        )
    transcripts = read_transcripts(transcripts_path)
    skipped: list[tuple[str, str]] = []
    speech: list[tuple[str, Path, str]] = []  # (name, g722 file, transcript)
    for path in sorted(sounds_dir.rglob("*.g722")):
        name = path.relative_to(sounds_dir).with_suffix("").as_posix()
        raw = transcripts.get(name)
        if raw is None:
            skipped.append((str(path), "no transcript"))
        elif name.startswith("silence/"):
            skipped.append((str(path), "silence"))
        elif not (text := spoken_transcript(raw)):
            skipped.append((str(path), f"non-speech: {raw}"))
        else:
            speech.append((name, path, text))
    if limit is not None:
        speech = speech[:limit]

    audio_dir = out_dir / "audio"
    jobs = [(path, audio_dir / f"{slug(name)}.wav", "g722") for name, path, _ in speech]
    durations, failed = convert_all(jobs, workers, desc="asterisk prompts", mono_sources=True)
    skipped += failed

    rows = []
    for (name, path, text), (_, dst, _) in zip(speech, jobs):
        if dst not in durations:
            continue
        if durations[dst] > MAX_PROMPT_SECONDS:
            skipped.append((str(path), f"transcript does not match the audio ({durations[dst]:.0f} s prompt)"))
            continue
        clip_id = f"asterisk-{slug(name)}"
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": text, "speaker": "allison", "source": SOURCE,
            "split": assign_split(clip_id),
        })

    alignment_rows, unaligned = None, []
    if align:
        alignment_jobs = [(r["clip_id"], data_root / r["path"], r["transcript"]) for r in rows]
        alignment_rows, unaligned = align_with_cache(alignment_jobs, out_dir, workers)
    build = finish_build(SOURCE, out_dir, rows, alignment_rows, skipped, unaligned)
    log.info("asterisk prompts: %d clips (%.0f s), %d skipped, %d unaligned",
             build.n_clips, build.total_seconds, len(skipped), len(unaligned))
    return build
