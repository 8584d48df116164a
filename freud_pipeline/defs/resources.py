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
