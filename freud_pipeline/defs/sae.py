"""The sparse autoencoder asset and its quality check: Dagster around `freud_pipeline.sae.run.run_sae`.

`topk_sae` finds the frames and calls `run_sae`, which trains
into its own run directory `sae/<model>-<hook>-<architecture>/<run id>/`, splice-evaluates, applies the quality
gate, registers the checkpoint as a version of `freud-sae.<model>.<hook>.<architecture>`, promotes it to
`champion` only if it passes and is better, and writes its report (see that module). The frames are a
`TrainingSelection` (freud_pipeline/sae/selection.py): by default the `activations` asset's train/dev splits plus
every complete incoming batch (split by clip into training and held-out frames); with `dataset`, that dataset's
splits. The run records it (its partitions as the MLflow run's dataset, its digest as the tag
`freud.selection_digest` and in the metadata), and the output's `selection` lists the partitions, so that the
SAE's feature set can be built over the same ones.

The config is `SaeRunConfig`'s fields (TrainConfig's, the thresholds and the run's), defaulting to
`demo_config()` (what `make demo` trains), plus where the frames come from.

`sae_quality` is the blocking asset check: it applies the same thresholds (`registry.check_thresholds`) to the same
metrics, so the alias moves exactly when the check passes; a failing check stops downstream assets (the SAE
feature index, which also refuses a failed run by itself) from being built on a poor SAE.
"""


from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from freud_pipeline.defs.activations import split_dirs
from freud_pipeline.defs.executors import GPU_STEP_TAGS
from freud_pipeline.defs.resources import FreudStorage, MlflowTracking
from freud_pipeline.features.runs import model_version_url, run_url
from freud_pipeline.sae.config import demo_config
from freud_pipeline.sae.registry import QualityThresholds, check_thresholds
from freud_pipeline.sae.run import SaeRunConfig, SaeRunResult, run_sae
from freud_pipeline.sae.selection import TrainingSelection, dataset_selection, default_selection

# Where the frames come from (the rest of the asset config is SaeRunConfig's).
FRAME_FIELDS = {
    "dataset": (str, pydantic.Field("", description="empty: the `activations` asset (default corpus); else "
                                                    "activations/<model>/<dataset>/<split>")),
    "model": (str, pydantic.Field("", description="Whisper model of `dataset`'s activations (empty: the "
                                                  "`activations` asset's)")),
    "train_split": (str, "train"),
    "eval_split": (str, "dev"),
    "resume_from": (str, pydantic.Field("", description="a checkpoints/step_* directory of a killed run to continue")),
    "include_incoming": (bool, pydantic.Field(True, description="with `dataset` empty: also train on every "
                                                                "complete incoming batch (its held-out clips "
                                                                "evaluate), see freud_pipeline/sae/selection.py")),
}


def _asset_config_class() -> type[dg.Config]:
    defaults = demo_config().model_dump()
    fields = {name: (info.annotation, pydantic.Field(defaults.get(name, info.default), description=info.description))
              for name, info in SaeRunConfig.model_fields.items() if name != "model_name"}
    return pydantic.create_model("SaeAssetConfig", __base__=dg.Config, __doc__=(
        "The SAE asset's config: SaeRunConfig's fields (freud_pipeline/sae/run.py; defaults: demo_config()) and "
        "where the frames come from."), **fields, **FRAME_FIELDS)


SaeAssetConfig = _asset_config_class()


def run_config(config: SaeAssetConfig, model: str) -> SaeRunConfig:
    """The SaeRunConfig an asset config asks for (validated: a bad architecture, optimiser... fails here)."""
    return SaeRunConfig(**config.model_dump(include=set(SaeRunConfig.model_fields)), model_name=model)


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


