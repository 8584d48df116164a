"""Operations on real Dagster: the watched-folder sensor and its dynamic partitions, asset checks (blocking),
weekly retraining and index automation, pools, the executor, and failures that must be clear or harmless."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import asterisk_audio

BAD_AUDIO = b"this is not audio at all\n" * 40


def _defs():
    from freud_pipeline.defs.definitions import defs

    return defs


def _storage():
    from freud_pipeline.defs.resources import FreudStorage

    return FreudStorage()  # FREUD_DATA_DIR: the session's data directory


def _tick(instance, cursor=None):
    from freud_pipeline.defs.sensors import new_audio_sensor

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": _storage()})
    return new_audio_sensor(context)


def _apply(instance, result) -> list[str]:
    """What the sensor daemon does with a result's partition requests."""
    keys = [k for request in result.dynamic_partitions_requests for k in request.partition_keys]
    instance.add_dynamic_partitions("incoming_audio", keys)
    return keys


def _write_clip(path: Path, name: str) -> Path:
    from freud_pipeline.audio.decode import write_wav

    return write_wav(path, asterisk_audio(name))


def _metadata(result, asset: str) -> dict:
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset)
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A watched folder with two real recordings (one with a transcript) and one corrupt file."""
    folder = tmp_path_factory.mktemp("incoming")
    _write_clip(folder / "calls" / "one.wav", "auth-thankyou")
    (folder / "calls" / "one.txt").write_text("thank you")
    _write_clip(folder / "two.wav", "vm-goodbye")
    (folder / "broken.wav").write_bytes(BAD_AUDIO)
    (folder / ".hidden.wav").write_bytes(BAD_AUDIO)  # hidden: never a candidate
    return folder


@pytest.fixture(scope="module")
def ops_instance():
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture()
def watch_env(watched, monkeypatch):
    monkeypatch.setenv("FREUD_WATCH_DIR", str(watched))
    monkeypatch.setenv("FREUD_WATCH_SETTLE_S", "0")
    return watched


@pytest.fixture(scope="module")
def first_batch(watched, ops_instance):
    """The first sensor tick over the watched folder, its partition added and its run executed in-process."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FREUD_WATCH_DIR", str(watched))
    mp.setenv("FREUD_WATCH_SETTLE_S", "0")
    try:
        result = _tick(ops_instance)
        keys = _apply(ops_instance, result)
        run = _defs().resolve_job_def("incoming_job").execute_in_process(
            partition_key=keys[0], instance=ops_instance, raise_on_error=False,
            run_config={"ops": {"incoming_audio": {"config": {"align": False}}}})
    finally:
        mp.undo()
    return result, keys, run


# --- sensor, cursor and dynamic partitions -----------------------------------------------------------------


def test_sensor_adds_one_partition_per_batch_and_requests_its_run(first_batch):
    result, keys, _ = first_batch
    assert len(keys) == 1 and len(result.run_requests) == 1
    assert result.run_requests[0].partition_key == keys[0]
    assert result.dynamic_partitions_requests[0].partitions_def_name == "incoming_audio"
    cursor = json.loads(result.cursor)
    assert set(cursor["files"]) == {"calls/one.wav", "two.wav", "broken.wav"}  # .txt and hidden files are not audio
    from freud_pipeline.audio.datasets.incoming import read_batch
    from freud_pipeline.defs.incoming import batches_dir

    assert set(read_batch(batches_dir(_storage()), keys[0])["files"]) == set(cursor["files"])


