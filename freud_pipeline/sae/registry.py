"""The MLflow model registry of trained SAEs: one registered model per (Whisper model, hook, architecture).

Every trained run's checkpoint artifact (`runs:/<run id>/checkpoint`: sae_weights.safetensors + cfg.json, which
SAELens loads as saved) becomes a new version of `freud-sae.<model>.<hook>.<architecture>` (dots and dashes of the
parts become underscores, e.g. `freud-sae.tiny_en.encoder_blocks_2.topk`; the architecture is ours: topk, l1 or
batchtopk). The alias `champion` names the version to use. It moves to a new version only when that version passes
the quality check (`check_thresholds`, the rule the Dagster asset check `sae_quality` applies) *and* beats the
current champion on CE recovered (`promote_if_better`).

Version tags written here: `quality_check` (passed|failed), `quality_failures`, the headline metrics
(`metric.<name>`), `promotion` (the reason the alias moved or not), plus whatever the caller adds
(dagster run id, dataset version, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from freud_pipeline.numeric import finite_float

CHAMPION = "champion"
NAME_PREFIX = "freud-sae"
CHECKPOINT_ARTIFACT = "checkpoint"  # the artifact folder train_sae uploads the checkpoint files to
RANKING_METRIC = "ce_recovered"


class QualityThresholds(BaseModel):
    """Limits a trained SAE must meet (None: not checked). Metric names are those of `headline_metrics`:
    fvu (on held-out frames), dead_pct / dense_pct (percent of latents never firing / firing on > 10% of frames),
    ce_recovered (splicing the SAE in, 1 = as good as the original activation, 0 = as bad as zero ablation),
    delta_wer (WER with the SAE spliced in minus the original's, on the same held-out clips)."""

    model_config = ConfigDict(extra="forbid")

    max_fvu: float | None = Field(0.5, ge=0)
    max_dead_pct: float | None = Field(50.0, ge=0, le=100)
    max_dense_pct: float | None = Field(None, ge=0, le=100)
    min_ce_recovered: float | None = 0.5
    max_delta_wer: float | None = None  # spliced WER - original WER on the held-out clips (0.01 = one point)

    def limits(self) -> list[tuple[str, str, float]]:
        """(metric, "max"|"min", limit) for every threshold that is set."""
        pairs = [("fvu", "max", self.max_fvu), ("dead_pct", "max", self.max_dead_pct),
                 ("dense_pct", "max", self.max_dense_pct), ("ce_recovered", "min", self.min_ce_recovered),
                 ("delta_wer", "max", self.max_delta_wer)]
        return [(metric, kind, float(limit)) for metric, kind, limit in pairs if limit is not None]


def _thresholds(thresholds: QualityThresholds | Mapping | None) -> QualityThresholds:
    if thresholds is None:
        return QualityThresholds()
    return thresholds if isinstance(thresholds, QualityThresholds) else QualityThresholds(**thresholds)




def check_thresholds(metrics: Mapping[str, float], thresholds: QualityThresholds | Mapping | None = None) -> list[str]:
    """Why `metrics` fail the quality check: one sentence per failed limit; empty when the check passes.
    A metric that is missing or not finite fails its limit (an unmeasured SAE is not a good one)."""
    failures = []
    for metric, kind, limit in _thresholds(thresholds).limits():
        value = finite_float(metrics.get(metric))
        if value is None:
            failures.append(f"{metric} was not measured (or is not finite): needs {kind} {limit:g}")
        elif kind == "max" and value > limit:
            failures.append(f"{metric} {value:.4g} > {limit:g}")
        elif kind == "min" and value < limit:
            failures.append(f"{metric} {value:.4g} < {limit:g}")
    return failures


def registered_model_name(model: str, hook: str, architecture: str) -> str:
    """`freud-sae.<model>.<hook>.<architecture>` with every character other than [A-Za-z0-9_] of a part as `_`."""
    parts = [re.sub(r"[^A-Za-z0-9_]", "_", str(part)) for part in (model, hook, architecture)]
    if not all(parts):
        raise ValueError(f"registered model name needs a model, hook and architecture; got {model!r}, {hook!r}, "
                         f"{architecture!r}")
    return ".".join([NAME_PREFIX, *parts])


def _is(exc: MlflowException, code: str) -> bool:
    return getattr(exc, "error_code", None) == code


def ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
            raise


def register_checkpoint(client: MlflowClient, name: str, run_id: str, tags: Mapping | None = None,
                        description: str | None = None) -> str:
    """Register the run's checkpoint artifact as a new version of `name` (created if needed); its version number."""
    ensure_registered_model(client, name, description=f"FREUD sparse autoencoders: {name}")
    version = client.create_model_version(
        name, f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()}, description=description,
    )
    return str(version.version)


