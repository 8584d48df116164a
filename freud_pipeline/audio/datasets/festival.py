"""Synthetic speech with exact phone timings: Festival with the CMU US SLT HTS voice (Debian `festival`,
`festvox-us-slt-hts`). Timings come from Festival's own segment relation, so they are exact by construction."""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from freud_pipeline.audio.datasets._common import convert_all, default_workers
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.audio.phones import to_arpabet
from freud_pipeline.audio.text import normalise_transcript
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

SOURCE = "festival_speech"
VOICE = "voice_cmu_us_slt_arctic_hts"
SENTENCES_FILE = Path(__file__).with_name("sentences.txt")

# Writes one line per segment: word item id, word, phone, start, end (word fields are 0 for pauses).
_DUMP_FUNCTION = """
(define (freud_dump utt path)
  (let ((fd (fopen path "w")))
    (mapcar
      (lambda (seg)
        (format fd "%l\\t%l\\t%l\\t%l\\t%l\\n"
          (item.feat seg "R:SylStructure.parent.parent.id")
          (item.feat seg "R:SylStructure.parent.parent.name")
          (item.name seg) (item.feat seg "segment_start") (item.feat seg "end")))
      (utt.relation.items utt 'Segment))
    (fclose fd)))
"""


def load_sentences(path: Path = SENTENCES_FILE) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_festival(items: list[tuple[str, str]], work_dir: Path, voice: str = VOICE) -> None:
    """Synthesise (clip_id, sentence) items in one Festival process with `voice` (a Festival voice function):
    <clip_id>.wav and <clip_id>.lab (freud_dump's segment lines) in `work_dir`."""
    lines = [f"({voice})", _DUMP_FUNCTION]
    for clip_id, sentence in items:
        stem = _scheme_string(str(work_dir / clip_id))[:-1]
        lines.append(f"(set! utt (utt.synth (Utterance Text {_scheme_string(sentence)})))")
        lines.append(f"(utt.save.wave utt {stem}.wav\" 'riff)")
        lines.append(f"(freud_dump utt {stem}.lab\")")
    script = work_dir / f"batch-{items[0][0]}.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(["festival", "-b", str(script)], capture_output=True, text=True)
    if proc.returncode != 0 or not all((work_dir / f"{cid}.lab").exists() for cid, _ in items):
        raise RuntimeError(f"festival ({voice}) failed on {script}: {proc.stderr.strip()[-500:]}")


def parse_segments(lab_text: str, clip_id: str) -> list[dict]:
    """Alignment rows (word and phone tiers) from a freud_dump file; pauses are dropped."""
    words: list[list] = []  # [word item id, label, start, end]
    phones = []
    for line in lab_text.splitlines():
        word_id, word, phone, start, end = (field.strip('"') for field in line.split("\t"))
        start_s, end_s = round(float(start), 5), round(float(end), 5)
        label = to_arpabet(phone)
        if label is None:
            continue
        phones.append({"clip_id": clip_id, "tier": "phone", "label": label, "start_s": start_s, "end_s": end_s})
        if words and words[-1][0] == word_id:
            words[-1][3] = end_s
        else:
            words.append([word_id, normalise_transcript(word), start_s, end_s])
    word_rows = [{"clip_id": clip_id, "tier": "word", "label": w, "start_s": s, "end_s": e} for _, w, s, e in words]
    return word_rows + phones


def select_sentences(n_sentences: int, seed: int, sentences: list[str]) -> list[tuple[int, str]]:
    """n (line index, sentence) pairs drawn without replacement, deterministic for a seed."""
    if not 0 < n_sentences <= len(sentences):
        raise ValueError(f"n_sentences must be between 1 and {len(sentences)} (the sentences available)")
    indices = random.Random(seed).sample(range(len(sentences)), n_sentences)
    return [(i, sentences[i]) for i in indices]


def build_festival_speech(
    out_dir: Path,
    n_sentences: int = 60,
    seed: int = 0,
    *,
    data_root: Path | None = None,
    sentences: list[str] | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Synthesise n sentences (chosen by seed from sentences.txt) to 16 kHz WAV with exact word/phone timings."""
    if shutil.which("festival") is None:
        raise DatasetUnavailableError("Festival is not installed: apt-get install festival festvox-us-slt-hts")
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    chosen = select_sentences(n_sentences, seed, sentences or load_sentences())
    # The id follows the sentence, not the draw, so the same sentence is the same clip under any seed.
    items = [(f"festival-s{index:03d}", sentence) for index, sentence in chosen]
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="festival-") as tmp:
        work_dir = Path(tmp)
        todo = [item for item in items if not (audio_dir / f"{item[0]}.wav").exists() or not (audio_dir / f"{item[0]}.lab").exists()]
        if todo:
            n_batches = min(workers or default_workers(), len(todo))
            batches = [todo[i::n_batches] for i in range(n_batches)]  # one Festival process per core
            with ThreadPoolExecutor(n_batches) as pool:
                list(pool.map(lambda batch: run_festival(batch, work_dir), batches))
            for clip_id, _ in todo:
                shutil.copyfile(work_dir / f"{clip_id}.lab", audio_dir / f"{clip_id}.lab")
        jobs = [(work_dir / f"{cid}.wav", audio_dir / f"{cid}.wav", None) for cid, _ in items]
        durations, failed = convert_all(jobs, workers, desc="festival speech", mono_sources=True)
    if failed:
        raise RuntimeError(f"could not convert Festival output: {failed[:3]}")

    rows, alignment_rows = [], []
    for (clip_id, sentence), (_, dst, _) in zip(items, jobs):
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": normalise_transcript(sentence), "speaker": "slt",
            "source": SOURCE, "split": assign_split(clip_id),
        })
        alignment_rows += parse_segments((audio_dir / f"{clip_id}.lab").read_text(encoding="utf-8"), clip_id)
    build = finish_build(SOURCE, out_dir, rows, alignment_rows)
    log.info("festival speech: %d clips (%.0f s)", build.n_clips, build.total_seconds)
    return build