def training_selection(config: SaeAssetConfig, storage: FreudStorage, activations: dict
                       ) -> tuple[str, TrainingSelection]:
    """(model, the partitions `config` trains on): the default selection (default corpus plus the incoming
    batches, unless `include_incoming` is off), or the named dataset's splits. The asset and the retraining
    schedule both call this, so the digest the schedule compares is the one a run would record."""
    model, dirs = _frames_dirs(config, storage, activations)
    if config.dataset:
        return model, dataset_selection(model, config.dataset, dirs, config.train_split, config.eval_split)
    return model, default_selection(storage.root, model, {config.train_split: dirs["train"],
                                                          config.eval_split: dirs["eval"]},
                                    train_split=config.train_split, eval_split=config.eval_split,
                                    include_incoming=config.include_incoming, hook=config.hook)


def splice_manifest(config: SaeAssetConfig, storage: FreudStorage, default_corpus: dict) -> str:
    """The corpus whose held-out clips the SAE is spliced into: the named dataset's when it has a manifest (an SAE
    trained on the large corpus is judged on its held-out voices and speakers), else the default corpus'."""
    own = storage.root / "datasets" / config.dataset / "manifest.parquet" if config.dataset else None
    return str(own) if own is not None and own.is_file() else default_corpus["manifest_path"]


def _tags(context: dg.AssetExecutionContext, config: SaeAssetConfig, model: str,
          selection: TrainingSelection) -> dict[str, str]:
    first = {p.use: p for p in reversed(selection.partitions)}  # the first train and eval partitions
    return {"dagster_run_id": context.run_id, "dagster_asset_key": context.asset_key.to_user_string(),
            "whisper_model": model, "hook": config.hook, "dataset": config.dataset or "default_corpus",
            "dataset_version": first["train"].input_fingerprint,
            "eval_dataset_version": first["eval"].input_fingerprint,
            "train_split": config.train_split, "eval_split": config.eval_split,
            "incoming_batches": str(sum(p.use == "split" for p in selection.partitions))}


def run_metadata(result: SaeRunResult, selection: TrainingSelection) -> dict:
    registry, failures = result.registry, result.quality["failures"]
    metadata = {
        "selection_digest": selection.digest,
        "selection": dg.MetadataValue.md(selection.to_frame().drop(columns=["directory", "shards_digest"])
                                         .to_markdown(index=False)),
        "selection_partitions": dg.MetadataValue.json(selection.records()),
        "mlflow_run_id": result.run_id,
        "mlflow_run": dg.MetadataValue.url(run_url({"experiment_id": result.experiment_id, "run_id": result.run_id})),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint_dir)),
        "checkpoint_sha256": result.sha256,
        "quality_check": "passed" if not failures else "failed: " + "; ".join(failures),
        **result.headline, "frames_per_s": float(result.frames_per_second),
    }
    if registry:
        url = model_version_url(registry["name"], registry["version"])
        metadata |= {"registered_model": registry["name"], "model_version": int(registry["version"]),
                     "model_version_url": dg.MetadataValue.url(url),
                     "promoted_to_champion": registry["promoted"], "promotion": registry["reason"]}
    if result.splice.get("transcripts"):
        table = pd.DataFrame(result.splice["transcripts"])[["clip_id", "reference", "original", "spliced"]]
        metadata["splice_transcripts"] = dg.MetadataValue.md(table.to_markdown(index=False))
    return metadata


@dg.asset(group_name="sae", kinds={"pytorch", "mlflow"}, pool="model", op_tags=GPU_STEP_TAGS,
          deps=["incoming_activations"],  # lineage: it also trains on every collected batch (include_incoming)
          description="A sparse autoencoder on the residual stream, evaluated on held-out frames and clips; its run "
                      "and checkpoint in MLflow, registered as freud-sae.<model>.<hook>.<architecture>. Trains on the "
                      "default corpus and every incoming batch collected so far.")
