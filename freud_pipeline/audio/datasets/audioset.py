"""AudioSet balanced-train and eval audio, as mirrored on Hugging Face by agkphysics (10 s YouTube clips, FLAC).

Layout after extraction: <root>/audio/bal_train/<YTID>.flac, <root>/audio/eval/<YTID>.flac, plus
<root>/balanced_train_segments.csv and <root>/eval_segments.csv (Google's format: YTID, start_seconds,
end_seconds, "label ids"), and optionally <root>/ontology.json to turn label ids into names.

Like ESC-50: transcript "", labels (names joined by "; ") in the extra column `labels`, `speaker` = the YouTube
video. eval clips form the test split; balanced-train clips are split ~8:2 into train and dev by video id.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from freud_pipeline.audio.datasets._common import AUDIO_SUFFIXES, convert_all
from freud_pipeline.audio.datasets._download import download, extract
from freud_pipeline.audio.datasets.manifest import DatasetBuild, assign_split, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.errors import DatasetUnavailableError

SOURCE = "audioset"
# The mirror's `main` branch has since moved to Parquet shards; this revision still holds the tar files.
REVISION = "c2f9c5b3e3211790680f2890608af7dc73ddc540"
BASE_URL = f"https://huggingface.co/datasets/agkphysics/AudioSet/resolve/{REVISION}/data/"
ONTOLOGY_URL = "https://raw.githubusercontent.com/audioset/ontology/master/ontology.json"
PARTS = {"bal_train": [f"bal_train{i:02d}.tar" for i in range(10)], "eval": [f"eval{i:02d}.tar" for i in range(9)]}
SEGMENT_FILES = {"bal_train": "balanced_train_segments.csv", "eval": "eval_segments.csv"}
_PART_BY_SUBSET = {"balanced_train": "bal_train", "bal_train": "bal_train", "eval": "eval"}


def download_audioset(dest: Path | None = None, parts=("bal_train", "eval"), shards: int | None = None) -> Path:
    """Download (about 50 GB for both parts) and extract; `shards` limits the tar files per part (for a sample)."""
    dest = Path(dest) if dest is not None else resolve_data_root(None) / "corpora" / "audioset"
    hint = f"from https://huggingface.co/datasets/agkphysics/AudioSet (revision {REVISION}), extracted into {dest}"
    for part in parts:
        download(BASE_URL + SEGMENT_FILES[part], dest / SEGMENT_FILES[part], manual_hint=hint)
        for name in PARTS[part][:shards]:
            extract(download(BASE_URL + name, dest / "archives" / name, manual_hint=hint), dest)
    download(ONTOLOGY_URL, dest / "ontology.json", manual_hint="from https://github.com/audioset/ontology")
    return dest


def read_segments(path: Path) -> dict[str, list[str]]:
    """YTID -> label ids, from a segments csv (lines starting with # are comments)."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader((line for line in fh if not line.startswith("#")), skipinitialspace=True):
            if len(row) >= 4:
                labels[row[0]] = row[3].split(",")
    return labels


def build_audioset(
    out_dir: Path,
    subset: str | Sequence[str] = "balanced_train",
    *,
    root: Path | None = None,
    download: bool = True,
    shards: int | None = None,
    limit: int | None = None,
    data_root: Path | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Convert AudioSet clips of `subset` ("balanced_train", "eval" or both) to 16 kHz mono WAV and write the manifest.

    `root` defaults to <data_root>/corpora/audioset; a subset whose audio folder is missing is downloaded there
    when `download` (`shards` tar files of it; all by default).
    """
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    root = Path(root) if root is not None else data_root / "corpora" / "audioset"
    parts = [_PART_BY_SUBSET.get(s, s) for s in ([subset] if isinstance(subset, str) else subset)]
    if unknown := [p for p in parts if p not in PARTS]:
        raise ValueError(f"unknown AudioSet subset(s) {unknown}; choose from {sorted(_PART_BY_SUBSET)}")
    missing = [p for p in parts if not (root / "audio" / p).is_dir()]
    if missing and download:
        download_audioset(root, parts=missing, shards=shards)
    elif missing:
        raise DatasetUnavailableError(f"No AudioSet audio in {[str(root / 'audio' / p) for p in missing]}; pass "
                                      f"download=True or extract the tar files from {BASE_URL} into {root}.")
    names = {}
    if (root / "ontology.json").exists():
        names = {entry["id"]: entry["name"] for entry in json.loads((root / "ontology.json").read_text(encoding="utf-8"))}
    clips, skipped = [], []
    for part in parts:
        audio_dir, segments_file = root / "audio" / part, SEGMENT_FILES[part]
        if not (root / segments_file).exists():
            raise DatasetUnavailableError(f"{root / segments_file} is missing; it holds the labels of {audio_dir}.")
        segments = read_segments(root / segments_file)
        for path in sorted(p for p in audio_dir.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            if path.stem not in segments:
                skipped.append((str(path), f"not listed in {segments_file}"))
            else:
                clips.append((part, path, segments[path.stem]))
    clips = clips[:limit]

    jobs = [(path, out_dir / "audio" / part / f"{path.stem}.wav", None) for part, path, _ in clips]
    durations, failed = convert_all(jobs, workers, desc="audioset")
    skipped += failed
    rows = []
    for (part, path, label_ids), (_, dst, _) in zip(clips, jobs):
        if dst not in durations:
            continue
        clip_id = f"audioset-{part}-{path.stem}"
        split = "test" if part == "eval" else "train" if assign_split(clip_id) == "train" else "dev"
        rows.append({
            "clip_id": clip_id, "path": relative_path(dst, data_root), "duration_s": durations[dst],
            "sample_rate": SAMPLE_RATE, "transcript": "", "speaker": f"youtube-{path.stem}", "source": SOURCE,
            "split": split, "labels": "; ".join(names.get(i, i) for i in label_ids),
        })
    return finish_build(SOURCE, out_dir, rows, None, skipped)
