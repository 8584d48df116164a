"""The sparse autoencoder asset and its quality check.

`topk_sae` trains on the train split's shards, evaluates on held-out data and tracks everything in MLflow:
- frame metrics on the dev split (`evaluate_sae`, inside `train_sae`): FVU, explained variance, L0, dead and
  dense fractions;
- splice fidelity on a handful of held-out dev/test clips of the default corpus (`splice_eval`): decoder
  cross-entropy with the original / spliced / zero- / mean-ablated activation, CE recovered, WER;
- the run gets the metrics, a quality report artifact and tags (Dagster run, asset, model, hook, dataset version);
  its checkpoint becomes a new version of the registered model `freud-sae.<model>.<hook>.<architecture>`,
  and the alias `champion` moves to it only if it passes the quality check and beats the champion on CE
  recovered (freud_pipeline.sae.registry.promote_if_better).

`sae_quality` is the blocking asset check: it applies the same thresholds (`registry.check_thresholds`) to the same
metrics, so the alias moves exactly when the check passes; a failing check stops downstream assets (the SAE
feature index) from being built on a poor SAE.
"""


import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from freud_pipeline.activations import ActivationReader
from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.sae.config import TrainConfig
from freud_pipeline.sae.registry import (
    QualityThresholds,
    champion_version,
    check_thresholds,
    promote_if_better,
    register_checkpoint,
    registered_model_name,
)

EXPERIMENT = "freud-sae"
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
MAX_SPLICE_SECONDS = 30.0  # splice_eval runs one Whisper window per clip


class SaeAssetConfig(dg.Config):
    """The SAE asset's config: TrainConfig's fields (see freud_pipeline/sae/config.py; the defaults here are the
    demo pipeline's), where the activations come from, the held-out evaluation and the quality thresholds."""

    # --- training (TrainConfig) ---
    architecture: str = "topk"  # topk | l1 | batchtopk
    hook: str = "encoder.blocks.2"
    expansion_factor: int = 8
    n_latents: int | None = None  # overrides expansion_factor
    k: int = 32  # topk, batchtopk
    k_aux: int | None = None  # None: d_in // 2
    auxk_alpha: float = 1 / 32
    dead_after_frames: int = 200_000
    l1_alpha: float = 10.0  # l1
    recon_alpha: float = 1e4  # l1
    threshold_decay: float = 0.99  # batchtopk
    normalize_inputs: bool = True
    scale_batches: int = 4
    lr: float = 1e-3
    optimiser: str = "adam"  # adam | radam
    optimiser_eps: float = 1e-8  # the original FREUD L1 recipe: 1e-5
    schedule: str = "cosine"  # cosine | linear-warmup
    warmup_steps: int = 20  # capped at steps // 2
    steps: int = 600
    batch_size: int = 1024  # frames
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0  # 0: only the final evaluation
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # CUDA only

    # --- where the frames come from ---
    dataset: str = ""  # empty: the `activations` asset (default corpus); else activations/<model>/<dataset>/<split>
    model: str = ""  # Whisper model of `dataset`'s activations (empty: the `activations` asset's model)
    train_split: str = "train"
    eval_split: str = "dev"

    # --- held-out splice evaluation on the default corpus ---
    splice_clips: int = 8  # 0: skip (then min_ce_recovered must be None for the check to pass)
    splice_splits: list[str] = ["dev", "test"]
    splice_max_new_tokens: int = 96  # caps greedy decoding: a poor SAE can loop

    # --- quality check and registry ---
    max_fvu: float | None = 0.5
    max_dead_pct: float | None = 50.0
    max_dense_pct: float | None = None
    min_ce_recovered: float | None = 0.5
    register_model: bool = True  # register the checkpoint as a new model version (and promote it if it is better)


TRAIN_FIELDS = tuple(name for name in TrainConfig.model_fields if name != "model_name")


