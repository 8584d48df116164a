"""The cluster's stores on real services, chosen by configuration alone: the Dagster instance (runs, event logs,
schedules, sensor cursors) and the MLflow tracking store + model registry on a throw-away PostgreSQL, MLflow
artifacts in an S3 bucket (moto). The services come from tests/services.py and start once for the module."""

from __future__ import annotations

import json

import dagster as dg
import pytest

try:
    from services import (bucket, create_database, postgres_server, query, require_services, s3_environment,
                          s3_client, s3_server)
except ImportError:  # tests collected as a package
    from tests.services import (bucket, create_database, postgres_server, query, require_services, s3_environment,
                                s3_client, s3_server)

require_services(postgres=True, module_level=True)



@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    require_services(s3=True)
    with s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


def test_dagster_instance_lives_in_postgres(postgres, tmp_path, monkeypatch):
    from freud_pipeline.cli.services import dagster_home

    db = create_database(postgres, "dagster")
    monkeypatch.setenv("FREUD_DAGSTER_POSTGRES_URL", db)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = dagster_home()  # writes the shipped template, which now names the setting
    text = (home / "dagster.yaml").read_text()
    assert "env: FREUD_DAGSTER_POSTGRES_URL" in text and db not in text  # the URL (a password) stays off disk

    @dg.asset
    def tiny_asset() -> int:
        return 1

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert [type(s).__name__ for s in (instance.run_storage, instance.event_log_storage,
                                           instance.schedule_storage)] == \
            ["PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1  # the template's pools kept
        result = dg.materialize([tiny_asset], instance=instance)
    assert result.success
    assert query(db, "SELECT status FROM runs WHERE run_id = %s", (result.run_id,)) == [("SUCCESS",)]
    events = query(db, "SELECT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                   (result.run_id, "ASSET_MATERIALIZATION"))
    assert len(events) == 1 and json.loads(events[0][0]) == ["tiny_asset"]
    tables = {row[0] for row in query(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"instigators", "job_ticks"} <= tables  # schedule and sensor state (cursors) live there too


def test_mlflow_tracks_in_postgres_with_artifacts_in_the_bucket(postgres, s3, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from freud_pipeline.sae.registry import register_checkpoint, registered_model_name
    from freud_pipeline.sae.tracking import TrainingRun

    db = create_database(postgres, "mlflow")
    bucket(s3, "freud")
    s3_environment(monkeypatch, s3, FREUD_OBJECT_STORE="s3://freud/cluster")
    monkeypatch.delenv("FREUD_MLFLOW_ARTIFACTS", raising=False)

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "cfg.json").write_text('{"d_in": 384, "d_sae": 1536}')
    with TrainingRun(db, "freud-cluster", "on-postgres", {"freud.test": "stores"}) as run:
        run.log_metrics({"train/fvu": 0.25}, step=3)
        run.log_artifact(checkpoint, "checkpoint")
    name = registered_model_name("tiny.en", "encoder.blocks.2", "topk")
    assert register_checkpoint(run.client, name, run.run_id, tags={"dataset_version": "stores"}) == "1"

    location = "s3://freud/cluster/mlflow/freud-cluster"  # objectstore.mlflow_artifact_root() + the experiment
    assert query(db, "SELECT artifact_location FROM experiments WHERE name = %s", ("freud-cluster",)) == [(location,)]
    assert query(db, "SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", (run.run_id,)) == \
        [("FINISHED", f"{location}/{run.run_id}/artifacts")]
    assert query(db, "SELECT value, step FROM metrics WHERE run_uuid = %s AND key = %s",
                 (run.run_id, "train/fvu")) == [(0.25, 3)]
    assert query(db, "SELECT name FROM registered_models") == [(name,)]
    assert query(db, "SELECT version, run_id, source FROM model_versions WHERE name = %s", (name,)) == \
        [(1, run.run_id, f"runs:/{run.run_id}/checkpoint")]

    key = f"cluster/mlflow/freud-cluster/{run.run_id}/artifacts/checkpoint/cfg.json"
    listed = s3_client(s3).list_objects_v2(Bucket="freud", Prefix="cluster/mlflow/")
    assert [item["Key"] for item in listed.get("Contents", [])] == [key]
    # Any other machine reads it back through MLflow, from the bucket.
    got = MlflowClient(db).download_artifacts(run.run_id, "checkpoint", str(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "checkpoint" / "cfg.json").read_text()) == {"d_in": 384, "d_sae": 1536}
    assert got.endswith("checkpoint")
