"""Retraining that sees new data: the weekly schedule trains on the default corpus plus every incoming batch (each
split by clip into training and held-out frames), records the partitions as the MLflow run's datasets, and skips a
tick with nothing new. Real tiny.en activations of Asterisk prompts, a real Dagster instance and MLflow store, a
few training steps."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from freud_pipeline.sae.selection import (
    INCOMING_DATASET,
    TrainingSelection,
    activations_dir,
    default_selection,
    heldout_clip,
)
from freud_pipeline.sae.sources import FrameStream, ShardFrameSource

try:
    from conftest import asterisk_audio
except ImportError:  # tests collected as a package
    from tests.conftest import asterisk_audio

HOOK = "encoder.blocks.2"
CORPUS = {"train": ["vm-options", "vm-message", "vm-savedto"], "dev": ["vm-review"], "test": ["vm-deleted"]}
# Batches as the sensor names them (<newest mtime>-<hash>); in each, sha1(clip_id) holds one or two clips out.
BATCHES = {"20250101T000000-aaaa": ["vm-goodbye", "vm-intro", "vm-login"],
           "20250108T000000-bbbb": ["vm-sorry", "vm-password"]}
RETRAIN = """hook: encoder.blocks.2
expansion_factor: 2
k: 8
steps: 6
batch_size: 64
warmup_steps: 2
log_every: 3
eval_every: 0
eval_batches: 1
checkpoint_every: 0
dead_after_frames: 1024
device: cpu
splice_clips: 0
min_ce_recovered: null
max_fvu: null
max_dead_pct: null
"""


def _rows(root: Path, names: list[str], split: str, folder: str) -> list[dict]:
    from freud_pipeline.audio.decode import write_wav

    rows = []
    for name in names:
        audio = asterisk_audio(name)
        write_wav(root / "datasets" / folder / f"{name}.wav", audio)
        rows.append({"clip_id": name, "path": f"datasets/{folder}/{name}.wav", "duration_s": len(audio) / 16000,
                     "sample_rate": 16000, "transcript": "", "speaker": "allison", "source": folder, "split": split})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data directory with the default corpus' train/dev activations materialised by the real `activations`
    asset (in a Dagster instance), the first incoming batch's activations collected, and the retraining config."""
    from freud_pipeline.audio.datasets.manifest import write_manifest
    from freud_pipeline.defs.activations import activations
    from freud_pipeline.defs.resources import FreudStorage, MlflowTracking
    from freud_pipeline.defs.sae import topk_sae
    from freud_pipeline.defs.schedules import sae_retrain_job

    root = tmp_path_factory.mktemp("retraining")
    manifest = write_manifest([r for split, names in CORPUS.items() for r in _rows(root, names, split, "corpus")],
                              root / "datasets" / "corpus" / "manifest.parquet")

    @dg.asset(name="default_corpus")
    def corpus() -> dict:
        return {"manifest_path": str(manifest)}

    storage = FreudStorage(data_dir=str(root))
    resources = {"storage": storage, "mlflow": MlflowTracking(storage=storage),
                 "io_manager": dg.FilesystemIOManager(base_dir=str(root / "dagster_storage"))}
    defs = dg.Definitions(assets=[corpus, activations, topk_sae], jobs=[sae_retrain_job], resources=resources)
    (root / "retrain.yaml").write_text(RETRAIN)
    env = pytest.MonkeyPatch()
    env.setenv("FREUD_RETRAIN_CONFIG", str(root / "retrain.yaml"))
    with dg.instance_for_test() as instance:
        assert dg.materialize([corpus], instance=instance, resources=resources).success
        for split in CORPUS:
            assert dg.materialize([corpus, activations], selection=[activations], partition_key=split,
                                  instance=instance, resources=resources, run_config={"ops": {"activations": {
                                      "config": {"hooks": [HOOK], "device": "cpu"}}}}).success
        world = {"root": root, "storage": storage, "defs": defs, "instance": instance,
                 "corpus_dirs": {s: activations_dir(root, "tiny.en", "default_corpus", s) for s in CORPUS}}
        _collect_batch(world, "20250101T000000-aaaa")
        yield world
    env.undo()


