"""The sha256 of a file, the digest every artefact is recorded and verified with (checkpoints, downloads,
objects in the bucket, imported SAEs)."""

import hashlib
import io
import os


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Sha256Writer:
    """A forward-only file handle that hashes the bytes written through it: a file's sha256 without reading it
    back. It cannot seek, so writers that would seek back (zipfile, for np.savez) stream instead."""

    def __init__(self, handle):
        self._handle = handle
        self._hash = hashlib.sha256()
        self._written = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self._written += memoryview(data).nbytes
        return self._handle.write(data)

    def tell(self) -> int:
        return self._written

    def read(self, *_):  # present because np.savez takes objects with `read` as file handles; never called
        raise io.UnsupportedOperation("Sha256Writer is write-only")

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
