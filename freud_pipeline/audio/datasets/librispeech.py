"""LibriSpeech (OpenSLR resource 12): read English audiobooks, 16 kHz FLAC with transcripts.

Layout after extraction: <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac and
<speaker>-<chapter>.trans.txt ("<utt id> TRANSCRIPT" per line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from freud_pipeline.audio.datasets._common import align_with_cache, convert_all, flac_info
from freud_pipeline.audio.datasets._download import download, extract
from freud_pipeline.audio.datasets.manifest import DatasetBuild, finish_build, relative_path, resolve_data_root
from freud_pipeline.audio.decode import SAMPLE_RATE
from freud_pipeline.audio.text import normalise_transcript
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

SOURCE = "librispeech"
BASE_URL = "https://www.openslr.org/resources/12/"
# sha256 of the OpenSLR archives (the values torchaudio's LIBRISPEECH dataset verifies against).
SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}
SPLITS = tuple(SHA256)


def _check_splits(splits) -> list[str]:
    if unknown := [s for s in splits if s not in SHA256]:
        raise ValueError(f"unknown LibriSpeech split(s) {unknown}; choose from {list(SPLITS)}")
    return list(splits)


def download_librispeech(splits=("dev-clean",), dest: Path | None = None) -> Path:
    """Download and extract LibriSpeech splits; returns the root that holds LibriSpeech/<split>/."""
    dest = Path(dest) if dest is not None else resolve_data_root(None) / "corpora" / "librispeech"
    for split in _check_splits(splits):
        if (dest / "LibriSpeech" / split).is_dir():
            continue
        archive = download(
            f"{BASE_URL}{split}.tar.gz", dest / f"{split}.tar.gz", sha256=SHA256[split],
            manual_hint=f"from https://www.openslr.org/12, or extract it so that {dest}/LibriSpeech/{split}/ exists",
        )
        extract(archive, dest)
    return dest


def split_name(librispeech_split: str) -> str:
    """Keep LibriSpeech's own partition: train-* -> train, dev-* -> dev, test-* -> test."""
    return librispeech_split.split("-")[0]


def build_librispeech(
    out_dir: Path,
    split: str | Sequence[str] = "test-other",
    *,
    root: Path | None = None,
    download: bool = True,
    limit: int | None = None,
    align: bool = False,
    data_root: Path | None = None,
    workers: int | None = None,
) -> DatasetBuild:
    """Manifest for one or more LibriSpeech splits found under root/LibriSpeech (downloaded there if missing).

    `root` defaults to <data_root>/corpora/librispeech. Files inside the data root that are already 16 kHz mono
    FLAC are used in place; others are converted to 16 kHz WAV under out_dir/audio. `limit` keeps the first N
    utterances (in id order) of each split.
    """
    out_dir, data_root = Path(out_dir).resolve(), resolve_data_root(data_root)
    splits = _check_splits([split] if isinstance(split, str) else split)
    root = Path(root) if root is not None else data_root / "corpora" / "librispeech"
    corpus = root / "LibriSpeech"
    missing = [s for s in splits if not (corpus / s).is_dir()]
    if missing and download:
        download_librispeech(missing, root)
    elif missing:
        raise DatasetUnavailableError(
            f"LibriSpeech {missing} not found under {corpus}; extract the archives from https://www.openslr.org/12 "
            f"into {root}, or pass download=True."
        )
    rows, skipped, convert_jobs = [], [], []
    for split in splits:
        utterances = []
        for trans in sorted((corpus / split).glob("*/*/*.trans.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    utt_id, _, text = line.partition(" ")
                    utterances.append((utt_id, trans.parent / f"{utt_id}.flac", text))
        for utt_id, flac, text in sorted(utterances)[:limit]:
            info = flac_info(flac) if flac.exists() else None
            if info is None:
                skipped.append((str(flac), "missing or not a FLAC file"))
                continue
            rate, channels, duration = info
            in_place = rate == SAMPLE_RATE and channels == 1 and flac.resolve().is_relative_to(data_root)
            path = flac if in_place else out_dir / "audio" / split / f"{utt_id}.wav"
            if not in_place:
                convert_jobs.append((flac, path, None))
            rows.append({
                "clip_id": f"libri-{utt_id}", "path": path, "duration_s": duration, "sample_rate": SAMPLE_RATE,
                "transcript": normalise_transcript(text), "speaker": utt_id.split("-")[0], "source": SOURCE,
                "split": split_name(split),
            })
    durations, failed = convert_all(convert_jobs, workers, desc="librispeech")
    skipped += failed
    converted = {dst for _, dst, _ in convert_jobs}
    rows = [r for r in rows if r["path"] in durations or r["path"] not in converted]
    for row in rows:
        row["duration_s"] = durations.get(row["path"], row["duration_s"])
        row["path"] = relative_path(row["path"], data_root)

    alignment_rows, unaligned = None, []
    if align:
        jobs = [(r["clip_id"], data_root / r["path"], r["transcript"]) for r in rows]
        alignment_rows, unaligned = align_with_cache(jobs, out_dir, workers)
    return finish_build(SOURCE, out_dir, rows, alignment_rows, skipped, unaligned)