def _collect_batch(world, key: str) -> Path:
    """What `incoming_activations` leaves for a batch: its shards under activations/<model>/incoming_audio/<key>."""
    import pandas as pd

    from freud_pipeline.activations.collect import collect_activations

    rows = pd.DataFrame(_rows(world["root"], BATCHES[key], "train", f"{INCOMING_DATASET}/{key}"))
    directory = activations_dir(world["root"], "tiny.en", INCOMING_DATASET, key)
    collect_activations(rows, directory, model="tiny.en", hooks=[HOOK], device="cpu", data_root=world["root"],
                        batch_size=2)
    return directory


def _tick(world):
    from freud_pipeline.defs.schedules import weekly_retraining

    context = dg.build_schedule_context(instance=world["instance"], resources={"storage": world["storage"]})
    return weekly_retraining.evaluate_tick(context)


def _selection(world):
    return default_selection(world["root"], "tiny.en", world["corpus_dirs"], hook=HOOK)


def test_retraining_trains_on_new_batches_and_skips_when_nothing_is_new(world):
    from freud_pipeline.sae.run import SELECTION_TAG

    selection = _selection(world)
    assert [(p.dataset, p.partition, p.use) for p in selection.partitions] == [
        ("default_corpus", "train", "train"), ("default_corpus", "dev", "eval"),
        (INCOMING_DATASET, "20250101T000000-aaaa", "split")]

    # New data (the first run ever, with a batch present): the schedule asks for a run, tagged with the selection.
    (request,) = _tick(world).run_requests
    assert request.tags[SELECTION_TAG] == selection.digest
    run = world["defs"].resolve_job_def("sae_retrain_job").execute_in_process(
        run_config=request.run_config, instance=world["instance"], tags=request.tags)
    assert run.success
    output = run.output_for_node("topk_sae")
    assert output["selection_digest"] == selection.digest
    assert {(s["dataset"], s["partition"]) for s in output["selection"]} == {
        ("default_corpus", "train"), ("default_corpus", "dev"), (INCOMING_DATASET, "20250101T000000-aaaa")}
    event = run.get_asset_materialization_events()[0].materialization
    assert event.metadata["selection_digest"].value == selection.digest

    # The MLflow run records every partition as an input dataset, the batch's with both uses, and the digest.
    mlflow_run = MlflowClient(world["storage"].tracking_uri).get_run(output["run_id"])
    assert mlflow_run.data.tags[SELECTION_TAG] == selection.digest
    inputs = {i.dataset.name: i for i in mlflow_run.inputs.dataset_inputs}
    assert set(inputs) == {"default_corpus/train", "default_corpus/dev", f"{INCOMING_DATASET}/20250101T000000-aaaa"}
    batch = inputs[f"{INCOMING_DATASET}/20250101T000000-aaaa"]
    tags = {t.key: t.value for t in batch.tags}
    assert tags["mlflow.data.context"] == "training+evaluation" and tags[SELECTION_TAG] == selection.digest
    assert batch.dataset.digest == selection.partitions[2].shards_digest[:36]
    assert batch.dataset.source == f'{{"uri": "{selection.partitions[2].directory}"}}'
    assert {t.value for i in inputs.values() for t in i.tags if t.key == "mlflow.data.context"} == {
        "training", "evaluation", "training+evaluation"}

    # Nothing new since: skipped, naming the run it would repeat.
    result = _tick(world)
    assert not result.run_requests
    assert result.skip_message.startswith(f"no new data since run {run.run_id} (selection {selection.digest[:12]})")

    # A second batch arrives: the next tick runs again, on a selection that holds both batches.
    _collect_batch(world, "20250108T000000-bbbb")
    (again,) = _tick(world).run_requests
    grown = _selection(world)
    assert again.tags[SELECTION_TAG] == grown.digest != selection.digest
    assert [p.partition for p in grown.partitions][2:] == list(BATCHES)


