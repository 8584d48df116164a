"""The multi-service path, as a cluster runs it: real PostgreSQL, a real S3-compatible server, Redis and two
dagster-celery workers that share no data directory.

Started here, each in a temporary directory, and stopped at the end: a throw-away PostgreSQL 15 cluster (Debian's
`postgresql`) with one database for the Dagster instance and one for MLflow; moto's S3 server (`moto_server`, from
PyPI: it installs offline) with one bucket; redis-server as the Celery broker. Each worker has its own
FREUD_DATA_DIR (its cache of the bucket) and so has the orchestrating process; nothing else is shared but the
services. The default pipeline slice runs through the Celery executor: a small default corpus, its three activation
partitions, a short SAE run (trained, gated, registered, promoted), the SAE and neuron feature indexes. Then:
runs and events are in PostgreSQL, the MLflow run and model version are in PostgreSQL with their artifacts in the
bucket, shards, checkpoints and the LanceDB index are in the bucket, and the app, started on a fourth empty data
directory, serves a search from the index in the bucket (a real browser).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
import pytest

try:
    from conftest import require_extra
    from services import (bucket, create_database, free_port, postgres_server, redis_server, require_services,
                          s3_environment, s3_server, stop)
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra
    from tests.services import (bucket, create_database, free_port, postgres_server, redis_server, require_services,
                                s3_environment, s3_server, stop)

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
require_extra(bool(shutil.which("redis-server")), "redis-server (apt-get install redis-server)", module_level=True)
require_services(postgres=True, s3=True, module_level=True)

WORKERS = ("freud-c1", "freud-c2")
SUBSET = {"asterisk_prompts": {"config": {"limit": 8, "align": True}},
          "festival_speech": {"config": {"n_sentences": 2}}}
# A short SAE run with the gate's quality thresholds off (this checks the plumbing, not the SAE).
SAE = {"hook": "encoder.blocks.2", "expansion_factor": 2, "k": 8, "lr": 3e-3, "steps": 30, "batch_size": 128,
       "warmup_steps": 2, "log_every": 10, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
       "dead_after_frames": 4096, "device": "cpu", "splice_clips": 0, "min_ce_recovered": None, "max_fvu": None,
       "max_dead_pct": None}

ORCHESTRATE = textwrap.dedent("""
    import json, sys
    import dagster as dg
    from freud_pipeline.defs.executors import reconstructable_job

    broker, subset, sae = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    execution = {"execution": {"config": {"celery": {"broker": broker, "backend": broker}}}}
    instance = dg.DagsterInstance.get()
    runs = []
    def run(job, run_config, **kwargs):
        result = dg.execute_job(reconstructable_job(job), instance=instance, run_config=run_config, **kwargs)
        runs.append({"job": job, "run_id": result.run_id, "success": result.success})
        if not result.success:
            print(json.dumps(runs)); sys.exit(1)
    run("corpus_job", {**execution, "ops": subset})
    for split in ("train", "dev", "test"):
        run("activations_job", execution, tags={"dagster/partition": split})
    run("index_job", {**execution, "ops": {"topk_sae": {"config": sae}}})
    print(json.dumps(runs))
