"""Dataset builders. Each writes <out_dir>/manifest.parquet (+ alignments.parquet) and clips under
<out_dir>/audio/, with manifest paths relative to the data root, and returns a DatasetBuild."""

from __future__ import annotations

from pathlib import Path

from freud_pipeline.audio.datasets.asterisk import build_asterisk_prompts
from freud_pipeline.audio.datasets.asterisk_languages import build_asterisk_languages
from freud_pipeline.audio.datasets.audioset import build_audioset, download_audioset
from freud_pipeline.audio.datasets.esc50 import build_esc50, download_esc50
from freud_pipeline.audio.datasets.festival import build_festival_speech
from freud_pipeline.audio.datasets.festival_voices import build_festival_voices
from freud_pipeline.audio.datasets.folder import build_audio_folder
from freud_pipeline.audio.datasets.large import build_large_corpus, combine_large
from freud_pipeline.audio.datasets.librispeech import build_librispeech, download_librispeech
from freud_pipeline.audio.datasets.manifest import (
    ALIGNMENT_SCHEMA,
    MANIFEST_SCHEMA,
    DatasetBuild,
    assign_split,
    combine,
    load_alignments,
    load_manifest,
    resolve_data_root,
    write_manifest,
)


def build_default_dataset(data_root: Path | None = None, n_sentences: int = 60, seed: int = 0) -> DatasetBuild:
    """The embedded default: real Asterisk prompts + Festival speech, combined under <data_root>/datasets/default."""
    datasets = resolve_data_root(data_root) / "datasets"
    builds = [
        build_asterisk_prompts(datasets / "asterisk_prompts", data_root=data_root),
        build_festival_speech(datasets / "festival_speech", n_sentences=n_sentences, seed=seed, data_root=data_root),
    ]
    return combine(builds, datasets / "default", name="default")


__all__ = [
    "ALIGNMENT_SCHEMA", "MANIFEST_SCHEMA", "DatasetBuild", "assign_split", "build_asterisk_languages",
    "build_asterisk_prompts", "build_audio_folder", "build_festival_voices", "build_large_corpus", "combine_large",
    "build_audioset", "build_default_dataset", "build_esc50", "build_festival_speech", "build_librispeech", "combine",
    "download_audioset", "download_esc50", "download_librispeech", "load_alignments", "load_manifest", "write_manifest",
]
