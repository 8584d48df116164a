"""Dataset assets: each writes a manifest (and alignments where it can) and returns their locations."""


import dagster as dg

from freud_pipeline.audio import datasets
from freud_pipeline.defs.partitions import audioset_partitions, librispeech_partitions
from freud_pipeline.defs.resources import FreudStorage

GROUP = "datasets"


def dataset_output(context: dg.AssetExecutionContext, build: datasets.DatasetBuild, **extra) -> dict:
    """What a dataset asset returns (where its manifest and alignments are), after recording the build's metadata
    (sizes, splits, skipped files, a manifest preview; plus `extra`) on the asset."""
    context.add_output_metadata({**_metadata(build), **extra})
    return {
        "manifest_path": str(build.manifest_path),
        "alignments_path": str(build.alignments_path) if build.alignments_path else None,
    }


def _metadata(build: datasets.DatasetBuild) -> dict:
    manifest = datasets.load_manifest(build.manifest_path)
    return {
        "n_clips": build.n_clips,
        "total_minutes": round(build.total_seconds / 60, 2),
        "splits": dg.MetadataValue.json(manifest["split"].value_counts().to_dict()),
        "skipped": dg.MetadataValue.json([{"file": str(f), "reason": r} for f, r in build.skipped][:200]),
        "n_skipped": len(build.skipped),
        "manifest": dg.MetadataValue.path(str(build.manifest_path)),
        "preview": dg.MetadataValue.md(manifest.head(10).to_markdown(index=False) if len(manifest) else "(empty)"),
    }


class AsteriskConfig(dg.Config):
    limit: int | None = None  # first N speech prompts only (None = all 551)
    align: bool = True  # forced alignment with pocketsphinx


@dg.asset(group_name=GROUP, kinds={"parquet"}, description="Real recorded prompts (Debian asterisk-core-sounds), "
          "speech only, normalised transcripts, forced word/phone alignments.")
def asterisk_prompts(context: dg.AssetExecutionContext, config: AsteriskConfig, storage: FreudStorage) -> dict:
    build = datasets.build_asterisk_prompts(
        storage.path("datasets", "asterisk_prompts"), limit=config.limit, align=config.align, data_root=storage.root
    )
    return dataset_output(context, build)


class FestivalConfig(dg.Config):
    n_sentences: int = 60
    seed: int = 0


@dg.asset(group_name=GROUP, kinds={"parquet"}, description="Synthetic English speech from Festival with exact "
          "phone and word timings.")
def festival_speech(context: dg.AssetExecutionContext, config: FestivalConfig, storage: FreudStorage) -> dict:
    build = datasets.build_festival_speech(
        storage.path("datasets", "festival_speech"), n_sentences=config.n_sentences, seed=config.seed,
        data_root=storage.root,
    )
    return dataset_output(context, build)


@dg.asset(group_name=GROUP, kinds={"parquet"}, description="The embedded default corpus: Asterisk prompts + "
          "Festival speech, split deterministically into train/dev/test.")
def default_corpus(
    context: dg.AssetExecutionContext, storage: FreudStorage, asterisk_prompts: dict, festival_speech: dict
) -> dict:
    build = datasets.combine(
        [datasets.DatasetBuild.from_paths(**asterisk_prompts), datasets.DatasetBuild.from_paths(**festival_speech)],
        storage.path("datasets", "default_corpus"), name="default_corpus",
    )
    return dataset_output(context, build)


# --- Corpora downloaded from the internet: not part of the default job (they fail fast offline). ---


class DownloadConfig(dg.Config):
    download: bool = True  # False: only index a tree already extracted under data/corpora/<name>
    limit: int | None = None  # first N clips only


@dg.asset(group_name="external_datasets", kinds={"parquet"}, partitions_def=librispeech_partitions,
          description="LibriSpeech (openslr 12): one partition per standard split; downloaded, resumable, verified.")
def librispeech(context: dg.AssetExecutionContext, config: DownloadConfig, storage: FreudStorage) -> dict:
    split = context.partition_key
    build = datasets.build_librispeech(
        storage.path("datasets", "librispeech", split), split=split, download=config.download, limit=config.limit,
        data_root=storage.root,
    )
    return dataset_output(context, build)


