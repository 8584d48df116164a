"""Where assets read and write. Paths come from configuration or the environment, never from source edits."""


from pathlib import Path

import dagster as dg

from freud_pipeline import settings


class FreudStorage(dg.ConfigurableResource):
    """Root of the pipeline's files plus the MLflow and LanceDB locations (empty string = default)."""

    data_dir: str = ""
    mlflow_tracking_uri: str = ""
    lancedb_uri: str = ""

    @property
    def root(self) -> Path:
        path = Path(self.data_dir).expanduser().resolve() if self.data_dir else settings.data_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, *parts: str) -> Path:
        target = self.root.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        return target

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def index_uri(self) -> str:
        return self.lancedb_uri or str(self.root / "lancedb")


class MlflowTracking(dg.ConfigurableResource):
    """MLflow as the assets reach it: an explicit client of one tracking store (never MLflow's process-wide
    tracking URI, so one process can serve several stores without crosstalk). Empty `tracking_uri`: the
    storage's (MLFLOW_TRACKING_URI, else the sqlite store in the data directory)."""

    storage: FreudStorage
    tracking_uri: str = ""
    experiment: str = "freud-sae"

    @property
    def uri(self) -> str:
        return self.tracking_uri or self.storage.tracking_uri

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)