def topk_sae(context: dg.AssetExecutionContext, config: SaeAssetConfig, storage: FreudStorage, mlflow: MlflowTracking,
             activations: dict, default_corpus: dict) -> dict:
    model, selection = training_selection(config, storage, activations)
    cfg = run_config(config, model)  # validates before anything is read or created
    context.log.info(f"training on {selection.describe()} (selection {selection.digest[:12]})")
    runs_dir = storage.path("sae", f"{model}-{config.hook}-{config.architecture}")
    result = run_sae(cfg, selection.train_source(), selection.eval_source(), runs_dir=runs_dir,
                     tracking_uri=mlflow.uri, experiment=mlflow.experiment,
                     corpus_manifest=splice_manifest(config, storage, default_corpus), data_root=storage.root,
                     tags=_tags(context, config, model, selection), resume_from=config.resume_from or None,
                     selection=selection)
    context.log.info(f"SAE run {result.run_id} in {result.checkpoint_dir}: quality check "
                     f"{'passed' if result.passed else 'failed: ' + '; '.join(result.quality['failures'])}")
    context.add_output_metadata(run_metadata(result, selection))
    return {**result.summary(), "hook": config.hook, "architecture": config.architecture,
            "runs_dir": str(runs_dir), "keep_runs": config.keep_runs,
            "selection": selection.records(), "selection_digest": selection.digest}


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
        metadata["mlflow_run"] = dg.MetadataValue.url(run_url(topk_sae))
    return dg.AssetCheckResult(passed=not failures, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata,
                               description="; ".join(failures) or "all thresholds met")


class SaeSweepConfig(SaeAssetConfig):
    """A sweep: the SAE config above once for every (expansion factor, k) pair, each run logged to MLflow and tagged
    with the sweep's name; the runs page plots their trade-off (L0 against FVU and ΔWER)."""

    expansion_factors: list[int] = [8, 16]
    ks: list[int] = [32, 64]
    sweep_name: str = "sweep"
    register_model: bool = False  # sweep runs are compared on the runs page, not promoted over the champion


@dg.asset(group_name="sae", kinds={"pytorch", "mlflow"}, pool="model", op_tags=GPU_STEP_TAGS,
          description="A sweep over SAE width and k: one run of the SAE config per pair, each trained, spliced into "
                      "held-out clips (ΔWER, ΔCE with CIs) and logged to MLflow with the sweep's tag.")
def sae_sweep(context: dg.AssetExecutionContext, config: SaeSweepConfig, storage: FreudStorage,
              mlflow: MlflowTracking, activations: dict, default_corpus: dict) -> dict:
    model, selection = training_selection(config, storage, activations)
    runs = []
    for expansion in config.expansion_factors:
        for k in config.ks:
            cfg = run_config(config, model).model_copy(update={"expansion_factor": expansion, "k": k,
                                                               "n_latents": None})
            cfg = type(cfg)(**cfg.model_dump())  # validated again: k must fit the width
            runs_dir = storage.path("sae", f"{model}-{config.hook}-{config.architecture}")
            tags = {**_tags(context, config, model, selection), "sweep": config.sweep_name}
            result = run_sae(cfg, selection.train_source(), selection.eval_source(), runs_dir=runs_dir,
                             tracking_uri=mlflow.uri, experiment=mlflow.experiment,
                             corpus_manifest=splice_manifest(config, storage, default_corpus),
                             data_root=storage.root, tags=tags, selection=selection)
            h = result.headline
            context.log.info(f"sweep {config.sweep_name}: {expansion}x, k {k}: FVU {h.get('fvu', float('nan')):.3f}, "
                             f"L0 {h.get('l0', float('nan')):.1f}, dead {h.get('dead_pct', float('nan')):.2f}%, "
                             f"ΔWER {h.get('delta_wer', float('nan')):+.4f} "
                             f"[{h.get('delta_wer_ci_low', float('nan')):+.4f}, "
                             f"{h.get('delta_wer_ci_high', float('nan')):+.4f}]")
            runs.append({"expansion_factor": expansion, "k": k, "run_id": result.run_id, **h,
                         "passed": result.passed})
    context.add_output_metadata({"runs": dg.MetadataValue.md(pd.DataFrame(runs).to_markdown(index=False))})
    return {"sweep": config.sweep_name, "runs": runs}


SAE_CHECKS = [sae_quality]
