"""Many SAEs from one pass (freud_pipeline/sae/multi.py, freud_pipeline/defs/multi_sae.py), on real tiny.en
activations of Asterisk prompts at three encoder blocks, collected by the real `all_blocks_activations` asset:

- lockstep changes nothing: each SAE of `train_saes` has exactly the weights `train_sae` gives it alone;
- one read per step: one batch of frame positions read for all hooks;
- a killed multi run resumes every SAE bit for bit;
- a Dagster materialisation of a subset of `all_blocks_sae` trains only those hooks (two MLflow runs under a
  parent, two registered models, two asset materialisations);
- the streaming option trains from audio without writing shards.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from freud_pipeline.activations import ActivationReader

try:
    from test_retraining import _rows
except ImportError:  # tests collected as a package
    from tests.test_retraining import _rows

HOOKS = ["encoder.blocks.0", "encoder.blocks.1", "encoder.blocks.2"]
CORPUS = {"train": ["vm-options", "vm-message", "vm-savedto"], "dev": ["vm-review"], "test": ["vm-deleted"]}
BASE = {"model_name": "tiny.en", "expansion_factor": 2, "k": 8, "lr": 3e-3, "steps": 12, "batch_size": 128,
        "warmup_steps": 2, "log_every": 4, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
        "dead_after_frames": 1024, "device": "cpu"}
# Different architectures side by side: only steps, batch_size and seed must be shared.
ARCHS = {"encoder.blocks.0": {"architecture": "topk"}, "encoder.blocks.1": {"architecture": "batchtopk"},
         "encoder.blocks.2": {"architecture": "jumprelu", "l0_target": 8.0}}
WEIGHTS = "sae_weights.safetensors"


class CountingReader(ActivationReader):
    """A real reader that counts the batches it serves (and fails after `fail_after` multi batches: a kill)."""

    def __init__(self, directory, fail_after: int | None = None):
        super().__init__(directory)
        self.multi_batches, self.single_batches, self.fail_after = 0, 0, fail_after

    def random_frames_multi(self, hooks, batch_size, seed=0, epochs=None, device="cpu"):
        for batch in super().random_frames_multi(hooks, batch_size, seed, epochs, device):
            if self.fail_after is not None and self.multi_batches >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.multi_batches += 1
            yield batch

    def random_frames(self, hook, batch_size, seed=0, epochs=None, device="cpu"):
        for batch in super().random_frames(hook, batch_size, seed, epochs, device):
            self.single_batches += 1
            yield batch


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(Path(a) / WEIGHTS), load_file(Path(b) / WEIGHTS)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus of Asterisk prompts (train/dev/test), its activations at three blocks collected by the real
    `all_blocks_activations` asset in a Dagster instance, and the resources the assets use."""
    from freud_pipeline.audio.datasets.manifest import write_manifest
    from freud_pipeline.defs.multi_sae import all_blocks_activations, all_blocks_sae
    from freud_pipeline.defs.resources import FreudStorage, MlflowTracking

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on 2 shared cores
    root = tmp_path_factory.mktemp("multi_sae")
    rows = [r for split, names in CORPUS.items() for r in _rows(root, names, split, "corpus")]
    manifest_path = write_manifest(rows, root / "datasets" / "corpus" / "manifest.parquet")

    @dg.asset(name="default_corpus")
    def corpus() -> dict:
        return {"manifest_path": str(manifest_path)}

    storage = FreudStorage(data_dir=str(root))
    resources = {"storage": storage, "mlflow": MlflowTracking(storage=storage),
                 "io_manager": dg.FilesystemIOManager(base_dir=str(root / "dagster_storage"))}
    try:
        with dg.instance_for_test() as instance:
            assert dg.materialize([corpus], instance=instance, resources=resources).success
            for split in CORPUS:
                assert dg.materialize([corpus, all_blocks_activations], selection=[all_blocks_activations],
                                      partition_key=split, instance=instance, resources=resources,
                                      run_config={"ops": {"all_blocks_activations": {"config": {
                                          "hooks": HOOKS, "device": "cpu"}}}}).success
            shards = root / "activations" / "tiny.en" / "default_corpus_all_blocks"
            yield {"root": root, "uri": storage.tracking_uri, "train": shards / "train", "dev": shards / "dev",
                   "rows": rows, "instance": instance, "resources": resources,
                   "assets": [corpus, all_blocks_activations, all_blocks_sae]}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lockstep(world, tmp_path_factory):
    """train_saes on the three hooks (a counting reader), and train_sae on each hook alone."""
    from freud_pipeline.sae.multi import train_saes
    from freud_pipeline.sae.train import train_sae

    out = tmp_path_factory.mktemp("lockstep")
    reader = CountingReader(world["train"])
    cfgs = {hook: {**BASE, **ARCHS[hook], "hook": hook} for hook in HOOKS}
    multi = train_saes(reader, cfgs, out_dir=out / "multi", mlflow_tracking_uri=world["uri"],
                       experiment="test-multi", eval_source=ActivationReader(world["dev"]))
    alone = {hook: train_sae(ActivationReader(world["train"]), cfg, out_dir=out / "alone" / hook,
                             mlflow_tracking_uri=world["uri"], experiment="test-multi",
                             eval_source=ActivationReader(world["dev"])) for hook, cfg in cfgs.items()}
    return {"multi": multi, "alone": alone, "reader": reader, "cfgs": cfgs}


