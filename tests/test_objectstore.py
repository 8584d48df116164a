"""The data directory as a cache of an S3 bucket (freud_pipeline.objectstore), on a real S3-compatible server
(moto's, started per module), and the merge state of a LanceDB index that lives in the bucket."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from freud_pipeline import objectstore
from freud_pipeline.errors import FreudError

try:
    from services import bucket, require_services, s3_environment, s3_server
except ImportError:  # tests collected as a package
    from tests.services import bucket, require_services, s3_environment, s3_server

require_services(s3=True, module_level=True)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as url:
        yield url


@pytest.fixture
def cluster_env(endpoint, monkeypatch):
    """FREUD's object-store settings for one fresh bucket."""
    name = f"b{os.urandom(4).hex()}"
    bucket(endpoint, name)
    s3_environment(monkeypatch, endpoint, FREUD_OBJECT_STORE=f"s3://{name}/data")
    return name


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
            and not p.name.startswith(".freud-sync")}


def test_two_caches_share_files_through_the_bucket_only(cluster_env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "activations" / "m" / "train").mkdir(parents=True)
    (a / "activations" / "m" / "train" / "shard-000000.arrow").write_bytes(os.urandom(5000))
    (a / "activations" / "m" / "train" / "shards.json").write_text('{"complete": true}')
    (a / "sae" / "run1.partial").mkdir(parents=True)  # an artefact still being written never travels
    (a / "sae" / "run1.partial" / "cfg.json").write_text("{}")
    (a / "models").mkdir()
    (a / "models" / "tiny.pt").write_bytes(b"local cache only")
    (a / "mlflow.db").write_bytes(b"single-machine store")

    sent = objectstore.store_for(a).push()
    assert sent.sent == 2
    assert objectstore.store_for(a).push().sent == 0  # nothing changed: nothing sent again
    assert objectstore.store_for(b).pull().received == 2
    assert _tree(b) == {k: v for k, v in _tree(a).items() if k.startswith("activations/")}
    assert objectstore.store_for(b).pull().received == 0

    # a new artefact of b reaches a on a's next pull, a changed file replaces the cached copy
    (b / "sae" / "run2").mkdir(parents=True)
    (b / "sae" / "run2" / "cfg.json").write_text('{"k": 8}')
    (b / "activations" / "m" / "train" / "shards.json").write_text('{"complete": true, "n": 1}')
    assert objectstore.store_for(b).push().sent == 2
    assert objectstore.store_for(a).pull().received == 2
    assert (a / "sae" / "run2" / "cfg.json").read_text() == '{"k": 8}'
    assert (a / "activations" / "m" / "train" / "shards.json").read_text() == '{"complete": true, "n": 1}'


def test_a_corrupted_object_is_refused_and_nothing_is_replaced(cluster_env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "datasets").mkdir(parents=True)
    (a / "datasets" / "clip.wav").write_bytes(b"RIFF" + os.urandom(100))
    objectstore.store_for(a).push()
    store = objectstore.store_for(b)
    # the object changes behind FREUD's back: its bytes no longer match the sha256 it was written with
    head = store.client.head_object(Bucket=store.bucket, Key=store.key("datasets/clip.wav"))
    store.client.put_object(Bucket=store.bucket, Key=store.key("datasets/clip.wav"), Body=b"tampered",
                            Metadata=head["Metadata"])
    with pytest.raises(FreudError, match="does not match its recorded sha256"):
        store.pull()
    assert not (b / "datasets" / "clip.wav").exists()
    assert not list(b.rglob("*.partial"))


def test_fetch_pulls_one_missing_file_on_demand(cluster_env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "datasets" / "c").mkdir(parents=True)
    for name in ("x.wav", "y.wav"):
        (a / "datasets" / "c" / name).write_bytes(name.encode())
    objectstore.store_for(a).push()
    assert objectstore.fetch(b, "datasets/c/x.wav").read_bytes() == b"x.wav"
    assert not (b / "datasets" / "c" / "y.wav").exists()  # only what was asked for
    assert objectstore.fetch(b, "datasets/c").is_dir() and (b / "datasets" / "c" / "y.wav").exists()


