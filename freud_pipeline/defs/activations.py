"""Activation shards of the default corpus, one shard directory per split."""

from __future__ import annotations

import dagster as dg

from freud_pipeline.activations.collect import collect_activations
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.defs.resources import FreudStorage

SPLITS = ("train", "dev", "test")


class ActivationsConfig(dg.Config):
    model: str = "tiny.en"
    hooks: list[str] = ["encoder.blocks.2", "encoder.blocks.2.mlp.1"]
    dtype: str = "float16"
    window_mode: str = "padded"  # faithful: each clip in its own padded 30 s window, as Whisper runs it
    batch_size: int = 8
    device: str = "auto"
    collect_max: int | None = None  # first N clips per split only


@dg.asset(group_name="activations", kinds={"arrow", "pytorch"}, pool="model",
          description="Whisper encoder activations (real frames only) of the default corpus as Arrow IPC shards.")
def activations(
    context: dg.AssetExecutionContext, config: ActivationsConfig, storage: FreudStorage, default_corpus: dict
) -> dict:
    manifest = load_manifest(default_corpus["manifest_path"])
    out: dict = {"model": config.model, "hooks": list(config.hooks), "splits": {}}
    summary = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        directory = storage.path("activations", config.model, "default_corpus", split)
        result = collect_activations(
            rows, directory, model=config.model, hooks=config.hooks, dtype=config.dtype,
            window_mode=config.window_mode, batch_size=config.batch_size, device=config.device,
            collect_max=config.collect_max, data_root=storage.root,
            on_progress=lambda done, total, speed, split=split: (done % 25 == 0 or done == total)
            and context.log.info(f"{split}: {done}/{total} clips, {speed:.1f} audio-s/s"),
        )
        out["splits"][split] = str(directory)
        summary[split] = {k: result.get(k) for k in ("n_clips", "n_frames", "bytes", "audio_seconds_per_s", "reused")}
        summary[split]["skipped"] = len(result.get("skipped", []))
    context.add_output_metadata({
        "splits": dg.MetadataValue.json(summary),
        "total_frames": sum(s["n_frames"] or 0 for s in summary.values()),
        "total_mb": round(sum(s["bytes"] or 0 for s in summary.values()) / 1e6, 2),
        "hooks": dg.MetadataValue.json(list(config.hooks)),
        "model": config.model,
        "dtype": config.dtype,
        "window_mode": config.window_mode,
    })
    return out
