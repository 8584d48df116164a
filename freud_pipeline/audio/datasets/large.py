"""The large corpus: English Asterisk prompts (real, aligned) + every English Festival voice (synthetic, exact
timings) + the Asterisk prompts in French, Spanish, Italian and Russian (real, unaligned)."""

from __future__ import annotations

from pathlib import Path

from freud_pipeline.audio.datasets.asterisk import build_asterisk_prompts
from freud_pipeline.audio.datasets.asterisk_languages import build_asterisk_languages
from freud_pipeline.audio.datasets.festival_voices import build_festival_voices
from freud_pipeline.audio.datasets.manifest import DatasetBuild, finish_build, load_alignments, load_manifest, resolve_data_root


def combine_large(builds: list[DatasetBuild], out_dir: Path, name: str = "large_corpus") -> DatasetBuild:
    """Union of the builds' manifests and alignments; a build without a `language` column is English."""
    frames = []
    for build in builds:
        frame = load_manifest(build.manifest_path)
        if "language" not in frame.columns:
            frame["language"] = "en"
        frames.append(frame)
    rows = [row for frame in frames for row in frame.to_dict("records")]
    alignments = [load_alignments(b.alignments_path).to_dict("records") for b in builds if b.alignments_path]
    return finish_build(name, Path(out_dir), rows, [r for rows_ in alignments for r in rows_],
                        [s for b in builds for s in b.skipped], [u for b in builds for u in b.unaligned])


def build_large_corpus(data_root: Path | None = None, clips_per_voice: int = 200, languages_limit: int | None = None,
                       asterisk_limit: int | None = None, workers: int | None = None) -> DatasetBuild:
    """Build the three parts under <data_root>/datasets/ and combine them into datasets/large_corpus."""
    root = resolve_data_root(data_root) / "datasets"
    builds = [
        build_asterisk_prompts(root / "asterisk_prompts", limit=asterisk_limit, data_root=data_root, workers=workers),
        build_festival_voices(root / "festival_voices", clips_per_voice=clips_per_voice, data_root=data_root,
                              workers=workers),
        build_asterisk_languages(root / "asterisk_languages", limit=languages_limit, data_root=data_root,
                                 workers=workers),
    ]
    return combine_large(builds, root / "large_corpus")
