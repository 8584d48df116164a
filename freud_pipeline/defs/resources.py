"""Where assets read and write. Paths come from configuration or the environment, never from source edits."""


from pathlib import Path

import dagster as dg

from freud_pipeline import objectstore, settings


class FreudStorage(dg.ConfigurableResource):
    """Root of the pipeline's files plus the MLflow and LanceDB locations (empty string = default). With
    `object_store` (an s3:// URI; FREUD_OBJECT_STORE) the data directory is this machine's cache of the bucket:
    see `ClusterStorage`."""

    data_dir: str = ""
    mlflow_tracking_uri: str = ""
    lancedb_uri: str = ""
    object_store: str = ""

    def store(self) -> objectstore.ObjectStore | None:
        return objectstore.ObjectStore(self.object_store, self.root) if self.object_store else None

    def portable(self, value):
        """`value` with paths under the data directory made resolvable on another machine (object store only)."""
        return objectstore.portable(value, self.root) if self.object_store else value

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


class ClusterStorage(FreudStorage):
    """FreudStorage on a cluster: every step that uses it first pulls what the bucket holds and this machine's cache
    lacks, and after it ran pushes what it wrote (`freud_pipeline.objectstore`), so workers on machines that share
    no disk see each other's datasets, shards and SAE runs. (A subclass, so that on one machine the storage stays a
    plain resource without set-up and tear-down.)"""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        store = self.store()
        if store is not None:
            report = store.pull()
            if context.log is not None and report.received:
                context.log.info(f"pulled {report.received} file(s), {report.bytes / 1e6:.1f} MB, from {store.uri}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        store = self.store()
        if store is not None:
            report = store.push()
            if context.log is not None and report.sent:
                context.log.info(f"pushed {report.sent} file(s), {report.bytes / 1e6:.1f} MB, to {store.uri}")


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