""")


def _query(url: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from freud_pipeline import settings

    root = tmp_path_factory.mktemp("cluster")
    for part in ("pg", "s3", "redis"):
        (root / part).mkdir()
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server(root / "pg"))
        endpoint = stack.enter_context(s3_server(root / "s3"))
        broker = stack.enter_context(redis_server(root / "redis"))
        dagster_db, mlflow_db = create_database(pg, "dagster"), create_database(pg, "mlflow")
        bucket(endpoint, "freud")
        env = {**os.environ,
               "FREUD_DAGSTER_POSTGRES_URL": dagster_db, "MLFLOW_TRACKING_URI": mlflow_db,
               "FREUD_OBJECT_STORE": "s3://freud/data", "FREUD_LANCEDB_URI": "s3://freud/lancedb",
               "FREUD_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_REGION": "us-east-1", "FREUD_EXECUTOR": "celery", "FREUD_CELERY_BROKER": broker,
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ALLOW_HTTP", "FREUD_DATA_DIR"):
            env.pop(key, None)
        home = root / "dagster_home"
        home.mkdir()
        previous = os.environ.get("FREUD_DAGSTER_POSTGRES_URL")
        os.environ["FREUD_DAGSTER_POSTGRES_URL"] = dagster_db
        try:
            (home / "dagster.yaml").write_text(settings.dagster_instance_template())
            # the schema is created once, before the workers start (as a cluster's migration job does): two
            # processes creating it at once on an empty database collide
            dg.DagsterInstance.from_config(str(home)).dispose()
        finally:
            os.environ.pop("FREUD_DAGSTER_POSTGRES_URL") if previous is None else \
                os.environ.__setitem__("FREUD_DAGSTER_POSTGRES_URL", previous)
        env["DAGSTER_HOME"] = str(home)
        config_yaml = root / "celery.yaml"
        config_yaml.write_text(json.dumps({"execution": {"config": {"broker": broker, "backend": broker}}}))
        workers = []
        for name in WORKERS:
            data = root / name
            data.mkdir()
            workers.append(subprocess.Popen(
                [str(VENV_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                 "-y", str(config_yaml), "-n", name, "--", "--pool=solo", "--concurrency=1"],
                env={**env, "FREUD_DATA_DIR": str(data)}, stdout=open(root / f"{name}.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True))
            stack.callback(stop, workers[-1], True)
        yield {"root": root, "env": env, "broker": broker, "workers": workers, "endpoint": endpoint,
               "dagster_db": dagster_db, "mlflow_db": mlflow_db}


def _wait_for_workers(cluster, timeout: float = 150.0) -> None:
    from celery import Celery

    app = Celery(broker=cluster["broker"], backend=cluster["broker"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in cluster["workers"]:
            if proc.poll() is not None:
                logs = "\n".join((cluster["root"] / f"{n}.log").read_text()[-2000:] for n in WORKERS)
                pytest.fail(f"a celery worker exited ({proc.returncode}):\n{logs}")
        if {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply} >= set(WORKERS):
            return
        time.sleep(1.0)
    pytest.fail("celery workers not ready")


def _objects(cluster, prefix: str) -> dict[str, int]:
    import boto3

    client = boto3.client("s3", endpoint_url=cluster["endpoint"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="freud", Prefix=prefix):
        out.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return out


def test_default_slice_on_postgres_s3_and_two_celery_workers(cluster, monkeypatch):
    started = time.time()
    _wait_for_workers(cluster)
    orchestrator = cluster["root"] / "orchestrator"
    orchestrator.mkdir()
    proc = subprocess.run([sys.executable, "-c", ORCHESTRATE, cluster["broker"], json.dumps(SUBSET), json.dumps(SAE)],
                          env={**cluster["env"], "FREUD_DATA_DIR": str(orchestrator)}, capture_output=True,
                          text=True, timeout=1500)
    logs = "\n".join((cluster["root"] / f"{n}.log").read_text()[-3000:] for n in WORKERS)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n{logs}"
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["job"] for r in runs] == ["corpus_job"] + ["activations_job"] * 3 + ["index_job"]
    pipeline_s = time.time() - started

    # --- Dagster: runs, events and the workers that ran the steps are in PostgreSQL
    db = cluster["dagster_db"]
    stored = dict(_query(db, "SELECT run_id, status FROM runs"))
    assert all(stored[r["run_id"]] == "SUCCESS" for r in runs)
    materialised = {row[0] for row in _query(
        db, "SELECT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")}
    for asset in ("default_corpus", "activations", "topk_sae", "sae_feature_index", "neuron_feature_index"):
        assert any(asset in key for key in materialised), asset
    workers_used = set()
    for (event,) in _query(db, "SELECT event FROM event_logs WHERE dagster_event_type = 'ENGINE_EVENT'"):
        if "Celery worker" in event:
            workers_used |= {w for w in WORKERS if w in event}
    assert workers_used == set(WORKERS)  # both workers ran steps

    # --- no shared data directory: each machine's cache holds only what it pulled or wrote; the orchestrator none
    assert not list(orchestrator.rglob("*.arrow"))
    for name in WORKERS:
        assert (cluster["root"] / name).is_dir()

    # --- MLflow: the run and the registered version in PostgreSQL, their artifacts in the bucket
    mlflow_db = cluster["mlflow_db"]
    sae_runs = _query(mlflow_db, "SELECT run_uuid, artifact_uri FROM runs WHERE status = 'FINISHED'")
    assert sae_runs and all(uri.startswith("s3://freud/") for _, uri in sae_runs)
    versions = _query(mlflow_db, "SELECT name, version, run_id FROM model_versions")
    assert versions and {v[2] for v in versions} <= {r[0] for r in sae_runs}
    artifacts = _objects(cluster, "data/mlflow/")  # FREUD_MLFLOW_ARTIFACTS unset: <object store>/mlflow
    assert any(versions[0][2] in key for key in artifacts), sorted(artifacts)[:20]
    assert not any((cluster["root"] / w / "mlflow").exists() for w in WORKERS)  # never pulled into a cache

    # --- the bucket: shards, SAE checkpoint, the LanceDB index and its merge states
    data = _objects(cluster, "data/")
    for split in ("train", "dev", "test"):
        assert f"data/activations/tiny.en/default_corpus/{split}/shards.json" in data
    assert any(k.startswith("data/sae/") and k.endswith("sae_weights.safetensors") for k in data)
    assert any(k.startswith("lancedb/feature_sets.lance/") for k in _objects(cluster, "lancedb/"))
    assert _objects(cluster, "index_state/")

    # --- the app, on an empty data directory of its own, searches the index in the bucket
    from freud_pipeline.features import FeatureIndex

    app_dir = cluster["root"] / "app"
    app_dir.mkdir()
    s3_environment(monkeypatch, cluster["endpoint"])  # for this process's FeatureIndex, undone afterwards
    index = FeatureIndex("s3://freud/lancedb")
    sets = {s["set_id"]: s for s in index.sets()}
    sae_set = next(s for s in sets if "/sae-" in s)
    top = index.top_examples(sae_set, 0, n=3)
    assert top
    _browser_search(cluster, app_dir, sae_set, top[0]["clip_id"])
    print(f"multi-service slice: {pipeline_s:.0f} s of pipeline, {time.time() - started:.0f} s in all")


def _browser_search(cluster, app_dir: Path, set_id: str, clip_id: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**cluster["env"], "FREUD_DATA_DIR": str(app_dir)}
    app = subprocess.Popen([sys.executable, "-m", "dash_app", "--host", "127.0.0.1", "--port", str(port),
                            "--data-dir", str(app_dir)], env=env, stdout=open(app_dir / "app.log", "wb"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=5)
                break
            except OSError:
                if time.time() > deadline or app.poll() is not None:
                    pytest.fail("the app did not start:\n" + (app_dir / "app.log").read_text()[-3000:])
                time.sleep(0.5)
        # the clip's audio comes from the bucket into the app's own cache on first use
        assert urllib.request.urlopen(f"{url}/audio/{clip_id}", timeout=60).read(4) == b"RIFF"
        options = Options()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options)
        try:
            from urllib.parse import quote

            driver.get(f"{url}/search?set={quote(set_id, safe='')}&index=0&n=3")
            try:
                WebDriverWait(driver, 180).until(
                    ec.presence_of_element_located((By.CSS_SELECTOR, "#result-0 .clip-graph .js-plotly-plot")))
            except Exception:
                pytest.fail("no search result drawn in the app: first result:\n" + driver.execute_script(
                    "var r = document.querySelector('#result-0'); return r ? r.outerHTML.slice(0, 4000) : 'none';")
                    + f"\nbrowser log:\n{driver.get_log('browser')}"
                    + "\napp log:\n" + (app_dir / "app.log").read_text()[-4000:])
            assert driver.find_element(By.CSS_SELECTOR, "#feature-card .card-title").text.startswith("Feature 0")
        finally:
            driver.quit()
    finally:
        stop(app, True)