def test_the_collection_holds_every_hook_in_its_own_dataset_directory(world):
    reader = ActivationReader(world["train"])
    assert reader.hooks == HOOKS and reader.n_frames > 384
    assert reader.clip_ids() == CORPUS["train"]
    assert not (world["root"] / "activations" / "tiny.en" / "default_corpus").exists()  # the default's, untouched


def test_each_sae_trained_in_lockstep_equals_the_sae_trained_alone(lockstep):
    for hook in HOOKS:
        multi, alone = lockstep["multi"][hook], lockstep["alone"][hook]
        assert type(multi.sae) is type(alone.sae) and multi.input_scale == alone.input_scale
        assert _same_weights(multi.checkpoint_dir, alone.checkpoint_dir), hook
        assert multi.metrics["eval/fvu"] == alone.metrics["eval/fvu"]
        assert multi.sha256 == alone.sha256


def test_each_step_reads_one_batch_of_frames_for_all_hooks(lockstep):
    reader, cfg = lockstep["reader"], lockstep["cfgs"][HOOKS[0]]
    scale_batches = 4  # TrainConfig's default: the separate pass for the input scale and init
    assert reader.multi_batches == cfg["steps"] + scale_batches
    assert reader.single_batches == 0  # never per hook (evaluation reads the dev reader)


def test_one_parent_run_groups_one_mlflow_run_per_hook(lockstep, world):
    client = MlflowClient(world["uri"])
    parent_id = {r.parent_run_id for r in lockstep["multi"].values()}
    assert len(parent_id) == 1
    parent = client.get_run(parent_id.pop())
    assert parent.data.tags["freud.kind"] == "multi_sae" and parent.info.status == "FINISHED"
    assert parent.data.tags["hooks"] == ",".join(HOOKS)
    for hook, result in lockstep["multi"].items():
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["hook"] == hook
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.data.tags[f"run:{hook}"] == result.run_id
        assert run.data.params["architecture"] == ARCHS[hook]["architecture"]
        assert "eval/fvu" in run.data.metrics and "loss" in run.data.metrics


def test_configs_that_would_need_different_batches_are_refused(world):
    from freud_pipeline.sae.multi import train_saes

    cfgs = {HOOKS[0]: {**BASE, "hook": HOOKS[0]}, HOOKS[1]: {**BASE, "hook": HOOKS[1], "batch_size": 64}}
    with pytest.raises(ValueError, match="batch_size must be equal"):
        train_saes(ActivationReader(world["train"]), cfgs, mlflow_tracking_uri=world["uri"])


