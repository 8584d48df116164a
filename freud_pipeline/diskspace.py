"""Free-space guard: fail before a long write with a message that says what to do, not halfway with ENOSPC."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from freud_pipeline.errors import FreudError

DEFAULT_MARGIN_MB = 1024.0


class InsufficientSpaceError(FreudError, OSError):
    """Not enough free space on the disk that holds the data directory."""


def margin_bytes() -> int:
    """Free space always left over: FREUD_MIN_FREE_MB (default 1024 MB)."""
    raw = os.environ.get("FREUD_MIN_FREE_MB", "")
    try:
        return int(float(raw) * 2**20) if raw else int(DEFAULT_MARGIN_MB * 2**20)
    except ValueError:
        raise FreudError(f"FREUD_MIN_FREE_MB={raw!r} is not a number of megabytes") from None


def require_free_space(path: str | Path, need_bytes: int = 0, what: str = "this step") -> int:
    """Raise InsufficientSpaceError unless the disk holding `path` has `need_bytes` plus the margin free.

    `path` may not exist yet: its nearest existing parent is measured. Returns the free bytes.
    """
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            raise FreudError(f"no existing parent directory for {path}")
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = margin_bytes()
    if free < need_bytes + margin:
        raise InsufficientSpaceError(
            f"{what}: only {free / 2**30:.2f} GiB free on the disk holding {probe}, but it needs "
            f"{need_bytes / 2**30:.2f} GiB plus a margin of {margin / 2**30:.2f} GiB. Free some space, point "
            f"FREUD_DATA_DIR at a larger disk, or lower the margin with FREUD_MIN_FREE_MB."
        )
    return free
