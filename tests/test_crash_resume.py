"""A crashed run never blocks the next: `freud collect` killed with SIGKILL part-way through a collection (its
step holding the one slot of pool "model"), then run again, frees the dead run's slot, resumes and finishes,
storing every frame exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

pytestmark = pytest.mark.slow

FREUD = str(Path(sys.executable).parent / "freud")
PREPARE = """
from freud_pipeline.cli.services import dagster_home
import dagster as dg
from freud_pipeline.defs.definitions import defs
from freud_pipeline.defs.runner import materialize_asset
dagster_home()
with dg.DagsterInstance.get() as instance:
    for asset, config in [("asterisk_prompts", {"limit": 16, "align": False}), ("festival_speech", {"n_sentences": 2}),
                          ("default_corpus", None)]:
        assert materialize_asset(defs, asset, None, config, instance).success, asset
"""


@pytest.fixture
def corpus_home(tmp_path):
    """A fresh data directory and Dagster instance (pool limits of freud_pipeline/defs/dagster.yaml) with a small corpus."""
    data = tmp_path / "data"
    env = {**os.environ, "FREUD_DATA_DIR": str(data), "DAGSTER_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", PREPARE], env=env, check=True, capture_output=True, timeout=300)
    config = tmp_path / "collect.yaml"
    config.write_text(yaml.safe_dump({"asset": "activations", "partition": "train", "config": {
        "hooks": ["encoder.blocks.1"], "batch_size": 1, "device": "cpu", "frames_per_shard": 1}}))
    return env, config, data / "activations" / "tiny.en" / "default_corpus" / "train"


def test_rerun_after_sigkill_frees_the_dead_runs_slot_and_resumes(corpus_home):
    env, config, shards = corpus_home
    proc = subprocess.Popen([FREUD, "collect", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("shard-*.arrow")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(shards.glob("shard-*.arrow")))
    assert written >= 1, "the kill should land after the first shard"

    rerun = subprocess.run([FREUD, "collect", "--config", str(config)], env=env, capture_output=True, text=True,
                           timeout=180)  # before the fix: "Step blocked by limit for pool model", then a hang
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "activations/train: materialised" in rerun.stdout
    assert "which is gone: marked it failed and freed its pool slots" in rerun.stdout

    from freud_pipeline.activations.reader import ActivationReader

    reader = ActivationReader(shards)
    assert len(reader.paths) > written  # resumed: the killed run's shards kept, the rest added
    pairs = []
    for path in reader.paths:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        pairs += zip(table.column("clip_id").to_pylist(), table.column("frame").to_pylist())
    duplicates = [pair for pair, n in Counter(pairs).items() if n > 1]
    assert not duplicates, duplicates[:5]
    clips = reader.clip_ids()
    assert len(clips) == len(set(clips))
