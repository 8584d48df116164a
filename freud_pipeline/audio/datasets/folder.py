"""Any local folder of recordings. Transcripts come from sidecar text files (`clip.wav` + `clip.txt`)."""

from __future__ import annotations

from pathlib import Path

from freud_pipeline.audio.datasets._common import align_with_cache, convert_all, slug
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.audio.text import normalise_transcript


def build_audio_folder(
    folder: Path,
    out_dir: Path,
    *,
    source: str = "audio_folder",
    speaker: str = "unknown",
    align: bool = True,
    data_root: Path | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Convert every readable file under `folder` (recursively) to 16 kHz mono WAV and write the manifest.

    Every file except hidden ones and .txt sidecars is tried, whatever its extension; files that do not decode
    are reported in `skipped` with the reason. Clips with a transcript are force-aligned when `align`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(2, "No such folder", str(folder))
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() != ".txt" and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    # The extension stays in the id so that take1.wav and take1.mp3 remain two clips.
    names = {path: slug(path.relative_to(folder).as_posix()) for path in files}
    jobs = [(path, out_dir / "audio" / f"{names[path]}.wav", None) for path in files]
    durations, skipped = convert_all(jobs, workers, desc=source)

    rows = []
    for path, (_, dst, _) in zip(files, jobs):
        if dst not in durations:
            continue
        sidecar = path.with_suffix(".txt")
        transcript = normalise_transcript(sidecar.read_text(encoding="utf-8", errors="replace")) if sidecar.exists() else ""
        clip_id = f"{source}-{names[path]}"
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": transcript, "speaker": speaker, "source": source,
            "split": assign_split(clip_id),
        })

    alignment_rows, unaligned = None, []
    if align and any(r["transcript"] for r in rows):
        jobs = [(r["clip_id"], data_root / r["path"], r["transcript"]) for r in rows if r["transcript"]]
        alignment_rows, unaligned = align_with_cache(jobs, out_dir, workers)
    return finish_build(source, out_dir, rows, alignment_rows, skipped, unaligned)
