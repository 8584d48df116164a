"""The sha256 of a file, the digest every artefact is recorded and verified with (checkpoints, downloads,
objects in the bucket, imported SAEs)."""

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
