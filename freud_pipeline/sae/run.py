"""One SAE run, end to end: train → splice-evaluate → quality gate → register → promote → report.

`run_sae` is the only implementation: the Dagster asset `topk_sae` (and through it `freud collect --config
configs/train/*.yaml`, `make demo` and the weekly retraining) and benchmarks/train.py call it. Its part after
training, `complete_run`, also completes each SAE of `sae.multi.run_saes` (several hooks trained from one pass).

Every run gets its own directory `<runs_dir>/<run id>/`. It is written as `<run id>.partial/` (where a killed run
leaves `checkpoints/step_*/trainer_state.pt` to resume from) and renamed when the run is complete, after its quality
report; from then on nothing writes to it, so a feature set that records the run id and the weights' sha256 always
loads the SAE it was mined with. Only `retention.prune_runs` removes a run directory, together with its sets.

Frame metrics on held-out frames come from `train_sae`; splice fidelity (`splice_eval`) on held-out clips of a
corpus. The gate (`registry.check_thresholds`) is applied before anything else happens: a failing run is
registered as a version marked failed, but never promoted to `champion` (and never indexed: see
`freud_pipeline/defs/features.py`). MLflow is reached through an explicit client for `tracking_uri`; the
process-wide tracking URI is never set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from pydantic import Field, PositiveInt

from freud_pipeline.features.runs import EXPERIMENT
from freud_pipeline.sae.config import TrainConfig
from freud_pipeline.sae.registry import QualityThresholds, check_thresholds
from freud_pipeline.sae.retention import PARTIAL_SUFFIX, REPORT_FILE
from freud_pipeline.sae.tracking import DatasetRecord, log_datasets

log = logging.getLogger(__name__)

SELECTION_TAG = "freud.selection_digest"  # the run's TrainingSelection digest (its partitions: the run's dataset)
MAX_SPLICE_SECONDS = 30.0  # splice_eval runs one Whisper window per clip


class SaeRunConfig(TrainConfig, QualityThresholds):
    """A TrainConfig, the quality thresholds (QualityThresholds' fields) and what the run does after training."""

    # Held-out clips to splice into (ΔWER and ΔCE with 95% bootstrap intervals; fewer than ~100 cannot tell a
    # 1-point WER change from noise); 0: skip (min_ce_recovered and max_delta_wer must then be None).
    splice_clips: int = Field(128, ge=0)
    splice_splits: list[str] = ["dev", "test"]
    splice_max_new_tokens: PositiveInt = 96  # caps greedy decoding: a poor SAE can loop
    register_model: bool = True  # a new version of freud-sae.<model>.<hook>.<architecture>, promoted if better
    keep_runs: PositiveInt = 3  # retention: the champion and the last keep_runs run directories stay

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(**self.model_dump(include=set(QualityThresholds.model_fields)))


@dataclass
class SaeRunResult:
    run_id: str
    checkpoint_dir: Path  # <runs_dir>/<run id>, complete and immutable
    sha256: str  # of the weights file
    experiment_id: str
    model: str
    metrics: dict[str, float]  # train_sae's: last step metrics and eval/...
    headline: dict[str, float]  # what the gate judged (headline_metrics)
    splice: dict
    quality: dict  # {metrics, thresholds, failures, passed}
    registry: dict  # {name, version, promoted, reason, champion_version, champion_run_id}; {} if not registered
    frames_per_second: float
    seconds: dict[str, float] = field(default_factory=dict)  # train, splice
    sae: Any = None  # the trained SAE (eval mode)
    parent_run_id: str = ""  # the MLflow run grouping SAEs trained together (sae.multi.run_saes)

    @property
    def passed(self) -> bool:
        return bool(self.quality["passed"])

    def summary(self) -> dict:
        """JSON-able description of the run (what the Dagster asset returns)."""
        return {"run_id": self.run_id, "checkpoint_dir": str(self.checkpoint_dir), "sha256": self.sha256,
                "experiment_id": self.experiment_id, "model": self.model,
                "metrics": {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))},
                "quality": self.quality, "registry": self.registry}


def held_out_clips(manifest: pd.DataFrame, n: int, splits=("dev", "test")) -> pd.DataFrame:
    """`n` clips of the given splits for splice evaluation, deterministically: those with a transcript and at most
    30 s, longest first (every clip costs one full 30 s encoder window, so long ones give the most tokens per
    second of compute), taking the sources in turn so that no single source fills the sample. Only English clips
    (no `language` column, or "en"): the WER is of English transcription."""
    from freud_pipeline.audio.text import normalise_transcript

    rows = manifest[manifest["split"].isin(list(splits)) & (manifest["duration_s"] <= MAX_SPLICE_SECONDS)]
    if "language" in rows.columns:
        rows = rows[rows["language"].isna() | rows["language"].astype(str).str.lower().str.startswith("en")]
    rows = rows[rows["transcript"].fillna("").map(normalise_transcript).str.len() > 0]
    rows = rows.sort_values(["duration_s", "clip_id"], ascending=[False, True])
    rows = rows.assign(_rank=rows.groupby("source").cumcount()).sort_values(["_rank", "source"], kind="stable")
    return rows.head(n).drop(columns="_rank")


