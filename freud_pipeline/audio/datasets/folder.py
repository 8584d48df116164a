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
    files = [(path, slug(path.relative_to(folder).as_posix())) for path in files]
    return build_from_files(files, out_dir, source=source, speaker=speaker, align=align, data_root=data_root,
                            workers=workers)


def build_from_files(
    files: list[tuple[Path, str]],
    out_dir: Path,
    *,
    source: str,
    speaker: str,
    align: bool,
    data_root: Path,
    workers: int | None,
    skipped: list[tuple[str, str]] | None = None,
) -> DatasetBuild:
    """Convert (source file, name) pairs to <out_dir>/audio/<name>.wav, take transcripts from `.txt` sidecars,
    align what has one, and write the manifest. Clip ids are "<source>-<name>"; `skipped` lists files already
    left out (path, reason), to which those that do not decode are added."""
    jobs = [(path, out_dir / "audio" / f"{name}.wav", None) for path, name in files]
    durations, failed = convert_all(jobs, workers, desc=source)
    skipped = [*(skipped or []), *failed]

    rows = []
    for (path, name), (_, dst, _) in zip(files, jobs):
        if dst not in durations:
            continue
        sidecar = path.with_suffix(".txt")
        transcript = normalise_transcript(sidecar.read_text(encoding="utf-8", errors="replace")) if sidecar.exists() else ""
        clip_id = f"{source}-{name}"
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": transcript, "speaker": speaker, "source": source,
            "split": assign_split(clip_id),
        })

    alignment_rows, unaligned = None, []
    if align and any(r["transcript"] for r in rows):
        align_jobs = [(r["clip_id"], data_root / r["path"], r["transcript"]) for r in rows if r["transcript"]]
        alignment_rows, unaligned = align_with_cache(align_jobs, out_dir, workers)
    return finish_build(source, out_dir, rows, alignment_rows, skipped, unaligned)