def test_sensor_cursor_survives_restart_and_sees_only_new_files(first_batch, ops_instance, watch_env, monkeypatch):
    result, keys, _ = first_batch
    again = _tick(ops_instance, result.cursor)
    assert not again.run_requests and "no new files" in again.skip_reason.skip_message
    # A restart with a lost cursor rebuilds it from the batches this instance has: nothing is redone.
    restarted = _tick(ops_instance, None)
    assert not restarted.run_requests
    assert json.loads(restarted.cursor)["files"] == json.loads(result.cursor)["files"]

    # A file still being written waits; once settled it is the only member of the next batch.
    monkeypatch.setenv("FREUD_WATCH_SETTLE_S", "3600")
    _write_clip(watch_env / "three.wav", "vm-message")
    waiting = _tick(ops_instance, restarted.cursor)
    assert not waiting.run_requests and "still being written" in waiting.skip_reason.skip_message
    monkeypatch.setenv("FREUD_WATCH_SETTLE_S", "0")
    later = _tick(ops_instance, waiting.cursor)
    new_keys = _apply(ops_instance, later)
    assert len(new_keys) == 1 and new_keys[0] not in keys
    from freud_pipeline.audio.datasets.incoming import read_batch
    from freud_pipeline.defs.incoming import batches_dir

    assert list(read_batch(batches_dir(_storage()), new_keys[0])["files"]) == ["three.wav"]
    # The same tick evaluated twice (a retry) names the same batch, so Dagster's run_key dedupes it.
    assert _tick(ops_instance, waiting.cursor).run_requests[0].run_key == later.run_requests[0].run_key
    assert set(ops_instance.get_dynamic_partitions("incoming_audio")) == set(keys + new_keys)


def test_sensor_skips_a_missing_watch_folder(ops_instance, tmp_path, monkeypatch):
    monkeypatch.setenv("FREUD_WATCH_DIR", str(tmp_path / "nowhere"))
    result = _tick(ops_instance)
    message = result.skip_message if isinstance(result, dg.SkipReason) else result.skip_reason.skip_message
    assert "does not exist" in message and "FREUD_WATCH_DIR" in message


# --- the incoming partition's run: corrupt file skipped with its reason, checks pass ----------------------


def test_incoming_run_skips_corrupt_file_with_reason_and_collects_the_rest(first_batch):
    _, keys, run = first_batch
    assert run.success
    audio = _metadata(run, "incoming_audio")
    assert audio["n_clips"] == 2 and audio["n_skipped"] == 1
    (skip,) = audio["skipped"]
    assert skip["file"].endswith("broken.wav") and "Error" in skip["reason"]
    acts = _metadata(run, "incoming_activations")
    assert acts["n_clips"] == 2 and acts["n_skipped"] == 0
    checks = _checks(run)
    assert checks["incoming_audio:manifest_valid"].passed
    assert checks["incoming_activations:shards_valid"].passed
    assert checks["incoming_activations:shards_valid"].metadata["n_frame_mismatches"].value == 0
    from freud_pipeline.activations import ActivationReader

    reader = ActivationReader(run.output_for_node("incoming_activations")["directory"])
    assert sorted(reader.clip_ids()) == ["incoming-calls-one.wav", "incoming-two.wav"]


def test_collection_skips_an_unreadable_clip_and_records_why(first_batch, ops_instance, watch_env):
    """A clip whose audio went bad after its manifest was written: skipped with the reason, run succeeds."""
    from freud_pipeline.defs.incoming import incoming_activations, incoming_audio

    _write_clip(watch_env / "four.wav", "vm-sorry")
    _write_clip(watch_env / "five.wav", "vm-review")
    result = _tick(ops_instance)  # a lost cursor: rebuilt from the batches, so only the new files come
    (key,) = _apply(ops_instance, result)
    defs = _defs()
    built = dg.materialize([incoming_audio], partition_key=key, instance=ops_instance, resources=defs.resources,
                           run_config={"ops": {"incoming_audio": {"config": {"align": False}}}})
    manifest = pd.read_parquet(built.output_for_node("incoming_audio")["manifest_path"])
    victim = manifest.iloc[0]
    (_storage().root / victim["path"]).write_bytes(BAD_AUDIO)

    run = dg.materialize([incoming_audio, incoming_activations], selection=[incoming_activations],
                         partition_key=key, instance=ops_instance, resources=defs.resources)
    assert run.success
    meta = _metadata(run, "incoming_activations")
    assert meta["n_clips"] == len(manifest) - 1 and meta["n_skipped"] == 1
    assert meta["skipped"][0]["clip_id"] == victim["clip_id"] and meta["skipped"][0]["reason"]


# --- blocking checks ---------------------------------------------------------------------------------------