def champion_version(client: MlflowClient, name: str):
    """The ModelVersion holding the `champion` alias, or None (no alias yet, or no such registered model)."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if _is(exc, "INVALID_PARAMETER_VALUE") or _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _ranking_value(client: MlflowClient, version) -> float | None:
    """A version's CE recovered: its tag, else its run's logged metric."""
    value = finite_float(version.tags.get(f"metric.{RANKING_METRIC}"))
    if value is None and version.run_id:
        run_metrics = client.get_run(version.run_id).data.metrics
        value = finite_float(run_metrics.get(f"splice/{RANKING_METRIC}", run_metrics.get(RANKING_METRIC)))
    return value


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str | int,
    metrics: Mapping[str, float],
    thresholds: QualityThresholds | Mapping | None = None,
) -> tuple[bool, str]:
    """Move the `champion` alias of `name` to `version` if `metrics` pass the quality check and beat the current
    champion's CE recovered (a version with no champion before it only needs to pass). Records the check's
    verdict, the metrics and the reason as tags on the version. Returns (promoted, reason)."""
    version = str(version)
    failures = check_thresholds(metrics, thresholds)
    tags = {"quality_check": "failed" if failures else "passed", "quality_failures": "; ".join(failures)}
    tags |= {f"metric.{k}": repr(float(v)) for k, v in metrics.items() if finite_float(v) is not None}
    promoted, reason = False, ""
    if failures:
        reason = "quality check failed: " + "; ".join(failures)
    else:
        current = champion_version(client, name)
        value = finite_float(metrics.get(RANKING_METRIC))
        shown = "not measured" if value is None else f"{value:.4f}"
        if current is None:
            promoted, reason = True, f"first version to pass the quality check ({RANKING_METRIC} {shown})"
        elif str(current.version) == version:
            reason = f"version {version} is already the champion"
        elif value is None:
            reason = f"{RANKING_METRIC} was not measured: cannot compare with champion version {current.version}"
        else:
            best = _ranking_value(client, current)
            if best is None or value > best:
                promoted = True
                was = "unknown" if best is None else f"{best:.4f}"
                reason = f"{RANKING_METRIC} {value:.4f} beats champion version {current.version} ({was})"
            else:
                reason = (f"{RANKING_METRIC} {value:.4f} does not beat champion version {current.version} "
                          f"({best:.4f})")
    for key, value in {**tags, "promotion": reason}.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return promoted, reason


def download_champion(client: MlflowClient, name: str, dst: str | Path) -> Path:
    """The champion's checkpoint (sae_weights.safetensors + cfg.json) downloaded under `dst`; load it with
    `freud_pipeline.sae.load_checkpoint`."""
    version = champion_version(client, name)
    if version is None:
        raise LookupError(f"registered model {name!r} has no {CHAMPION!r} version yet")
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(version.run_id, CHECKPOINT_ARTIFACT, str(dst)))


def describe_versions(client: MlflowClient, name: str) -> list[dict]:
    """Every version of `name` with its aliases and quality tags (newest first), for reports."""
    aliases: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)  # search results leave aliases out
    rows = []
    for version in client.search_model_versions(f"name = '{name}'"):
        rows.append({"version": int(version.version), "run_id": version.run_id,
                     "aliases": sorted(aliases.get(str(version.version), [])), **dict(version.tags)})
    return sorted(rows, key=lambda r: -r["version"])