@dg.asset(group_name="external_datasets", kinds={"parquet"}, description="ESC-50 environmental sounds.")
def esc50(context: dg.AssetExecutionContext, config: DownloadConfig, storage: FreudStorage) -> dict:
    build = datasets.build_esc50(storage.path("datasets", "esc50"), download=config.download, limit=config.limit,
                                 data_root=storage.root)
    return dataset_output(context, build)


@dg.asset(group_name="external_datasets", kinds={"parquet"}, partitions_def=audioset_partitions,
          description="AudioSet balanced train or eval (a partition each), as the original used.")
def audioset(context: dg.AssetExecutionContext, config: DownloadConfig, storage: FreudStorage) -> dict:
    subset = context.partition_key
    build = datasets.build_audioset(
        storage.path("datasets", "audioset", subset), subset=subset, download=config.download, limit=config.limit,
        data_root=storage.root,
    )
    return dataset_output(context, build)


class AudioFolderConfig(dg.Config):
    folder: str  # any local folder; transcripts from sidecar .txt files


@dg.asset(group_name="external_datasets", kinds={"parquet"}, description="Any local folder of audio files.")
def audio_folder(context: dg.AssetExecutionContext, config: AudioFolderConfig, storage: FreudStorage) -> dict:
    build = datasets.build_audio_folder(config.folder, storage.path("datasets", "audio_folder"), data_root=storage.root)
    return dataset_output(context, build)


# --- The large corpus: more voices, speakers and languages; built on request (`freud collect --config
# configs/datasets/large_corpus.yaml` or large_corpus_job), never by `make demo`. ---

LARGE_GROUP = "large_corpus"


class FestivalVoicesConfig(dg.Config):
    voices: list[str] = list(datasets.festival_voices.VOICES)  # every English Festival voice in Debian main
    clips_per_voice: int = 200  # clips of several sentences each
    clip_words: int = 45  # at least this many words per clip
    holdout_voices: list[str] = list(datasets.festival_voices.DEFAULT_HOLDOUT)  # whole voices in the test split
    seed: int = 0


@dg.asset(group_name=LARGE_GROUP, kinds={"parquet"}, description="Synthetic English speech from every English "
          "Festival voice in Debian main, reading public-domain prose (Devil's Dictionary, Jargon File), exact "
          "word/phone timings; held-out voices form the test split.")
def festival_voices(context: dg.AssetExecutionContext, config: FestivalVoicesConfig, storage: FreudStorage) -> dict:
    build = datasets.build_festival_voices(
        storage.path("datasets", "festival_voices"), voices=tuple(config.voices),
        clips_per_voice=config.clips_per_voice, clip_words=config.clip_words,
        holdout_voices=tuple(config.holdout_voices), seed=config.seed, data_root=storage.root,
    )
    return dataset_output(context, build)


class AsteriskLanguagesConfig(dg.Config):
    languages: list[str] = list(datasets.asterisk_languages.LANGUAGES)
    limit: int | None = None  # first N speech prompts of each language only


@dg.asset(group_name=LARGE_GROUP, kinds={"parquet"}, description="Real recorded prompts in French, Spanish, "
          "Italian and Russian (Debian asterisk-core-sounds-*), unaligned: for SAE training and non-English contrast.")
def asterisk_languages(context: dg.AssetExecutionContext, config: AsteriskLanguagesConfig,
                       storage: FreudStorage) -> dict:
    build = datasets.build_asterisk_languages(
        storage.path("datasets", "asterisk_languages"), languages=tuple(config.languages), limit=config.limit,
        data_root=storage.root,
    )
    return dataset_output(context, build)


@dg.asset(group_name=LARGE_GROUP, kinds={"parquet"}, description="The large corpus: English Asterisk prompts + "
          "every Festival voice + the other-language prompts, with speaker and language columns.")
def large_corpus(context: dg.AssetExecutionContext, storage: FreudStorage, asterisk_prompts: dict,
                 festival_voices: dict, asterisk_languages: dict) -> dict:
    builds = [datasets.DatasetBuild.from_paths(**d) for d in (asterisk_prompts, festival_voices, asterisk_languages)]
    build = datasets.combine_large(builds, storage.path("datasets", "large_corpus"))
    manifest = datasets.load_manifest(build.manifest_path)
    return dataset_output(context, build, n_speakers=int(manifest["speaker"].nunique()),
                          hours=round(build.total_seconds / 3600, 2),
                          speakers=dg.MetadataValue.json(manifest.groupby("speaker")["duration_s"].sum()
                                                         .div(60).round(1).to_dict()))