def test_a_killed_multi_run_resumes_every_sae_bit_for_bit(world, tmp_path):
    from freud_pipeline.sae.multi import resume_points, train_saes

    cfgs = {hook: {**BASE, **ARCHS[hook], "hook": hook, "steps": 16, "checkpoint_every": 4} for hook in HOOKS[:2]}
    run = dict(mlflow_tracking_uri=world["uri"], experiment="test-multi", eval_source=ActivationReader(world["dev"]))
    whole = train_saes(ActivationReader(world["train"]), cfgs, out_dir=tmp_path / "whole", **run)
    killed = CountingReader(world["train"], fail_after=4 + 10)  # the scale pass, then killed during step 11
    with pytest.raises(KeyboardInterrupt):
        train_saes(killed, cfgs, out_dir=tmp_path / "killed", **run)
    client = MlflowClient(world["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("test-multi").experiment_id],
                                   filter_string="tags.`freud.kind` = 'multi_sae' and attributes.status = 'KILLED'")
    points = resume_points(world["uri"], parent.info.run_id)
    assert {hook: p.name for hook, p in points.items()} == {hook: "step_00000008" for hook in cfgs}
    resumed = train_saes(ActivationReader(world["train"]), cfgs, out_dir=tmp_path / "resumed", resume_from=points,
                         **run)
    for hook in cfgs:
        assert _same_weights(whole[hook].checkpoint_dir, resumed[hook].checkpoint_dir), hook
        assert resumed[hook].metrics["eval/fvu"] == whole[hook].metrics["eval/fvu"]
        assert client.get_run(resumed[hook].run_id).data.tags["resumed_at_step"] == "8"


def test_a_dagster_subset_trains_only_the_selected_hooks_each_its_own_asset_and_run(world):
    from freud_pipeline.sae.registry import registered_model_name

    config = {**{k: v for k, v in BASE.items() if k != "model_name"}, "splice_clips": 0, "min_ce_recovered": None,
              "max_fvu": None, "max_dead_pct": None}
    chosen = [dg.AssetKey("sae_encoder_blocks_0"), dg.AssetKey("sae_encoder_blocks_1")]
    result = dg.materialize(world["assets"], selection=chosen, instance=world["instance"],
                            resources=world["resources"], run_config={"ops": {"all_blocks_sae": {"config": config}}})
    assert result.success
    events = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}
    assert set(events) == set(chosen)  # blocks 2 and 3 were not trained
    client = MlflowClient(world["uri"])
    parents = set()
    for key, hook in zip(chosen, HOOKS[:2]):
        out = result.output_for_node("all_blocks_sae", key.path[0])
        metadata = events[key].metadata
        assert out["hook"] == hook and metadata["mlflow_run_id"].value == out["run_id"]
        run = client.get_run(out["run_id"])
        assert run.data.tags["hook"] == hook and run.data.tags["dagster_asset_key"] == key.path[0]
        assert run.data.tags["dagster_run_id"] == result.run_id and run.data.tags["quality_check"] == "passed"
        assert Path(out["checkpoint_dir"]).name == out["run_id"]  # complete: renamed from <run id>.partial
        assert Path(out["checkpoint_dir"]).parent.name == f"tiny.en-{hook}-topk"
        assert out["registry"]["name"] == registered_model_name("tiny.en", hook, "topk")
        assert client.get_model_version(out["registry"]["name"], out["registry"]["version"]).run_id == out["run_id"]
        parents.add(run.data.tags["mlflow.parentRunId"])
        assert metadata["mlflow_parent_run_id"].value == out["parent_run_id"]
    assert len(parents) == 1
    assert client.get_run(parents.pop()).data.tags["freud.kind"] == "multi_sae"


def test_the_streaming_option_trains_from_audio_with_one_encoder_pass_per_clip(world, tmp_path):
    import pandas as pd

    from freud_pipeline.activations.streaming import StreamingActivations
    from freud_pipeline.sae.multi import train_saes

    class CountingStream(StreamingActivations):
        """A real stream counting the clips it runs through the encoder."""

        clips = 0

        def _clips(self, rows):
            for clip in super()._clips(rows):
                self.clips += 1
                yield clip

    def stream(hooks):
        return CountingStream(pd.DataFrame([r for r in world["rows"] if r["split"] == "train"]), model="tiny.en",
                              hooks=hooks, device="cpu", batch_size=2, data_root=world["root"],
                              shuffle_buffer_frames=256)

    both = stream(HOOKS[:2])
    before = set(world["root"].rglob("*.arrow"))
    cfgs = {hook: {**BASE, "hook": hook, "steps": 4, "batch_size": 64, "scale_batches": 2} for hook in HOOKS[:2]}
    trained = train_saes(both, cfgs, out_dir=tmp_path / "streamed", mlflow_tracking_uri=world["uri"],
                         experiment="test-multi", eval_source=ActivationReader(world["dev"]))
    assert set(world["root"].rglob("*.arrow")) == before and not list(tmp_path.rglob("*.arrow"))  # no shards
    for hook in HOOKS[:2]:
        assert trained[hook].sae.d_in == 384 and 0 < trained[hook].metrics["eval/fvu"] < 1.5
    # One encoder pass per clip serves both hooks: exactly the clips a stream of one hook encodes for the same
    # batches (the scale pass' 2, then the 4 steps', each from its own iterator as train_saes draws them).
    one = stream(HOOKS[:1])
    for n in (2, 4):
        batches = one.random_frames(HOOKS[0], 64, seed=0)
        for _ in range(n):
            next(batches)
    assert both.clips == one.clips > 0
