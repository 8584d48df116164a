"""ESC-50: 2000 five-second environmental sound clips in 50 classes (GitHub karolpiczak/ESC-50).

Layout after extraction: <root>/ESC-50-master/audio/*.wav and meta/esc50.csv
(filename,fold,target,category,esc10,src_file,take).

Non-speech, so the manifest transcript is "" and the class goes into the extra column `labels`; `fold` (the
dataset's own 1-5 cross-validation folds) is kept too. `speaker` holds the Freesound recording the clip was
cut from, and the split is drawn per recording, so clips of one recording never straddle train and test.
"""

from __future__ import annotations

import csv
from pathlib import Path

from freud_pipeline.audio.datasets._common import convert_all
from freud_pipeline.audio.datasets._download import download, extract
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.errors import DatasetUnavailableError

SOURCE = "esc50"
URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"


def download_esc50(dest: Path | None = None) -> Path:
    """Download and extract ESC-50; returns the root that holds ESC-50-master/.

    GitHub's branch archive has no published checksum, so the zip's CRCs are the integrity check.
    """
    dest = Path(dest) if dest is not None else resolve_data_root(None) / "corpora" / "esc50"
    if not (dest / "ESC-50-master" / "meta" / "esc50.csv").exists():
        archive = download(URL, dest / "ESC-50-master.zip", manual_hint=f"or unzip it so that {dest}/ESC-50-master/ exists")
        extract(archive, dest)
    return dest


def build_esc50(
    out_dir: Path,
    *,
    root: Path | None = None,
    download: bool = True,
    limit: int | None = None,
    data_root: Path | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Convert ESC-50 clips to 16 kHz WAV under out_dir/audio and write the manifest (first `limit` by filename).

    `root` (holding ESC-50-master/) defaults to <data_root>/corpora/esc50 and is downloaded there if missing.
    """
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    root = Path(root) if root is not None else data_root / "corpora" / "esc50"
    corpus = root / "ESC-50-master"
    meta = corpus / "meta" / "esc50.csv"
    if not meta.exists() and download:
        download_esc50(root)
    elif not meta.exists():
        raise DatasetUnavailableError(f"{meta} not found; unzip {URL} into {root}, or pass download=True.")
    with open(meta, newline="", encoding="utf-8") as fh:
        entries = sorted(csv.DictReader(fh), key=lambda e: e["filename"])[:limit]

    jobs = [(corpus / "audio" / e["filename"], out_dir / "audio" / f"{Path(e['filename']).stem}.wav", None) for e in entries]
    # ESC-50 clips are mono 44.1 kHz, so the batched converter applies.
    durations, skipped = convert_all(jobs, workers, desc="esc50", mono_sources=True)
    rows = []
    for entry, (_, dst, _) in zip(entries, jobs):
        if dst not in durations:
            continue
        rows.append({
            "clip_id": f"esc50-{dst.stem}", "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": "", "speaker": f"freesound-{entry['src_file']}",
            "source": SOURCE, "split": assign_split(f"esc50-{entry['src_file']}"),
            "labels": entry["category"], "fold": int(entry["fold"]),
        })
    return finish_build(SOURCE, out_dir, rows, None, skipped)