def splice_metrics(cfg: SaeRunConfig, sae, model_name: str, manifest_path: str | Path | None,
                   data_root: str | Path | None) -> dict:
    """splice_eval on held-out clips of the corpus at `manifest_path` (paths relative to `data_root`); {} when
    disabled, without a corpus, or when it has no such clips."""
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.sae.splice import splice_eval
    from freud_pipeline.whisper.models import load_model

    if cfg.splice_clips <= 0 or manifest_path is None:
        return {}
    chosen = held_out_clips(load_manifest(manifest_path), cfg.splice_clips, cfg.splice_splits)
    if chosen.empty:
        return {}
    root = Path(data_root) if data_root is not None else Path(manifest_path).parent
    clips = [(load_audio(root / path), text) for path, text in zip(chosen["path"], chosen["transcript"])]
    model = load_model(model_name, device=str(sae.device))
    result = splice_eval(model, sae.to(next(model.parameters()).device), cfg.hook, clips,
                         max_new_tokens=cfg.splice_max_new_tokens)
    for row, clip_id in zip(result["transcripts"], chosen["clip_id"]):
        row["clip_id"] = clip_id
    return result


def headline_metrics(train_metrics: Mapping, splice: Mapping) -> dict[str, float]:
    """The metrics the quality gate, the registry and reports use (percentages for dead/dense)."""
    metrics = {
        "fvu": train_metrics.get("eval/fvu"),
        "explained_variance": train_metrics.get("eval/explained_variance"),
        "l0": train_metrics.get("eval/l0"),
        "dead_pct": 100 * train_metrics["eval/dead_fraction"] if "eval/dead_fraction" in train_metrics else None,
        "dense_pct": 100 * train_metrics["eval/dense_fraction"] if "eval/dense_fraction" in train_metrics else None,
        "eval_frames": train_metrics.get("eval/n_frames"),
    }
    for key in ("ce_original", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_vs_mean",
                "wer_original", "wer_spliced", "delta_ce", "delta_wer", "n_clips", "n_tokens", "n_words",
                *(f"{name}_ci_{side}" for name in ("ce_recovered", "delta_ce", "delta_wer") for side in ("low", "high"))):
        if key in splice:
            metrics[key if key not in ("n_clips", "n_tokens", "n_words") else f"splice_{key}"] = splice[key]
    return {k: float(v) for k, v in metrics.items() if v is not None}


SELECTION_CONTEXTS = {"train": "training", "eval": "evaluation", "split": "training+evaluation"}


def selection_inputs(selection) -> list[DatasetRecord]:
    """A TrainingSelection as MLflow input datasets: one per partition, named <dataset>/<partition>, its shard
    directory as the source and its shard digest as the digest; context training, evaluation, or both for a
    partition split by clip; input tags: its use and the selection's digest."""
    frame = selection.to_frame()
    return [DatasetRecord(frame.iloc[[i]].reset_index(drop=True), f"{p.dataset}/{p.partition}", p.directory,
                          p.shards_digest, SELECTION_CONTEXTS[p.use], {"freud.use": p.use,
                                                                      SELECTION_TAG: selection.digest})
            for i, p in enumerate(selection.partitions)]


def _log_metrics(client, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(float(v))]
    if items:
        client.log_batch(run_id, metrics=items)


def _register(client, cfg: SaeRunConfig, model: str, run_id: str, headline: dict, tags: Mapping) -> dict:
    """A new version of the registered model; `champion` moves to it only if it passes the gate and is better."""
    from freud_pipeline.sae.registry import (
        champion_version,
        promote_if_better,
        register_checkpoint,
        registered_model_name,
    )

    name = registered_model_name(model, cfg.hook, cfg.architecture)
    version = register_checkpoint(client, name, run_id, tags=tags)
    promoted, reason = promote_if_better(client, name, version, headline, cfg.thresholds())
    champion = champion_version(client, name)
    log.info("%s version %s: %s (%s)", name, version, "promoted to champion" if promoted else "not promoted", reason)
    return {"name": name, "version": version, "promoted": promoted, "reason": reason,
            "champion_version": str(champion.version) if champion is not None else None,
            "champion_run_id": champion.run_id if champion is not None else None}


