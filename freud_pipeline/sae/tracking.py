"""One MLflow run per training, written through an explicit MlflowClient; `log_datasets` records what it trained on.

An explicit client (rather than mlflow.start_run) leaves MLflow's process-global tracking URI and active-run
stack alone, so a Dagster process can train several SAEs, or log to different stores, without crosstalk.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlparse

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from freud_pipeline import objectstore

log = logging.getLogger(__name__)

_BATCH_LIMIT = 100  # params per log_batch call accepted by every store
_DATASETS_LIMIT = 1000  # dataset inputs per log_inputs call


def _artifact_root_for(tracking_uri: str, experiment: str) -> str | None:
    """Artifact location of a new experiment: `<FREUD_MLFLOW_ARTIFACTS or FREUD_OBJECT_STORE/mlflow>/<experiment>`
    on a cluster (whatever the tracking store: every worker reaches the bucket); None lets MLflow choose."""
    root = objectstore.mlflow_artifact_root()
    if root:
        return f"{root}/{experiment}"
    # For a sqlite store MLflow would put artifacts under ./mlruns of whatever the current directory is;
    # keep them next to the database instead.
    if tracking_uri.startswith("sqlite:///"):
        db = Path(unquote(urlparse(tracking_uri).path))
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


class TrainingRun:
    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None, tags: dict[str, str]):
        objectstore.configure_environment()  # MLflow's S3 client reads the endpoint from MLFLOW_S3_ENDPOINT_URL
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = _artifact_root_for(tracking_uri, experiment)
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.tracking_uri = tracking_uri
        self._system_monitor = None

    def __enter__(self) -> "TrainingRun":
        self._start_system_metrics()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
        if exc_type is None:
            status = RunStatus.FINISHED
        else:
            status = RunStatus.KILLED if issubclass(exc_type, KeyboardInterrupt) else RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def _start_system_metrics(self) -> None:
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

        # Needs psutil; and an explicit MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false is respected.
        explicitly_off = MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()
        if importlib.util.find_spec("psutil") is None or explicitly_off:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri)
            self._system_monitor.start()
        except Exception as exc:  # system metrics are a nicety; never fail a training over them
            log.warning("MLflow system metrics unavailable: %s", exc)
            self._system_monitor = None

    def log_params(self, params: dict) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH_LIMIT])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH_LIMIT])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)



@dataclass(frozen=True)
class DatasetRecord:
    """One input dataset of a run: a table describing it, its name, where it lies, its digest, and how the run
    used it (MLflow's context: "training", "evaluation"...), with optional input tags."""

    frame: pd.DataFrame
    name: str
    source: str
    digest: str
    context: str
    tags: dict = field(default_factory=dict)


def log_datasets(client: MlflowClient, run_id: str, records: Iterable[DatasetRecord]) -> None:
    """Record the datasets as inputs of the run (MLflow's dataset tracking, shown on the run's page and in
    `run.inputs.dataset_inputs`): what `mlflow.log_input(mlflow.data.from_pandas(frame, source=..., name=...),
    context=...)` logs, through the explicit client (the fluent API needs an active run). A digest is cut to the
    36 characters MLflow stores."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for record in records:
        with warnings.catch_warnings():  # MLflow's hints: a local path matches two equivalent artifact sources
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")  # for models
            entity = mlflow.data.from_pandas(record.frame, source=record.source, name=record.name,
                                             digest=record.digest[:36])._to_mlflow_entity()  # as log_input does
        tags = [InputTag(key, str(value)) for key, value in record.tags.items()]
        inputs.append(DatasetInput(entity, tags=[*tags, InputTag(MLFLOW_DATASET_CONTEXT, record.context)]))
    for start in range(0, len(inputs), _DATASETS_LIMIT):
        client.log_inputs(run_id, datasets=inputs[start : start + _DATASETS_LIMIT])
