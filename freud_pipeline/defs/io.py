"""Step outputs in the bucket: the IO manager of a cluster, where workers share no disk (docs/OPERATING.md).

Assets pass each other small dicts of paths. On one machine `dg.FilesystemIOManager` pickles them under the data
directory. With an object store (FREUD_OBJECT_STORE) they are pickled into the bucket under `dagster_storage/`,
with the same layout, and every path under the data directory is written relative to it ('@data/...',
`objectstore.portable`) and resolved against the reading machine's own data directory on load: the files it
names are in that machine's cache, since `FreudStorage` pulls the bucket before every step."""

import pickle
from typing import Any

import dagster as dg
from upath import UPath

from freud_pipeline import objectstore
from freud_pipeline.defs.resources import FreudStorage

PREFIX = "dagster_storage"


class _BucketPickleIOManager(dg.UPathIOManager):
    def __init__(self, storage: FreudStorage):
        self.storage = storage
        self.local = UPath(storage.root / PREFIX)  # only to name objects: nothing is written there
        super().__init__(base_path=self.local)

    def _rel(self, path: UPath) -> str:
        return f"{PREFIX}/{UPath(path).relative_to(self.local).as_posix()}"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        data = pickle.dumps(objectstore.portable(obj, self.storage.root), pickle.HIGHEST_PROTOCOL)
        self.storage.store().put_bytes(self._rel(path), data)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        data = self.storage.store().get_bytes(self._rel(path))
        if data is None:
            raise FileNotFoundError(f"{self.storage.object_store}/{self._rel(path)}")
        return objectstore.localise(pickle.loads(data), self.storage.root)

    def path_exists(self, path: UPath) -> bool:
        return self.storage.store().get_bytes(self._rel(path)) is not None

    def make_directory(self, path: UPath) -> None:
        """Nothing to make: an object store has no directories (a key's prefix exists once an object has it)."""

    def unlink(self, path: UPath) -> None:
        store = self.storage.store()
        store.client.delete_object(Bucket=store.bucket, Key=store.key(self._rel(path)))


class ObjectStoreIOManager(dg.ConfigurableIOManagerFactory):
    """Pickled step outputs in the storage's object store, their data-directory paths made portable."""

    storage: FreudStorage

    def create_io_manager(self, context) -> dg.UPathIOManager:
        if not self.storage.object_store:
            raise dg.DagsterInvariantViolationError("ObjectStoreIOManager needs FREUD_OBJECT_STORE (an s3:// URI)")
        return _BucketPickleIOManager(self.storage)