def run_sae(
    cfg: SaeRunConfig,
    train,
    dev,
    *,
    runs_dir: str | Path,
    tracking_uri: str,
    experiment: str = EXPERIMENT,
    corpus_manifest: str | Path | None = None,
    data_root: str | Path | None = None,
    tags: Mapping[str, str] | None = None,
    resume_from: str | Path | None = None,
    selection=None,
) -> SaeRunResult:
    """Train `cfg` on the frame source `train` (evaluated on `dev`), splice it into held-out clips of
    `corpus_manifest`, gate it on `cfg`'s thresholds, register and maybe promote it, and write its report.
    The run's directory is `<runs_dir>/<run id>/` (see the module doc); `resume_from` continues a killed run
    from one of its `checkpoints/step_*` (or a complete run directory, to extend it). `selection` (a
    `sae.selection.TrainingSelection`, whose sources `train` and `dev` are) is recorded as the MLflow run's
    input datasets (`selection_inputs`: one per partition) and its digest as the tag `freud.selection_digest`."""
    from freud_pipeline.sae.train import train_sae

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    model = cfg.model_name or getattr(train, "model_name", None)
    if not model:
        raise ValueError("run_sae needs the Whisper model of the frames: set model_name in the config")
    tags = {**(tags or {}), **({SELECTION_TAG: selection.digest} if selection is not None else {})}
    started = time.perf_counter()
    trained = train_sae(train, cfg.train_config().model_copy(update={"model_name": model}),
                        out_dir=lambda run_id: runs_dir / f"{run_id}{PARTIAL_SUFFIX}", mlflow_tracking_uri=tracking_uri,
                        experiment=experiment, eval_source=dev, tags=tags, resume_from=resume_from)
    return complete_run(cfg, trained, runs_dir=runs_dir, tracking_uri=tracking_uri, model=model,
                        corpus_manifest=corpus_manifest, data_root=data_root, tags=tags, selection=selection,
                        train_seconds=time.perf_counter() - started)


def complete_run(
    cfg: SaeRunConfig,
    trained,
    *,
    runs_dir: str | Path,
    tracking_uri: str,
    model: str,
    corpus_manifest: str | Path | None = None,
    data_root: str | Path | None = None,
    tags: Mapping[str, str] | None = None,
    selection=None,
    train_seconds: float = float("nan"),
) -> SaeRunResult:
    """Everything of `run_sae` after training, for a finished `train.TrainResult` written to
    `<runs_dir>/<run id>.partial/`: the selection as the run's input datasets, splice-evaluate, gate, register and
    maybe promote, write the report and rename the directory to `<runs_dir>/<run id>/`. `sae.multi.run_saes` calls
    it once per hook after training them together."""
    from mlflow.tracking import MlflowClient

    runs_dir = Path(runs_dir)
    client = MlflowClient(tracking_uri)
    if selection is not None:
        log_datasets(client, trained.run_id, selection_inputs(selection))
    started = time.perf_counter()
    splice = splice_metrics(cfg, trained.sae, model, corpus_manifest, data_root)
    splice_s = time.perf_counter() - started
    headline = headline_metrics(trained.metrics, splice)
    failures = check_thresholds(headline, cfg.thresholds())  # the gate: before anything is promoted or indexed
    quality = {"metrics": headline, "thresholds": cfg.thresholds().model_dump(), "failures": failures,
               "passed": not failures}
    _log_metrics(client, trained.run_id, {f"splice/{k}": v for k, v in splice.items()}, cfg.steps)
    client.set_tag(trained.run_id, "quality_check", "passed" if not failures else "failed")
    final_dir = runs_dir / trained.run_id
    registry = {}
    if cfg.register_model:
        registry = _register(client, cfg, model, trained.run_id, headline, {
            **(tags or {}), "checkpoint_dir": str(final_dir), "checkpoint_sha256": trained.sha256})
        client.set_tag(trained.run_id, "registered_model", registry["name"])
        client.set_tag(trained.run_id, "registered_version", registry["version"])
        client.set_tag(trained.run_id, "promoted_to_champion", str(registry["promoted"]).lower())
    result = SaeRunResult(
        run_id=trained.run_id, checkpoint_dir=final_dir, sha256=trained.sha256,
        experiment_id=client.get_run(trained.run_id).info.experiment_id, model=model, metrics=trained.metrics,
        headline=headline, splice=splice, quality=quality, registry=registry,
        frames_per_second=trained.frames_per_second, seconds={"train": train_seconds, "splice": splice_s},
        sae=trained.sae, parent_run_id=trained.parent_run_id)
    report = {**result.summary(), "hook": cfg.hook, "architecture": cfg.architecture, "tags": dict(tags or {}),
              "frames": {k.removeprefix("eval/"): v for k, v in trained.metrics.items() if k.startswith("eval/")},
              "splice": splice, "completed_at": time.time()}
    partial = Path(trained.checkpoint_dir)
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    complete_partial(partial, final_dir)
    client.log_artifact(trained.run_id, str(final_dir / REPORT_FILE), "eval")
    return result


def complete_partial(partial: Path, final: Path) -> None:
    """The run directory under its final name, in one rename (never over an existing run's directory)."""
    if final.exists():
        raise FileExistsError(f"{final} exists already: a run directory is never overwritten")
    os.rename(partial, final)