def _inject_nan(directory: Path) -> None:
    """Overwrite some activation values of the first shard with NaN, keeping its schema and metadata."""
    from freud_pipeline.activations.writer import shard_files

    path = shard_files(directory)[0]
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    name = next(n for n in table.column_names if n.startswith("act:"))
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).copy()
    values[:10] = np.nan
    poisoned = pa.FixedSizeListArray.from_arrays(pa.array(values, column.type.value_type), column.type.list_size)
    table = table.set_column(table.column_names.index(name), table.schema.field(name), poisoned)
    tmp = path.with_name(".poisoned.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def test_failing_blocking_shard_check_stops_downstream_asset(first_batch, ops_instance):
    from freud_pipeline.defs.checks import incoming_activations_shards
    from freud_pipeline.defs.incoming import incoming_activations, incoming_audio, incoming_partitions

    _, keys, run = first_batch

    @dg.asset(partitions_def=incoming_partitions)
    def incoming_consumer(incoming_activations: dict) -> int:  # stands for anything reading the shards
        return 1

    _inject_nan(Path(run.output_for_node("incoming_activations")["directory"]))
    result = dg.materialize(
        [incoming_audio, incoming_activations, incoming_activations_shards, incoming_consumer],
        selection=[incoming_activations, incoming_consumer], partition_key=keys[0], instance=ops_instance,
        resources=_defs().resources, raise_on_error=False)
    assert not result.success
    check = _checks(result)["incoming_activations:shards_valid"]
    assert not check.passed and check.metadata["n_non_finite"].value == 10
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "incoming_activations" in materialised and "incoming_consumer" not in materialised
    assert keys[0] not in ops_instance.get_materialized_partitions(dg.AssetKey("incoming_consumer"))


def test_manifest_check_names_missing_files_and_bad_durations(tmp_path):
    from freud_pipeline.audio.datasets.manifest import MANIFEST_SCHEMA
    from freud_pipeline.validation import check_manifest

    _write_clip(tmp_path / "audio" / "ok.wav", "auth-thankyou")
    rows = [
        {"clip_id": "a", "path": "audio/ok.wav", "duration_s": 1.0, "sample_rate": 16000, "transcript": "",
         "speaker": "s", "source": "t", "split": "train"},
        {"clip_id": "b", "path": "audio/gone.wav", "duration_s": -1.0, "sample_rate": 16000, "transcript": "",
         "speaker": "s", "source": "t", "split": "dev"},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp_path / "manifest.parquet")
    outcome = check_manifest(tmp_path / "manifest.parquet", tmp_path)
    assert not outcome.passed
    assert outcome.metadata["missing_files"] == ["audio/gone.wav"] and outcome.metadata["n_bad_durations"] == 1
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=MANIFEST_SCHEMA).drop(["speaker"]), tmp_path / "m2.parquet")
    assert "missing columns ['speaker']" in check_manifest(tmp_path / "m2.parquet", tmp_path).description


def test_shard_check_compares_frames_with_durations(first_batch):
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.validation import check_shards, expected_frames

    _, _, run = first_batch
    manifest = load_manifest(run.output_for_node("incoming_audio")["manifest_path"])
    assert expected_frames(0.02) == 1 and expected_frames(0.0201) == 2 and expected_frames(45.0) == 2250
    wrong = manifest.assign(duration_s=manifest["duration_s"] + 1.0)
    outcome = check_shards(run.output_for_node("incoming_activations")["directory"], wrong)
    assert not outcome.passed and outcome.metadata["n_frame_mismatches"] == len(manifest)


def test_index_check_counts_rows_and_requires_scalar_indexes(tmp_path):
    from freud_pipeline.features import store
    from freud_pipeline.features.build import build_feature_set
    from freud_pipeline.validation import check_feature_set

    rng = np.random.default_rng(0)
    clips = [(f"c{i}", rng.standard_normal((20, 16)).astype(np.float32)) for i in range(6)]
    uri = str(tmp_path / "lancedb")
    manifest = pd.DataFrame([{"clip_id": cid, "path": f"{cid}.wav", "duration_s": 0.4, "sample_rate": 16000,
                              "transcript": "", "speaker": "s", "source": "t", "split": "train"} for cid, _ in clips])
    build_feature_set(iter(clips), set_id="m/h", model="m", hook="h", kind="neuron", manifest_df=manifest,
                      index_uri=uri, top_k=4, trace_radius=5)
    ok = check_feature_set(uri, "m/h", 16)
    assert ok.passed, ok.description
    assert not check_feature_set(uri, "m/h", 32).passed  # dictionary size differs
    db = store.connect(uri)
    build = ok.metadata["build_id"]
    db.open_table(store.FEATURES).delete(f"build_id = {store.sql_str(build)} AND index = 3")
    broken = check_feature_set(uri, "m/h", 16)
    assert not broken.passed and "15 rows" in broken.description
    assert not check_feature_set(uri, "other/set").passed


