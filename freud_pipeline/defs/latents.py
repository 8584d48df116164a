"""SAE latents of stored activations (the original's `tiny_topk_sae` style collection configs)."""

import dagster as dg

from freud_pipeline.activations import ActivationReader
from freud_pipeline.activations.latents import collect_sae_latents
from freud_pipeline.defs.resources import FreudStorage


class SaeLatentsConfig(dg.Config):
    dataset: str = "default_corpus"  # activations/<model>/<dataset>/<split> must exist (collect it first)
    split: str = "test"
    checkpoint: str = ""  # an SAE checkpoint directory, or an original FREUD .pth; empty: the trained topk_sae
    dtype: str = "float16"


@dg.asset(group_name="sae", kinds={"arrow"}, deps=["activations"], pool="model",
          description="SAE latents of one split's activations as shards (TopK: k values + int32 indices).")
def sae_latents(context: dg.AssetExecutionContext, config: SaeLatentsConfig, storage: FreudStorage,
                topk_sae: dict) -> dict:
    from freud_pipeline.sae.checkpoint import load_checkpoint, load_original_freud_checkpoint

    if config.checkpoint.endswith(".pth"):
        sae = load_original_freud_checkpoint(config.checkpoint)
        run_id, hook = f"file:{config.checkpoint}", sae.metadata.get("hook_name", topk_sae["hook"])
        model = sae.metadata.get("model_name", topk_sae["model"])
    else:
        # The trained run's weights are checked against the digest topk_sae recorded.
        sae = load_checkpoint(config.checkpoint or topk_sae["checkpoint_dir"],
                              sha256=None if config.checkpoint else topk_sae.get("sha256"))
        run_id = topk_sae["run_id"] if not config.checkpoint else f"dir:{config.checkpoint}"
        hook, model = sae.metadata.get("hook_name", topk_sae["hook"]), sae.metadata.get("model_name", topk_sae["model"])
    source = ActivationReader(storage.root / "activations" / model.replace("/", "_") / config.dataset / config.split)
    out = storage.path("latents", run_id.replace("/", "_").replace(":", "_")[:80], config.dataset, config.split)
    result = collect_sae_latents(source, sae, out, hook=hook, sae_run_id=run_id, dtype=config.dtype)
    context.add_output_metadata({"n_clips": result["n_clips"], "n_frames": result["n_frames"],
                                 "mb": round(result["bytes"] / 1e6, 2), "sparse_k": result["spec"]["sparse_k"],
                                 "directory": dg.MetadataValue.path(str(out))})
    return {"directory": str(out), "run_id": run_id, "hook": f"{hook}/latents"}