def test_threads_fetching_into_one_cache_at_once_keep_every_ledger_entry(cluster_env, tmp_path):
    """The app's callbacks fetch clips into one data directory from several threads: each fetch records what it
    received in the cache's ledger, and none of those entries is lost to another thread's write (a lost entry would
    cost a size-and-sha256 check of that file on the next pull)."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "datasets" / "c").mkdir(parents=True)
    names = [f"clip{i:02d}.wav" for i in range(24)]
    for name in names:
        (a / "datasets" / "c" / name).write_bytes(os.urandom(2000))
    objectstore.store_for(a).push()
    with ThreadPoolExecutor(8) as pool:
        fetched = list(pool.map(lambda n: objectstore.fetch(b, f"datasets/c/{n}"), names))
    assert [p.read_bytes() for p in fetched] == [(a / "datasets" / "c" / n).read_bytes() for n in names]
    ledger = json.loads((b / ".freud-sync.json").read_text())
    assert {f"datasets/c/{n}" for n in names} <= set(ledger)
    assert objectstore.store_for(b).pull().received == 0  # every file known: nothing fetched again


def test_portable_paths_resolve_on_another_machine(tmp_path):
    value = {"checkpoint_dir": str(tmp_path / "a" / "sae" / "r1"), "n": 3,
             "dirs": [str(tmp_path / "a" / "x"), "/elsewhere/y"], "root": str(tmp_path / "a")}
    moved = objectstore.portable(value, tmp_path / "a")
    assert moved == {"checkpoint_dir": "@data/sae/r1", "n": 3, "dirs": ["@data/x", "/elsewhere/y"], "root": "@data/"}
    assert objectstore.localise(moved, tmp_path / "b") == {
        "checkpoint_dir": str(tmp_path / "b" / "sae" / "r1"), "n": 3,
        "dirs": [str(tmp_path / "b" / "x"), "/elsewhere/y"], "root": str(tmp_path / "b")}


def test_merge_state_of_an_index_in_the_bucket(cluster_env):
    from freud_pipeline.features import store

    uri = f"s3://{cluster_env}/lancedb"
    arrays = {"counts": np.arange(5), "values": np.linspace(0, 1, 7, dtype=np.float32)}
    path, digest = store.save_state(uri, "b0001", arrays)
    assert path.startswith(f"s3://{cluster_env}/index_state/")
    loaded = store.load_state({"set_id": "s", "build_id": "b0001", "merge_state": path, "merge_state_sha256": digest})
    assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in arrays.items()}
    with pytest.raises(store.StateError, match="does not match"):
        store.load_state({"set_id": "s", "build_id": "b0001", "merge_state": path, "merge_state_sha256": "0" * 64})
    db = store.connect(uri)  # LanceDB itself in the bucket, reached through FREUD_S3_ENDPOINT_URL alone
    store._delete_state(db, "b0001")
    with pytest.raises(store.StateError, match="unreadable"):
        store.load_state({"set_id": "s", "build_id": "b0001", "merge_state": path, "merge_state_sha256": digest})


def test_a_removed_run_leaves_the_bucket_too(cluster_env, tmp_path, monkeypatch):
    from freud_pipeline.sae.retention import prune_runs

    monkeypatch.setenv("FREUD_DATA_DIR", str(tmp_path / "a"))
    runs = tmp_path / "a" / "sae" / "m-h-topk"
    old, new = "a" * 32, "b" * 32  # MLflow run ids
    for i, run in enumerate((old, new)):
        (runs / run).mkdir(parents=True)
        (runs / run / "cfg.json").write_text('{"d_in": 4, "d_sae": 8}')
        (runs / run / "quality_report.json").write_text(f'{{"completed_at": {1_000_000 + i}}}')
        (runs / run / "sae_weights.safetensors").write_bytes(b"w" * (10 + i))
    objectstore.store_for(tmp_path / "a").push()
    removed = prune_runs(runs, keep_last=1)
    assert removed == [old]
    assert sorted(objectstore.store_for(tmp_path / "a").listing("sae")) == [
        f"sae/m-h-topk/{new}/{name}" for name in ("cfg.json", "quality_report.json", "sae_weights.safetensors")]
    objectstore.store_for(tmp_path / "b").pull()  # another machine's pull does not bring it back
    assert not (tmp_path / "b" / "sae" / "m-h-topk" / old).exists()
    assert (tmp_path / "b" / "sae" / "m-h-topk" / new / "cfg.json").is_file()