def test_incoming_batches_are_split_by_clip_into_training_and_held_out_frames(world):
    from freud_pipeline.activations.reader import ActivationReader

    key = "20250101T000000-aaaa"
    reader = ActivationReader(activations_dir(world["root"], "tiny.en", INCOMING_DATASET, key))
    clips = dict(reader.iter_clips(HOOK, dtype=np.float32))
    held = {c for c in clips if heldout_clip(c)}
    assert held == {"vm-intro"} and set(clips) - held == {"vm-goodbye", "vm-login"}

    selection = _selection(world)
    selection = TrainingSelection(selection.model, selection.partitions[:3])  # the corpus and the first batch
    batch_only = TrainingSelection(selection.model, selection.partitions[2:])
    assert batch_only.partitions[0].partition == key

    for source, names in ((batch_only.train_source(), {"vm-goodbye", "vm-login"}),
                          (batch_only.eval_source(), {"vm-intro"})):
        every_frame = next(iter(source.random_frames(HOOK, 10**6, seed=0)))  # one batch: all, in storage order
        np.testing.assert_array_equal(every_frame.numpy(), np.concatenate([clips[n] for n in clips if n in names]))
    # The default corpus' dev split and the held-out clips evaluate; its train split and the rest train.
    train, heldout = selection.train_source(), selection.eval_source()
    corpus = {s: ActivationReader(d).n_frames for s, d in world["corpus_dirs"].items()}
    assert train.n_frames == corpus["train"] + len(clips["vm-goodbye"]) + len(clips["vm-login"])
    assert heldout.n_frames == corpus["dev"] + len(clips["vm-intro"])


def test_shard_frame_source_replays_exactly_and_matches_a_single_reader(world):
    from freud_pipeline.activations.reader import ActivationReader

    source = _selection(world).train_source()
    first = [b.clone() for b, _ in zip(source.random_frames(HOOK, 32, seed=7), range(9))]
    again = [b for b, _ in zip(source.random_frames(HOOK, 32, seed=7), range(9))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], next(iter(source.random_frames(HOOK, 32, seed=8))))
    resumed = FrameStream(source, HOOK, 32, seed=7, skip=5)  # what a resumed run does: replay to the same place
    assert all(torch.equal(next(resumed), b) for b in first[5:])
    # One reader, every clip: the very batches ActivationReader draws (runs on the default corpus are unchanged).
    reader = ActivationReader(world["corpus_dirs"]["train"])
    single = ShardFrameSource([(reader, None)])
    for a, b, _ in zip(single.random_frames(HOOK, 48, seed=3), reader.random_frames(HOOK, 48, seed=3), range(6)):
        assert torch.equal(a, b)


def test_a_batch_whose_shards_fail_their_check_reaches_neither_training_nor_the_index(world):
    """NaN in a batch's shards (what the blocking shards_valid check catches): the batch is left out of the
    training selection and of the index's sources, the others stay."""
    import shutil

    from freud_pipeline.sae.selection import incoming_batches
    from test_operations import _inject_nan

    good = activations_dir(world["root"], "tiny.en", INCOMING_DATASET, "20250101T000000-aaaa")
    bad = activations_dir(world["root"], "tiny.en", INCOMING_DATASET, "20250115T000000-nan0")
    shutil.copytree(good, bad)
    try:
        _inject_nan(bad)
        keys = [key for key, _ in incoming_batches(world["root"], "tiny.en")]
        assert "20250101T000000-aaaa" in keys and "20250115T000000-nan0" not in keys
        assert all(p.partition != "20250115T000000-nan0" for p in _selection(world).partitions)
    finally:
        shutil.rmtree(bad)
