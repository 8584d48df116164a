"""Scale-out: the same definitions on dagster-celery with a Redis broker and two `dagster-celery worker`s.

A small subset of the embedded corpus is built and its three split partitions collected twice: in-process (the
reference) and through Celery, each into its own data directory. The workers see only the broker, the
Dagster instance (by reference) and their data directory, as machines sharing a volume would. Every process
this test starts (redis-server on a free loopback port, the workers) is stopped by it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml

try:
    from conftest import require_extra
    from services import redis_server, stop
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra
    from tests.services import redis_server, stop

pytestmark = pytest.mark.slow

REDIS_SERVER = shutil.which("redis-server")
VENV_BIN = Path(sys.executable).parent
HAVE_CELERY = importlib.util.find_spec("dagster_celery") is not None and importlib.util.find_spec("redis") is not None
require_extra(bool(REDIS_SERVER and HAVE_CELERY), "redis-server (apt-get install redis-server) or dagster-celery + "
              "redis in the venv (docs/OPERATING.md, 'dagster-celery with Redis')", module_level=True)

SPLITS = ("train", "dev", "test")
SUBSET = {"asterisk_prompts": {"config": {"limit": 8, "align": False}},
          "festival_speech": {"config": {"n_sentences": 2}}}
WORKERS = ("freud-w1", "freud-w2")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def celery_setup(redis_url, tmp_path_factory):
    """A persistent instance, a data directory for the workers, and two workers listening on the broker."""
    root = tmp_path_factory.mktemp("celery")
    home, data = root / "dagster_home", root / "data"
    home.mkdir()
    data.mkdir()
    config_yaml = root / "celery.yaml"
    config_yaml.write_text(yaml.safe_dump({"execution": {"config": {"broker": redis_url, "backend": redis_url}}}))
    with dg.instance_for_test(temp_dir=str(home)) as instance:  # writes home/dagster.yaml for the workers too
        env = {**os.environ, "DAGSTER_HOME": str(home), "FREUD_DATA_DIR": str(data),
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        workers = []
        try:
            for name in WORKERS:
                log = open(root / f"{name}.log", "wb")
                workers.append(subprocess.Popen(
                    [str(VENV_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                     "-y", str(config_yaml), "-n", name, "--", "--pool=solo", "--concurrency=1"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            yield {"instance": instance, "data": data, "broker": redis_url, "workers": workers, "root": root}
        finally:
            for proc in workers:
                stop(proc, group=True)


def _wait_for_workers(broker: str, workers: list, root: Path, timeout: float = 150.0) -> set[str]:
    from celery import Celery

    app = Celery(broker=broker, backend=broker)
    deadline = time.time() + timeout
    ready: set[str] = set()
    while time.time() < deadline:
        for proc in workers:
            if proc.poll() is not None:
                logs = "\n".join((root / f"{n}.log").read_text()[-1500:] for n in WORKERS)
                pytest.fail(f"a celery worker exited ({proc.returncode}):\n{logs}")
        ready = {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply}
        if ready >= set(WORKERS):
            return ready
        time.sleep(1.0)
    pytest.fail(f"workers not ready after {timeout:.0f} s (ready: {sorted(ready)})")


def _reference(data_dir: Path) -> None:
    """The same assets in-process into another data directory."""
    from freud_pipeline.defs import definitions as d
    from freud_pipeline.defs.resources import FreudStorage

    local = dg.Definitions(
        assets=d.CORPUS_ASSETS + d.ACTIVATION_ASSETS, jobs=[d.corpus_job, d.activations_job],
        resources={"storage": FreudStorage(data_dir=str(data_dir)),
                   "io_manager": dg.FilesystemIOManager(base_dir=str(data_dir / "dagster_storage"))})
    with dg.instance_for_test() as instance:
        assert local.resolve_job_def("corpus_job").execute_in_process(
            run_config={"ops": SUBSET}, instance=instance).success
        for split in SPLITS:
            assert local.resolve_job_def("activations_job").execute_in_process(
                partition_key=split, instance=instance).success


def _celery_workers_used(instance, run_ids) -> set[str]:
    names = set()
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is not None and event.event_type_value == "ENGINE_EVENT" and event.engine_event_data:
                worker = event.engine_event_data.metadata.get("Celery worker")
                if worker is not None:
                    names.add(str(worker.value).split("@")[0])
    return names


def test_celery_collection_matches_in_process(celery_setup, tmp_path):
    from freud_pipeline.activations import ActivationReader
    from freud_pipeline.activations.writer import shard_files
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.defs.executors import reconstructable_job

    setup, instance = celery_setup, celery_setup["instance"]
    started = time.time()
    reference_dir = tmp_path / "in_process"
    with ThreadPoolExecutor(1) as pool:  # the reference runs while the workers start
        reference = pool.submit(_reference, reference_dir)
        _wait_for_workers(setup["broker"], setup["workers"], setup["root"])
        reference.result()

    execution = {"execution": {"config": {"celery": {"broker": setup["broker"], "backend": setup["broker"]}}}}
    corpus = dg.execute_job(reconstructable_job("corpus_job"), instance=instance,
                            run_config={**execution, "ops": SUBSET})
    assert corpus.success

    outcomes = {}
    for split in SPLITS:  # one run per partition, as a backfill launches them; each step a Celery task
        result = dg.execute_job(reconstructable_job("activations_job"), instance=instance, run_config=execution,
                                tags={"dagster/partition": split})
        assert result.success, split
        outcomes[split] = (result.success, result.run_id)
    run_ids = [corpus.run_id] + [run_id for _, run_id in outcomes.values()]
    assert _celery_workers_used(instance, run_ids) == set(WORKERS)
    # The blocking shard checks ran (on the workers) and passed for every partition.
    for split, (_, run_id) in outcomes.items():
        evaluations = [e.dagster_event.event_specific_data for e in instance.all_logs(run_id)
                       if e.dagster_event is not None and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert [(c.check_name, c.passed) for c in evaluations] == [("shards_valid", True)], split

    # Festival's synthesis is not bit-reproducible between two runs, so only clips whose audio files are
    # byte-identical on both sides are compared value by value (all Asterisk prompts); the rest by shape.
    manifest = load_manifest(setup["data"] / "datasets" / "default_corpus" / "manifest.parquet")
    same_audio = {row.clip_id: (setup["data"] / row.path).read_bytes() == (reference_dir / row.path).read_bytes()
                  for row in manifest.itertuples()}
    total, compared = 0, set()
    for split in SPLITS:
        ours_dir = setup["data"] / "activations" / "tiny.en" / "default_corpus" / split
        ref_dir = reference_dir / "activations" / "tiny.en" / "default_corpus" / split
        if not shard_files(ref_dir):  # a split the subset left empty: empty on both sides
            assert not shard_files(ours_dir)
            continue
        ours, ref = ActivationReader(ours_dir), ActivationReader(ref_dir)
        assert sorted(ours.clip_ids()) == sorted(ref.clip_ids())
        total += len(ref.clip_ids())
        for hook in ref.hooks:
            expected = dict(ref.iter_clips(hook))
            for clip_id, acts in ours.iter_clips(hook):
                assert acts.shape == expected[clip_id].shape, clip_id
                if not same_audio[clip_id]:
                    continue
                np.testing.assert_allclose(acts.astype(np.float32), expected[clip_id].astype(np.float32),
                                           rtol=1e-2, atol=1e-2, err_msg=f"{split}/{clip_id}/{hook}")
                compared.add(clip_id)
    assert total == len(manifest) and len(compared) >= 8  # every Asterisk clip (a real recording) compared
    print(f"celery collection of 3 partitions + corpus: {time.time() - started:.0f} s")