# --- retraining schedule and index automation --------------------------------------------------------------


def test_weekly_retraining_cron_and_run_config(monkeypatch, tmp_path):
    from freud_pipeline.defs.schedules import build_weekly_retraining
    from freud_pipeline.errors import FreudError

    monkeypatch.setenv("FREUD_RETRAIN_CRON", "15 4 * * 2")
    (tmp_path / "retrain.yaml").write_text("steps: 50\nk: 16\n")
    monkeypatch.setenv("FREUD_RETRAIN_CONFIG", str(tmp_path / "retrain.yaml"))
    schedule = build_weekly_retraining()
    assert schedule.cron_schedule == "15 4 * * 2" and schedule.job_name == "sae_retrain_job"
    with dg.instance_for_test() as instance:
        (request,) = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources={"storage": _storage()})).run_requests
    config = request.run_config["ops"]["topk_sae"]["config"]
    assert config["steps"] == 50 and config["k"] == 16
    job = _defs().resolve_job_def("sae_retrain_job")
    assert dg.validate_run_config(job, request.run_config)
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"topk_sae"}
    monkeypatch.setenv("FREUD_RETRAIN_CRON", "every tuesday")
    with pytest.raises(FreudError, match="FREUD_RETRAIN_CRON"):
        build_weekly_retraining()
    monkeypatch.delenv("FREUD_RETRAIN_CRON")
    assert _defs().resolve_schedule_def("weekly_retraining").cron_schedule == "0 3 * * 1"


def _retrain(instance, quality_passes: bool) -> None:
    """What a sae_retrain_job run leaves in the instance: topk_sae materialised, then its blocking sae_quality
    check evaluated against that materialisation (stand-ins: training itself is tested elsewhere)."""

    @dg.asset(name="topk_sae")
    def stub_sae() -> dict:
        return {}

    @dg.asset_check(asset=stub_sae, name="sae_quality", blocking=True)
    def stub_quality() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=quality_passes)

    dg.materialize([stub_sae, stub_quality], instance=instance, raise_on_error=False)


def test_sae_feature_index_rebuilds_when_a_new_sae_lands():
    defs = _defs()
    index = dg.AssetKey("sae_feature_index")

    def tick(cursor):
        result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
        return result.get_num_requested(index), result.get_num_requested(dg.AssetKey("neuron_feature_index")), \
            result.cursor

    with dg.instance_for_test() as instance:
        _, _, cursor = tick(None)
        for split in ("train", "dev", "test"):
            instance.report_runless_asset_event(dg.AssetMaterialization("activations", partition=split))
        for key in ("asterisk_prompts", "festival_speech", "default_corpus"):
            instance.report_runless_asset_event(dg.AssetMaterialization(key))
        _retrain(instance, True)
        instance.report_runless_asset_event(dg.AssetMaterialization("sae_feature_index"))
        n, _, cursor = tick(cursor)
        assert n == 0  # everything current
        _retrain(instance, False)  # a retrained SAE that fails its quality gate: the index stays as it is
        n, _, cursor = tick(cursor)
        assert n == 0
        _retrain(instance, True)  # the next weekly retrain lands and passes
        n, n_neurons, cursor = tick(cursor)
        assert n == 1 and n_neurons == 0  # the neuron index does not depend on the SAE
        n, _, cursor = tick(cursor)
        assert n == 0  # requested once, not on every tick
    sensor = defs.resolve_sensor_def("automation_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


# --- pools, instance template, executor --------------------------------------------------------------------


def test_dagster_home_gets_pool_limits_once(tmp_path, monkeypatch):
    from freud_pipeline.cli.services import dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = dagster_home()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster_home()
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"  # an operator's file is kept
    graph = _defs().resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys() if graph.get(k).is_executable}
    assert pools["activations"] == {"model"} and pools["topk_sae"] == {"model"}
    assert pools["incoming_activations"] == {"model"}
    assert pools["neuron_feature_index"] == pools["sae_feature_index"] == {"lancedb_writer"}


