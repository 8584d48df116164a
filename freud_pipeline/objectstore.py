"""Object storage for everything big, so that machines that share no disk can share FREUD's data.

Settings (environment; unset = one machine, everything under the local data directory as before):

    FREUD_OBJECT_STORE=s3://bucket/prefix       datasets, activation shards, SAE runs, effect tables...
    FREUD_S3_ENDPOINT_URL=http://host:9000      an S3-compatible server other than AWS (MinIO, moto, Ceph...)
    FREUD_LANCEDB_URI=s3://bucket/lancedb       the feature index, opened by LanceDB directly in the bucket
    FREUD_MLFLOW_ARTIFACTS=s3://bucket/mlflow   MLflow artifacts of new experiments (default: <store>/mlflow)
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION   credentials, as for any AWS client

With an object store the data directory (FREUD_DATA_DIR) becomes this machine's cache of the bucket: a step
pulls what the bucket holds that its cache lacks before it runs (`pull`) and pushes what it wrote after
(`push`), so a worker never needs another worker's disk. Every artefact is already written atomically on local
disk (a temporary name, renamed when complete: `*.partial`, `*.tmp`), and `push` skips temporary names; an S3 PUT
is atomic per object, and a multi-file artefact's index file (shards.json, cfg.json, the manifest) is pushed
after its data files, so a reader that finds the index finds the files it names. Artefacts are immutable and
versioned (a new run writes new names), so a changed object means a changed artefact: objects are compared by
size and sha256 (kept as object metadata), and a pull replaces a cached file only through a temporary name.

What stays local: the Whisper model cache (`models/`), the Dagster instance and IO-manager files (they live in
PostgreSQL and the bucket's `dagster_storage/` prefix, see `defs.io.ObjectStoreIOManager`), SQLite stores and a
local LanceDB directory (a cluster sets FREUD_LANCEDB_URI and MLFLOW_TRACKING_URI to shared services instead).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from freud_pipeline.digests import file_sha256
from freud_pipeline.errors import FreudError

# Top-level entries of the data directory that never travel: per-machine caches and single-machine stores.
LOCAL_ONLY = {"models", "dagster_home", "dagster_storage", "lancedb", "index_state", "mlflow.db", "mlartifacts",
              "logs", ".freud-sync.json", "demo.pid", "app_cache",
              "mlflow"}  # MLflow's artifacts under the store (the default root): MLflow reads them, a pull does not
# Names of files that index a multi-file artefact: pushed after every other file of the same push.
INDEX_NAMES = {"shards.json", "cfg.json", "manifest.parquet", "alignments.parquet", "report.json"}
TEMPORARY_MARKERS = (".partial", ".tmp", ".lock")


def configure_environment() -> None:
    """Export FREUD_S3_ENDPOINT_URL under the names each library reads (boto3, MLflow, LanceDB/object_store).
    Values already set by the operator win."""
    endpoint = os.environ.get("FREUD_S3_ENDPOINT_URL", "").strip()
    if not endpoint:
        return
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT"):
        os.environ.setdefault(name, endpoint)
    if endpoint.startswith("http://"):
        os.environ.setdefault("AWS_ALLOW_HTTP", "true")  # LanceDB refuses plain http unless told
    os.environ.setdefault("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    os.environ.setdefault("AWS_DEFAULT_REGION", os.environ["AWS_REGION"])


def object_store_uri() -> str:
    return os.environ.get("FREUD_OBJECT_STORE", "").strip().rstrip("/")


def mlflow_artifact_root() -> str | None:
    """Where MLflow puts the artifacts of a new experiment when a cluster is configured (else None)."""
    explicit = os.environ.get("FREUD_MLFLOW_ARTIFACTS", "").strip().rstrip("/")
    if explicit:
        return explicit
    store = object_store_uri()
    return f"{store}/mlflow" if store else None


def is_remote(uri: str | os.PathLike | None) -> bool:
    return bool(uri) and "://" in str(uri) and not str(uri).startswith("file://")


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FreudError(f"object store {uri!r} is not an s3://bucket[/prefix] URI (S3-compatible storage only)")
    return parsed.netloc, parsed.path.strip("/")


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _client():
    """One S3 client per process and setting. Made under a lock, in a session of its own: creating clients through
    boto3's shared default session from several threads at once (the app's background callbacks) is not safe;
    a client, once made, is."""
    configure_environment()
    key = tuple(os.environ.get(name, "") for name in ("FREUD_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_REGION"))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            try:
                import boto3
            except ImportError:  # pragma: no cover - boto3 is a dependency
                raise FreudError("object storage needs boto3 (pip install boto3)") from None
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=key[0] or None)
        return _CLIENTS[key]


def _travels(rel: Path) -> bool:
    if rel.parts[0] in LOCAL_ONLY:
        return False
    return not any(marker in part for part in rel.parts for marker in TEMPORARY_MARKERS)


@dataclass
class SyncReport:
    sent: int = 0
    received: int = 0
    bytes: int = 0


class ObjectStore:
    """One bucket prefix mirrored by a local data directory (its cache)."""

    def __init__(self, uri: str, local_root: str | os.PathLike):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = _split(self.uri)
        self.root = Path(local_root)
        self.client = _client()
        self._ledger_path = self.root / ".freud-sync.json"

    # ------------------------------------------------------------------ single objects
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                               Metadata={"sha256": hashlib.sha256(data).hexdigest()})

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def listing(self, under: str = "") -> dict[str, int]:
        """{relative path: size} of every object under the prefix, or of the object `under` names or the objects
        under that directory."""
        under = under.strip("/")
        base = self.key(under) if under else (self.prefix + "/" if self.prefix else "")
        out: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                rel = item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"]
                if not under or rel == under or rel.startswith(under + "/"):
                    out[rel] = item["Size"]
        return out

    # ------------------------------------------------------------------ the local cache
    def _ledger(self) -> dict[str, list]:
        try:
            return json.loads(self._ledger_path.read_text())
        except (OSError, ValueError):
            return {}

    def _record(self, entries: dict[str, list], removed: Iterable[str] = ()) -> None:
        """Merge `entries` into the ledger and drop `removed`, on the ledger as it is now: read, changed and
        replaced under an exclusive lock on the data directory, so that threads and processes syncing the same
        cache at once (the app's callbacks, a step) never lose each other's entries."""
        removed = set(removed)
        if not entries and not removed:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".freud-sync.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: excludes other threads of this process too
            ledger = {k: v for k, v in self._ledger().items() if k not in removed}
            ledger.update(entries)
            tmp = self._ledger_path.with_name(f".freud-sync.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(ledger))
            os.replace(tmp, self._ledger_path)

    def push(self) -> SyncReport:
        """Upload every complete local file the bucket lacks or holds in another version; index files last."""
        report, ledger, recorded = SyncReport(), self._ledger(), {}
        remote = self.listing()
        pending = []
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.root)
            if not _travels(rel):
                continue
            key, stat = rel.as_posix(), path.stat()
            seen = ledger.get(key)
            if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns and remote.get(key) == stat.st_size:
                continue  # unchanged since it was last sent or received
            pending.append((path.name in INDEX_NAMES, key, path, stat))
        for _, key, path, stat in sorted(pending, key=lambda item: (item[0], item[1])):
            digest = file_sha256(path)
            recorded[key] = [stat.st_size, stat.st_mtime_ns, digest]
            if remote.get(key) == stat.st_size and self._remote_sha(key) == digest:
                continue
            self.client.upload_file(str(path), self.bucket, self.key(key), ExtraArgs={"Metadata": {"sha256": digest}})
            report.sent += 1
            report.bytes += stat.st_size
        self._record(recorded)
        return report

    def delete(self, under: str) -> int:
        """Delete the object `under` names or every object under that directory; the number deleted."""
        keys = list(self.listing(under))
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self.key(k)} for k in keys[start:start + 1000]], "Quiet": True})
        if any(k in self._ledger() for k in keys):
            self._record({}, removed=keys)
        return len(keys)

    def _remote_sha(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        except Exception:
            return None
        return head.get("Metadata", {}).get("sha256")

    def pull(self, under: str = "") -> SyncReport:
        """Download every object (under `under`) the local cache lacks or holds in another version."""
        report, ledger, recorded = SyncReport(), self._ledger(), {}
        for key, size in sorted(self.listing(under).items()):
            rel = Path(key)
            if not _travels(rel):
                continue
            target = self.root / rel
            seen = ledger.get(key)
            if target.is_file():
                stat = target.stat()
                if seen and seen[0] == stat.st_size == size and seen[1] == stat.st_mtime_ns:
                    continue
                if stat.st_size == size and self._remote_sha(key) == file_sha256(target):
                    recorded[key] = [stat.st_size, stat.st_mtime_ns, self._remote_sha(key)]
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
            self.client.download_file(self.bucket, self.key(key), str(tmp))
            expected = self._remote_sha(key)
            if expected and file_sha256(tmp) != expected:
                tmp.unlink(missing_ok=True)
                raise FreudError(f"{self.uri}/{key} does not match its recorded sha256: refusing the download")
            os.replace(tmp, target)
            stat = target.stat()
            recorded[key] = [stat.st_size, stat.st_mtime_ns, expected]
            report.received += 1
            report.bytes += size
        self._record(recorded)
        return report


def store_for(local_root: str | os.PathLike) -> ObjectStore | None:
    """The configured object store mirrored by `local_root`, or None on one machine."""
    uri = object_store_uri()
    return ObjectStore(uri, local_root) if uri else None


# ---------------------------------------------------------------------- paths that travel between machines
DATA_MARK = "@data/"


def portable(value, root: str | os.PathLike):
    """`value` (str, list, tuple, dict, nested) with every absolute path under `root` written as '@data/<rel>',
    so that another machine with another data directory can resolve it (`localise`)."""
    prefix = str(Path(root)).rstrip("/") + "/"
    if isinstance(value, str):
        if value == prefix[:-1]:
            return DATA_MARK
        return DATA_MARK + value[len(prefix):] if value.startswith(prefix) else value
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v, root) for v in value)
    return value


def localise(value, root: str | os.PathLike):
    """The inverse of `portable` on this machine's data directory `root`."""
    if isinstance(value, str):
        return str(Path(root) / value[len(DATA_MARK):]) if value.startswith(DATA_MARK) else value
    if isinstance(value, dict):
        return {k: localise(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(localise(v, root) for v in value)
    return value


# ---------------------------------------------------------------------- single objects by URI
def _locate(uri: str):
    bucket, key = _split(uri)
    return _client(), bucket, key


def write_uri(uri: str, data: bytes) -> None:
    """Put one object (atomic: a reader sees the old object or the whole new one)."""
    client, bucket, key = _locate(uri)
    client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": hashlib.sha256(data).hexdigest()})


def read_uri(uri: str) -> bytes:
    client, bucket, key = _locate(uri)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(uri) from None


def delete_uri(uri: str) -> None:
    client, bucket, key = _locate(uri)
    client.delete_object(Bucket=bucket, Key=key)


def resolve(path: str | os.PathLike) -> Path:
    """A path as stored (absolute, or '@data/<rel>' as a cluster stores it) on this machine: under its data
    directory, fetched from the object store first when this machine's cache lacks it (an SAE checkpoint that the
    app needs, say)."""
    from freud_pipeline import settings

    text = str(path)
    if not text.startswith(DATA_MARK):
        return Path(text)
    return fetch(settings.data_dir(), text[len(DATA_MARK):])


def forget(path: str | os.PathLike) -> int:
    """Delete from the object store what a local path under the data directory mirrors (a removed SAE run: so that
    no machine's next pull brings it back). 0 on one machine."""
    from freud_pipeline import settings

    root = settings.data_dir()
    store = store_for(root)
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return 0
    return store.delete(rel.as_posix()) if store is not None else 0


def fetch(root: str | os.PathLike, rel: str) -> Path:
    """root/rel, pulled from the object store when an object store is configured: a file when it is missing
    locally, a directory's objects that the local copy lacks; else just the path."""
    local = Path(root) / rel
    if not local.is_file():
        store = store_for(root)
        if store is not None:
            store.pull(under=rel)
    return local
