"""Activation shard assets, one per dataset, partitioned by split: each partition is one shard directory."""

import dagster as dg

from freud_pipeline.activations.collect import collect_activations
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.defs.executors import GPU_STEP_TAGS
from freud_pipeline.defs.partitions import audioset_partitions, librispeech_partitions, split_partitions
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.devices import resolve_device
from freud_pipeline.diskspace import require_free_space


class ActivationsConfig(dg.Config):
    model: str = "tiny.en"
    hooks: list[str] = ["encoder.blocks.2", "encoder.blocks.2.mlp.1"]
    dtype: str = "float16"
    window_mode: str = "padded"  # faithful: each clip in its own padded 30 s window, as Whisper runs it
    # Windows per encoder pass; 0: 2 on CPU (the fastest per clip there: tiny.en, 2 cores, ~220 ms a window at 1-2
    # against ~295 ms at 8), 16 on CUDA.
    batch_size: int = 0
    device: str = "auto"
    collect_max: int | None = None  # first N clips of the partition only (the original's collect_max)
    frames_per_shard: int = 20_000  # a shard is written (and survives a crash) every this many frames


def default_batch_size(device: str) -> int:
    return 16 if resolve_device(device).type == "cuda" else 2


def collect_partition(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: FreudStorage,
                      dataset: str, manifest_path: str, split_column_filter: bool) -> dict:
    """Collect one partition. `split_column_filter`: the dataset is unpartitioned, keep rows of this split."""
    partition = context.partition_key
    manifest = load_manifest(manifest_path)
    rows = manifest[manifest["split"] == partition] if split_column_filter else manifest
    directory = storage.path("activations", config.model.replace("/", "_"), dataset, partition)
    require_free_space(directory, what=f"collecting activations of {dataset}/{partition}")  # clear error, not ENOSPC
    result = collect_activations(
        rows, directory, model=config.model, hooks=config.hooks, dtype=config.dtype,
        window_mode=config.window_mode, batch_size=config.batch_size or default_batch_size(config.device),
        device=config.device,
        collect_max=config.collect_max, data_root=storage.root, frames_per_shard=config.frames_per_shard,
        on_progress=lambda done, total, speed: (done % 25 == 0 or done == total)
        and context.log.info(f"{dataset}/{partition}: {done}/{total} clips, {speed:.1f} audio-s/s"),
    )
    context.add_output_metadata({
        "n_clips": result["n_clips"],
        "n_frames": result["n_frames"],
        "mb": round(result["bytes"] / 1e6, 2),
        "audio_seconds_per_s": result.get("audio_seconds_per_s", 0.0),
        "reused": result.get("reused", False),
        "n_skipped": len(result.get("skipped", [])),
        "skipped": dg.MetadataValue.json(result.get("skipped", [])[:100]),
        "model": config.model,
        "hooks": dg.MetadataValue.json(list(config.hooks)),
        "dtype": config.dtype,
        "window_mode": config.window_mode,
        **({"fidelity_vs_padded": dg.MetadataValue.json(result["fidelity_vs_padded"])}
           if result.get("fidelity_vs_padded") else {}),
        "directory": dg.MetadataValue.path(str(directory)),
    })
    return {"dataset": dataset, "split": partition, "directory": str(directory), "model": config.model,
            "hooks": list(config.hooks)}


def activations_asset(name: str, dataset: str, partitions: dg.PartitionsDefinition, same_partitions: bool):
    """An activations asset over `dataset`; `same_partitions` when the dataset asset is partitioned alike."""

    @dg.asset(name=name, group_name="activations", kinds={"arrow", "pytorch"}, pool="model", op_tags=GPU_STEP_TAGS,
              partitions_def=partitions, ins={"dataset": dg.AssetIn(dataset)},
              description=f"Whisper encoder activations (real frames only) of {dataset}, one split per partition, "
                          "as Arrow IPC shards.")
    def _asset(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: FreudStorage,
               dataset: dict) -> dict:
        return collect_partition(context, config, storage, dataset_name, dataset["manifest_path"],
                                 split_column_filter=not same_partitions)

    dataset_name = dataset

    return _asset


activations = activations_asset("activations", "default_corpus", split_partitions, same_partitions=False)
librispeech_activations = activations_asset("librispeech_activations", "librispeech", librispeech_partitions, True)
audioset_activations = activations_asset("audioset_activations", "audioset", audioset_partitions, True)
esc50_activations = activations_asset("esc50_activations", "esc50", split_partitions, False)
audio_folder_activations = activations_asset("audio_folder_activations", "audio_folder", split_partitions, False)
large_corpus_activations = activations_asset("large_corpus_activations", "large_corpus", split_partitions, False)
EXTERNAL_ACTIVATIONS = [librispeech_activations, audioset_activations, esc50_activations, audio_folder_activations,
                        large_corpus_activations]


def split_dirs(activations: dict) -> dict[str, str]:
    """{split: shard directory} from the per-partition outputs a downstream asset receives."""
    return {split: value["directory"] for split, value in activations.items()}