def test_executor_is_chosen_by_run_config(monkeypatch):
    from freud_pipeline.defs.executors import default_executor_config, freud_executor
    from freud_pipeline.errors import FreudError

    job = _defs().resolve_job_def("activations_job")
    assert job.executor_def.name == "freud"
    for execution in ({"multiprocess": {"max_concurrent": 2}}, {"in_process": {}},
                      {"celery": {"broker": "redis://127.0.0.1:1/0", "backend": "redis://127.0.0.1:1/0"}}):
        assert dg.validate_run_config(job, {"execution": {"config": execution}})
    monkeypatch.setenv("FREUD_EXECUTOR", "celery")
    monkeypatch.setenv("FREUD_CELERY_BROKER", "redis://10.0.0.1:6379/1")
    assert default_executor_config() == {"celery": {"broker": "redis://10.0.0.1:6379/1",
                                                     "backend": "redis://10.0.0.1:6379/1"}}
    assert freud_executor().config_schema.default_value == default_executor_config()
    monkeypatch.setenv("FREUD_EXECUTOR", "spark")
    with pytest.raises(FreudError, match="multiprocess, in_process, celery"):
        default_executor_config()


def test_multiprocess_executor_runs_an_incoming_partition(tmp_path):
    """The same definitions on the multiprocess executor: each step in its own process, persistent instance."""
    from freud_pipeline.audio.datasets.incoming import batch_key, scan_folder, write_batch
    from freud_pipeline.defs.executors import reconstructable_job
    from freud_pipeline.defs.incoming import batches_dir

    _write_clip(tmp_path / "mp" / "six.wav", "vm-goodbye")
    files = scan_folder(tmp_path / "mp")
    key = batch_key(files)
    write_batch(batches_dir(_storage()), key, tmp_path / "mp", files)
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        instance.add_dynamic_partitions("incoming_audio", [key])
        result = dg.execute_job(
            reconstructable_job("incoming_job"), instance=instance, tags={"dagster/partition": key},
            run_config={"execution": {"config": {"multiprocess": {
                "max_concurrent": 2,
                # children fork from a server that imported torch and the definitions once
                "start_method": {"forkserver": {"preload_modules": ["freud_pipeline.defs.definitions"]}}}}},
                        "ops": {"incoming_audio": {"config": {"align": False}}}})
        assert result.success
        starts = [e for e in result.all_events if e.event_type_value == "STEP_START"]
        assert len({e.pid for e in starts}) == len(starts) >= 4  # 2 assets + 2 checks, each in its own process


# --- clear failures ----------------------------------------------------------------------------------------


def test_low_disk_space_fails_collection_with_a_clear_message(first_batch, ops_instance, monkeypatch):
    from freud_pipeline.defs.incoming import incoming_activations, incoming_audio
    from freud_pipeline.diskspace import InsufficientSpaceError, require_free_space

    _, keys, _ = first_batch
    monkeypatch.setenv("FREUD_MIN_FREE_MB", str(10**12))  # a margin no disk has
    with pytest.raises(InsufficientSpaceError, match="FREUD_MIN_FREE_MB"):
        require_free_space(_storage().root / "not" / "yet" / "there")
    result = dg.materialize([incoming_audio, incoming_activations], selection=[incoming_activations],
                            partition_key=keys[0], instance=ops_instance, resources=_defs().resources,
                            raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.step_failure_data.error)
    assert "InsufficientSpaceError" in message and "GiB free" in message and "FREUD_DATA_DIR" in message


def test_missing_watch_folder_fails_the_batch_with_a_clear_message(ops_instance, tmp_path):
    from freud_pipeline.audio.datasets.incoming import write_batch
    from freud_pipeline.defs.incoming import batches_dir, incoming_audio

    gone = tmp_path / "unmounted"
    write_batch(batches_dir(_storage()), "19700101T000000-gone", gone, {"a.wav": (10, 0)})
    ops_instance.add_dynamic_partitions("incoming_audio", ["19700101T000000-gone"])
    result = dg.materialize([incoming_audio], partition_key="19700101T000000-gone", instance=ops_instance,
                            resources=_defs().resources, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert f"the watched folder {gone} does not exist" in str(failure.step_failure_data.error)
