"""Resumable downloads and safe extraction for the public corpora. Offline, they fail after TIMEOUT_S with a
DatasetUnavailableError that says what to fetch by hand and where to put it."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from freud_pipeline.digests import file_sha256
from freud_pipeline.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

# Applies to connecting and to each read: an unreachable host or a stalled transfer fails fast; rerunning resumes.
TIMEOUT_S = 10.0
_CHUNK = 1 << 20


def download(url: str, dest: Path, *, sha256: str | None = None, manual_hint: str = "") -> Path:
    """Fetch `url` to `dest`, resuming a previous partial download with an HTTP Range request.

    Data goes to `<dest>.partial` and is renamed only once complete (and matching `sha256`, when given).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "freud-pipeline"} | ({"Range": f"bytes={offset}-"} if offset else {})
    unavailable = (
        f"Could not download {url}. Download it by hand and put it at {dest}"
        + (f" ({manual_hint})" if manual_hint else "") + "."
    )
    try:
        with urlopen(Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            resumed = offset > 0 and response.status == 206  # 200 means the server ignored Range: start over
            log.info("downloading %s%s", url, f" from byte {offset}" if resumed else "")
            with open(partial, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
    except HTTPError as exc:
        if exc.code != 416 or not offset:  # 416: the partial file already holds everything
            raise DatasetUnavailableError(f"{unavailable} (HTTP {exc.code})") from exc
    except (URLError, OSError, http.client.HTTPException) as exc:
        raise DatasetUnavailableError(f"{unavailable} ({exc})") from exc
    if sha256 is not None and (actual := file_sha256(partial)) != sha256:
        partial.unlink()
        raise DatasetUnavailableError(f"{url} arrived corrupted (sha256 {actual}, expected {sha256}); run again to retry.")
    os.replace(partial, dest)
    return dest


def extract(archive: Path, dest_dir: Path) -> Path:
    """Extract a tar(.gz) or zip into dest_dir once (a marker file records completion).

    Reading the whole archive also checks it: gzip and zip CRCs catch truncated or damaged downloads.
    """
    marker = dest_dir / f".{archive.name}.extracted"
    if marker.exists():
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                if bad := zf.testzip():
                    raise DatasetUnavailableError(f"{archive} is damaged (bad member {bad}); delete it and download again.")
                zf.extractall(dest_dir)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest_dir, filter="data")  # refuses absolute paths and links out of dest_dir
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DatasetUnavailableError(f"{archive} is damaged ({exc}); delete it and download again.") from exc
    marker.touch()
    return dest_dir
