"""Activation shards of the default corpus: one partition (and one shard directory) per split."""


import dagster as dg

from freud_pipeline.activations.collect import collect_activations
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.defs.resources import FreudStorage

SPLITS = ("train", "dev", "test")
split_partitions = dg.StaticPartitionsDefinition(list(SPLITS))


class ActivationsConfig(dg.Config):
    model: str = "tiny.en"
    hooks: list[str] = ["encoder.blocks.2", "encoder.blocks.2.mlp.1"]
    dtype: str = "float16"
    window_mode: str = "padded"  # faithful: each clip in its own padded 30 s window, as Whisper runs it
    batch_size: int = 8
    device: str = "auto"
    collect_max: int | None = None  # first N clips of the split only


@dg.asset(group_name="activations", kinds={"arrow", "pytorch"}, pool="model", partitions_def=split_partitions,
          description="Whisper encoder activations (real frames only) of one split as Arrow IPC shards.")
def activations(
    context: dg.AssetExecutionContext, config: ActivationsConfig, storage: FreudStorage, default_corpus: dict
) -> dict:
    split = context.partition_key
    manifest = load_manifest(default_corpus["manifest_path"])
    rows = manifest[manifest["split"] == split]
    directory = storage.path("activations", config.model, "default_corpus", split)
    result = collect_activations(
        rows, directory, model=config.model, hooks=config.hooks, dtype=config.dtype,
        window_mode=config.window_mode, batch_size=config.batch_size, device=config.device,
        collect_max=config.collect_max, data_root=storage.root,
        on_progress=lambda done, total, speed: (done % 25 == 0 or done == total)
        and context.log.info(f"{split}: {done}/{total} clips, {speed:.1f} audio-s/s"),
    )
    context.add_output_metadata({
        "n_clips": result["n_clips"],
        "n_frames": result["n_frames"],
        "mb": round(result["bytes"] / 1e6, 2),
        "audio_seconds_per_s": result.get("audio_seconds_per_s", 0.0),
        "reused": result.get("reused", False),
        "skipped": dg.MetadataValue.json(result.get("skipped", [])[:100]),
        "model": config.model,
        "hooks": dg.MetadataValue.json(list(config.hooks)),
        "dtype": config.dtype,
        "window_mode": config.window_mode,
        "directory": dg.MetadataValue.path(str(directory)),
    })
    return {"split": split, "directory": str(directory), "model": config.model, "hooks": list(config.hooks)}


def split_dirs(activations: dict) -> dict[str, str]:
    """{split: shard directory} from the per-partition outputs a downstream asset receives."""
    return {split: value["directory"] for split, value in activations.items()}
