"""The sha256 of a file, the digest every artefact is recorded and verified with (checkpoints, downloads,
objects in the bucket, imported SAEs)."""

import hashlib
import mmap
import os


def file_sha256(path: str | os.PathLike) -> str:
    """Hashed in one call over the file's pages (hashlib releases the GIL for all of it): reading in chunks took
    and gave back the GIL a hundred times for a state of 24 MB, and each time could wait for another busy thread
    (a merge hashes its new state beside its writes)."""
    with open(path, "rb") as handle:
        if not os.fstat(handle.fileno()).st_size:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as pages:
            return hashlib.sha256(pages).hexdigest()
