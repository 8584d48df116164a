"""The sparse autoencoder asset: trained on the train split's shards, evaluated on dev, logged to MLflow."""


from pathlib import Path

import dagster as dg
import mlflow

from freud_pipeline.activations import ActivationReader
from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.sae.train import TrainConfig, train_sae

EXPERIMENT = "freud-sae"


class SaeAssetConfig(dg.Config):
    architecture: str = "topk"
    hook: str = "encoder.blocks.2"
    expansion_factor: int = 8
    k: int = 32
    lr: float = 1e-3
    steps: int = 600
    batch_size: int = 1024  # frames
    warmup_steps: int = 20
    dead_after_frames: int = 200_000
    seed: int = 0
    device: str = "auto"


def ensure_experiment(storage: FreudStorage, name: str = EXPERIMENT) -> str:
    """Create the experiment with artifacts under the data directory, not the current working directory."""
    mlflow.set_tracking_uri(storage.tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=(storage.path("mlartifacts") / name).as_uri())


@dg.asset(group_name="sae", kinds={"pytorch", "mlflow"}, pool="model",
          description="A sparse autoencoder on the residual stream, its run and checkpoint in MLflow.")
def topk_sae(
    context: dg.AssetExecutionContext, config: SaeAssetConfig, storage: FreudStorage, activations: dict
) -> dict:
    ensure_experiment(storage)
    dirs = split_dirs(activations)
    model = activations["train"]["model"]
    train, dev = ActivationReader(dirs["train"]), ActivationReader(dirs["dev"])
    cfg = TrainConfig(
        architecture=config.architecture, hook=config.hook, expansion_factor=config.expansion_factor, k=config.k,
        lr=config.lr, steps=config.steps, batch_size=config.batch_size, seed=config.seed, device=config.device,
        warmup_steps=min(config.warmup_steps, config.steps // 2), dead_after_frames=config.dead_after_frames,
        model_name=model, eval_every=0,
    )
    out_dir = storage.path("sae", f"{model}-{config.hook}-{config.architecture}")
    result = train_sae(
        train, cfg, out_dir=out_dir, mlflow_tracking_uri=storage.tracking_uri, experiment=EXPERIMENT,
        eval_source=dev,
        tags={
            "dagster_run_id": context.run_id,
            "dagster_asset_key": context.asset_key.to_user_string(),
            "whisper_model": model,
            "hook": config.hook,
            "dataset_version": train.manifest.get("input_fingerprint", ""),
        },
    )
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    context.add_output_metadata({
        "mlflow_run_id": result.run_id,
        "mlflow_run": dg.MetadataValue.url(f"http://127.0.0.1:5000/#/experiments/"
                                           f"{mlflow.get_experiment_by_name(EXPERIMENT).experiment_id}/runs/{result.run_id}"),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir)),
        **{f"metric/{k}": v for k, v in metrics.items()},
    })
    return {
        "checkpoint_dir": str(result.checkpoint_dir), "run_id": result.run_id, "hook": config.hook,
        "model": model, "architecture": config.architecture, "metrics": metrics,
    }