def train_config(config: SaeAssetConfig, model: str) -> TrainConfig:
    """The TrainConfig an asset config asks for (validated: a bad architecture, optimiser... fails here)."""
    fields = {name: getattr(config, name) for name in TRAIN_FIELDS}
    fields["warmup_steps"] = min(config.warmup_steps, config.steps // 2)
    return TrainConfig(**fields, model_name=model)


def quality_thresholds(config: SaeAssetConfig) -> QualityThresholds:
    return QualityThresholds(max_fvu=config.max_fvu, max_dead_pct=config.max_dead_pct,
                             max_dense_pct=config.max_dense_pct, min_ce_recovered=config.min_ce_recovered)


def ensure_experiment(storage: FreudStorage, name: str = EXPERIMENT) -> str:
    """Create the experiment with artifacts under the data directory, not the current working directory."""
    mlflow.set_tracking_uri(storage.tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=(storage.path("mlartifacts") / name).as_uri())


def mlflow_url() -> str:
    return (os.environ.get("FREUD_MLFLOW_URL") or DEFAULT_MLFLOW_URL).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{mlflow_url()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(name: str, version: str) -> str:
    return f"{mlflow_url()}/#/models/{quote(name)}/versions/{version}"


def held_out_clips(manifest: pd.DataFrame, n: int, splits=("dev", "test")) -> pd.DataFrame:
    """`n` clips of the given splits for splice evaluation, deterministically: those with a transcript and at most
    30 s, longest first (every clip costs one full 30 s encoder window, so long ones give the most tokens per
    second of compute), taking the sources in turn so that no single source fills the sample."""
    from freud_pipeline.sae.splice import normalize_text

    rows = manifest[manifest["split"].isin(list(splits)) & (manifest["duration_s"] <= MAX_SPLICE_SECONDS)]
    rows = rows[rows["transcript"].fillna("").map(normalize_text).str.len() > 0]
    rows = rows.sort_values(["duration_s", "clip_id"], ascending=[False, True])
    rows = rows.assign(_rank=rows.groupby("source").cumcount()).sort_values(["_rank", "source"], kind="stable")
    return rows.head(n).drop(columns="_rank")


def splice_metrics(config: SaeAssetConfig, storage: FreudStorage, sae, model_name: str, manifest_path: str,
                   device: str) -> dict:
    """splice_eval on held-out default-corpus clips; {} when disabled or when there are no such clips."""
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.sae.splice import splice_eval
    from freud_pipeline.whisper.models import load_model

    if config.splice_clips <= 0:
        return {}
    chosen = held_out_clips(load_manifest(manifest_path), config.splice_clips, config.splice_splits)
    if chosen.empty:
        return {}
    clips = [(load_audio(storage.root / path), text) for path, text in zip(chosen["path"], chosen["transcript"])]
    model = load_model(model_name, device=device)
    sae = sae.to(next(model.parameters()).device)
    result = splice_eval(model, sae, config.hook, clips, max_new_tokens=config.splice_max_new_tokens)
    for row, clip_id in zip(result["transcripts"], chosen["clip_id"]):
        row["clip_id"] = clip_id
    return result


def headline_metrics(train_metrics: dict, splice: dict) -> dict[str, float]:
    """The metrics the quality check, the registry and the asset metadata use (percentages for dead/dense)."""
    metrics = {
        "fvu": train_metrics.get("eval/fvu"),
        "explained_variance": train_metrics.get("eval/explained_variance"),
        "l0": train_metrics.get("eval/l0"),
        "dead_pct": 100 * train_metrics["eval/dead_fraction"] if "eval/dead_fraction" in train_metrics else None,
        "dense_pct": 100 * train_metrics["eval/dense_fraction"] if "eval/dense_fraction" in train_metrics else None,
        "eval_frames": train_metrics.get("eval/n_frames"),
    }
    for key in ("ce_original", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_vs_mean",
                "wer_original", "wer_spliced", "n_clips", "n_tokens"):
        if key in splice:
            metrics[key if key not in ("n_clips", "n_tokens") else f"splice_{key}"] = splice[key]
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(float(v))]
    if items:
        client.log_batch(run_id, metrics=items)


def _frames_dirs(config: SaeAssetConfig, storage: FreudStorage, activations: dict) -> tuple[str, dict[str, Path]]:
    if not config.dataset:
        dirs = split_dirs(activations)
        missing = [s for s in (config.train_split, config.eval_split) if s not in dirs]
        if missing:
            raise dg.Failure(f"the activations asset has no {', '.join(missing)} partition(s); it has "
                             f"{', '.join(sorted(dirs))}")
        model = activations[config.train_split]["model"]
        if config.model and config.model != model:
            raise dg.Failure(f"model {config.model!r} was asked for, but the activations asset holds {model!r} "
                             f"activations; name the `dataset` collected with {config.model!r}, or leave `model` empty")
        return model, {"train": Path(dirs[config.train_split]), "eval": Path(dirs[config.eval_split])}
    if not config.model:
        raise dg.Failure(f"dataset {config.dataset!r} needs `model` (the Whisper model its activations came from)")
    base = storage.root / "activations" / config.model.replace("/", "_") / config.dataset
    return config.model, {"train": base / config.train_split, "eval": base / config.eval_split}


@dg.asset(group_name="sae", kinds={"pytorch", "mlflow"}, pool="model",
          description="A sparse autoencoder on the residual stream, evaluated on held-out frames and clips; its run "
                      "and checkpoint in MLflow, registered as freud-sae.<model>.<hook>.<architecture>.")
def topk_sae(
    context: dg.AssetExecutionContext, config: SaeAssetConfig, storage: FreudStorage, activations: dict,
    default_corpus: dict,
) -> dict:
    from freud_pipeline.sae.train import train_sae

    model, dirs = _frames_dirs(config, storage, activations)
    cfg = train_config(config, model)  # validates before anything is read or created
    thresholds = quality_thresholds(config)
    experiment_id = ensure_experiment(storage)
    train, dev = ActivationReader(dirs["train"]), ActivationReader(dirs["eval"])
    dataset = config.dataset or "default_corpus"
    dataset_version = train.manifest.get("input_fingerprint", "")
    out_dir = storage.path("sae", f"{model}-{config.hook}-{config.architecture}")
    result = train_sae(
        train, cfg, out_dir=out_dir, mlflow_tracking_uri=storage.tracking_uri, experiment=EXPERIMENT,
        eval_source=dev,
        tags={
            "dagster_run_id": context.run_id,
            "dagster_asset_key": context.asset_key.to_user_string(),
            "whisper_model": model,
            "hook": config.hook,
            "dataset": dataset,
            "dataset_version": dataset_version,
            "eval_dataset_version": dev.manifest.get("input_fingerprint", ""),
            "train_split": config.train_split,
            "eval_split": config.eval_split,
        },
    )
    context.log.info(f"trained {config.architecture} on {model} {config.hook}: run {result.run_id}, "
                     f"eval FVU {result.metrics.get('eval/fvu', float('nan')):.4f}")

    splice = splice_metrics(config, storage, result.sae, model, default_corpus["manifest_path"],
                            str(result.sae.device))
    headline = headline_metrics(result.metrics, splice)
    failures = check_thresholds(headline, thresholds)
    client = MlflowClient(storage.tracking_uri)
    _log_metrics(client, result.run_id, {f"splice/{k}": v for k, v in splice.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, cfg.steps)

    registry: dict = {}
    if config.register_model:
        name = registered_model_name(model, config.hook, config.architecture)
        version = register_checkpoint(client, name, result.run_id, tags={
            "dagster_run_id": context.run_id, "dataset": dataset, "dataset_version": dataset_version,
            "checkpoint_dir": str(result.checkpoint_dir)})
        # The same rule as the sae_quality check (check_thresholds on these metrics) decides, so the alias moves
        # only for a version whose check passes.
        promoted, reason = promote_if_better(client, name, version, headline, thresholds)
        champion = champion_version(client, name)
        registry = {"name": name, "version": version, "promoted": promoted, "reason": reason,
                    "champion_version": str(champion.version) if champion is not None else None}
        context.log.info(f"{name} version {version}: {'promoted to champion' if promoted else 'not promoted'} "
                         f"({reason})")

    quality = {"metrics": headline, "thresholds": thresholds.model_dump(), "failures": failures,
               "passed": not failures}
    report = {
        "run_id": result.run_id, "dagster_run_id": context.run_id, "model": model, "hook": config.hook,
        "architecture": config.architecture, "dataset": dataset, "dataset_version": dataset_version,
        "frames": {k.removeprefix("eval/"): v for k, v in result.metrics.items() if k.startswith("eval/")},
        "splice": splice, "quality": quality, "registry": registry,
    }
    report_path = Path(result.checkpoint_dir) / "quality_report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    client.log_artifact(result.run_id, str(report_path), "eval")
    client.set_tag(result.run_id, "quality_check", "passed" if not failures else "failed")
    if registry:
        client.set_tag(result.run_id, "registered_model", registry["name"])
        client.set_tag(result.run_id, "registered_version", registry["version"])
        client.set_tag(result.run_id, "promoted_to_champion", str(registry["promoted"]).lower())

    metadata = {
        "mlflow_run_id": result.run_id,
        "mlflow_run": dg.MetadataValue.url(run_url(experiment_id, result.run_id)),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir)),
        "quality_check": "passed" if not failures else "failed: " + "; ".join(failures),
        **{k: v for k, v in headline.items()},
        "frames_per_s": float(result.frames_per_second),
        "dataset_version": dataset_version,
    }
    if registry:
        metadata |= {
            "registered_model": registry["name"],
            "model_version": int(registry["version"]),
            "model_version_url": dg.MetadataValue.url(model_version_url(registry["name"], registry["version"])),
            "promoted_to_champion": registry["promoted"],
            "promotion": registry["reason"],
        }
    if splice.get("transcripts"):
        table = pd.DataFrame(splice["transcripts"])[["clip_id", "reference", "original", "spliced"]]
        metadata["splice_transcripts"] = dg.MetadataValue.md(table.to_markdown(index=False))
    context.add_output_metadata(metadata)
    return {
        "checkpoint_dir": str(result.checkpoint_dir), "run_id": result.run_id, "hook": config.hook,
        "model": model, "architecture": config.architecture,
        "metrics": {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "quality": quality, "registry": registry, "experiment_id": experiment_id,
    }


@dg.asset_check(asset=topk_sae, name="sae_quality", blocking=True,
                description="Held-out quality of the trained SAE against its configured thresholds (FVU, dead %, "
                            "dense %, CE recovered). Blocking: downstream assets are not built on a failing SAE, "
                            "and only a passing SAE can become the registered model's champion.")
def sae_quality(topk_sae: dict) -> dg.AssetCheckResult:
    quality = topk_sae.get("quality") or {}
    thresholds = QualityThresholds(**quality.get("thresholds", {}))
    metrics = quality.get("metrics", {})
    failures = check_thresholds(metrics, thresholds)
    registry = topk_sae.get("registry") or {}
    metadata = {
        **{k: float(v) for k, v in metrics.items()},
        **{f"threshold/{metric}_{kind}": limit for metric, kind, limit in thresholds.limits()},
        "failures": dg.MetadataValue.json(failures),
        "mlflow_run_id": topk_sae.get("run_id", ""),
    }
    if registry:
        metadata |= {"registered_model": registry["name"], "model_version": int(registry["version"]),
                     "promoted_to_champion": bool(registry["promoted"]), "promotion": registry["reason"]}
    if topk_sae.get("experiment_id"):
        metadata["mlflow_run"] = dg.MetadataValue.url(run_url(topk_sae["experiment_id"], topk_sae["run_id"]))
    return dg.AssetCheckResult(passed=not failures, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata,
                               description="; ".join(failures) or "all thresholds met")


SAE_CHECKS = [sae_quality]
