"""SAE lineage: every run in its own immutable directory, feature sets pinned to a run and its weights' sha256.

A tiny TopK SAE (`run_sae`, a few steps on real tiny.en encoder.blocks.2 frames of Asterisk prompts) is indexed;
two retrains follow (one passing the quality gate, one failing it); the old set's features, examples, upload
analysis and edits stay bit-identical, the failing run is neither promoted nor indexed, and tampered weights
are refused. Then the retention rule, old feature_sets rows, and resuming a killed run.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from freud_pipeline.features import FeatureIndex
from freud_pipeline.features.build import build_feature_set, decoder_directions
from freud_pipeline.features.mining import encoded_clips
from freud_pipeline.sae.checkpoint import CheckpointDigestError, clear_verified_cache, load_verified, save_checkpoint
from freud_pipeline.sae.registry import champion_version
from freud_pipeline.sae.retention import PARTIAL_SUFFIX, REPORT_FILE, prune_runs
from freud_pipeline.sae.run import SaeRunConfig, run_sae
from freud_pipeline.sae.sources import TensorFrameSource

try:
    from test_sae import HOOK, TRAIN_CLIPS, decode_prompt, one_intra_op_thread, prompt_frames
except ImportError:  # tests collected as a package
    from tests.test_sae import HOOK, TRAIN_CLIPS, decode_prompt, one_intra_op_thread, prompt_frames

__all__ = ["one_intra_op_thread"]  # fixture: used by pytest, not by name

CLIPS = tuple(TRAIN_CLIPS[:3])
UPLOAD = "vm-review"  # held out: the "uploaded" clip


def quick(**overrides) -> SaeRunConfig:
    """A few steps, no splice evaluation (its gate: FVU and dead latents only)."""
    defaults = dict(hook=HOOK, model_name="tiny.en", expansion_factor=2, k=8, lr=3e-3, warmup_steps=2, steps=16,
                    batch_size=128, log_every=8, eval_every=0, eval_batches=1, dead_after_frames=4096, device="cpu",
                    splice_clips=0, min_ce_recovered=None, max_fvu=1.0, max_dead_pct=100.0)
    return SaeRunConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """An MLflow store of this module's own: its registered model (freud-sae.tiny_en.encoder_blocks_2.topk)
    must not meet the pipeline test's."""
    return f"sqlite:///{tmp_path_factory.mktemp('lineage-mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def world(tiny_en, tmp_path_factory, store_uri):
    """Run 1 (passes the gate) and its indexed feature set."""
    root = tmp_path_factory.mktemp("lineage")
    clips = {name: prompt_frames(tiny_en, (name,)) for name in CLIPS}
    frames = torch.cat(list(clips.values()))
    uri = store_uri
    runs_dir = root / "sae" / f"tiny.en-{HOOK}-topk"

    def run(cfg: SaeRunConfig):
        return run_sae(cfg, frames, frames[:512], runs_dir=runs_dir, tracking_uri=uri, experiment="freud-sae",
                       tags={"purpose": "lineage test"})

    first = run(quick())
    sae = load_verified(first.checkpoint_dir, first.sha256)

    def encode(acts):
        with torch.inference_mode():
            return sae.encode(torch.as_tensor(acts).float()).numpy()

    index_uri = str(root / "lancedb")
    set_id = f"tiny.en/{HOOK}/sae-topk-{first.run_id[:8]}"
    build_feature_set(encoded_clips(((c, a.numpy()) for c, a in clips.items()), encode), set_id=set_id,
                      model="tiny.en", hook=HOOK, kind="sae", manifest_df=None, index_uri=index_uri, top_k=4,
                      sae_run_id=first.run_id, sae_checkpoint=str(first.checkpoint_dir), sae_sha256=first.sha256,
                      decoder=decoder_directions(sae))
    return {"run": run, "first": first, "uri": uri, "runs_dir": runs_dir, "index_uri": index_uri,
            "set_id": set_id, "audio": decode_prompt(UPLOAD)}


def observe(world) -> dict:
    """Everything a user sees of the set, read afresh (new FeatureIndex, SAE cache emptied)."""
    from freud_pipeline.features.editing import edit_clip

    clear_verified_cache()
    index = FeatureIndex(world["index_uri"], read_consistency_interval=0)
    set_id = world["set_id"]
    uploaded = index.clip_features(world["audio"], set_id, n=8)
    edit = edit_clip(world["audio"], set_id, {uploaded[0]["index"]: 0.0}, index=index, max_new_tokens=24)
    edit.pop("seconds")
    return {"set": next(s for s in index.sets() if s["set_id"] == set_id),
            "features": [index.feature(set_id, i, histogram=True) for i in range(0, 768, 97)],
            "examples": [index.top_examples(set_id, g["index"], n=4) for g in uploaded[:3]],
            "upload": uploaded, "edit": edit}


def test_retraining_leaves_an_old_set_bit_identical_and_never_indexes_a_failing_run(world):
    from freud_pipeline.defs.features import sae_feature_index
    from freud_pipeline.defs.resources import FreudStorage

    first = world["first"]
    before = observe(world)
    assert before["set"]["sae_run_id"] == first.run_id and before["set"]["sae_sha256"] == first.sha256
    assert before["set"]["sae_checkpoint"] == str(world["runs_dir"] / first.run_id)
    assert any(e for e in before["examples"]) and before["edit"]["transcripts"]["original"]

    second = world["run"](quick(seed=1))  # passes the gate
    failing = world["run"](quick(seed=2, max_fvu=0.0))  # forced to fail: no SAE has FVU 0
    assert second.passed and not failing.passed and failing.quality["failures"][0].startswith("fvu ")
    runs = [first, second, failing]
    assert len({r.checkpoint_dir for r in runs}) == 3
    assert all(r.checkpoint_dir.parent == world["runs_dir"] for r in runs)
    assert not list(world["runs_dir"].glob(f"*{PARTIAL_SUFFIX}"))  # each renamed when complete

    # The failing run: registered as a failed version, never promoted ...
    client = MlflowClient(world["uri"])
    assert failing.registry["promoted"] is False and "quality check failed" in failing.registry["reason"]
    assert champion_version(client, failing.registry["name"]).run_id != failing.run_id
    assert client.get_run(failing.run_id).data.tags["quality_check"] == "failed"
    # ... and never indexed, even when the index asset is run on its own.
    output = {**failing.summary(), "hook": HOOK, "architecture": "topk", "runs_dir": str(world["runs_dir"]),
              "keep_runs": 3}
    with pytest.raises(dg.Failure, match=f"SAE run {failing.run_id} failed its quality check"):
        sae_feature_index(context=dg.build_asset_context(), storage=FreudStorage(lancedb_uri=world["index_uri"]),
                          activations={}, default_corpus={}, topk_sae=output)
    assert failing.run_id not in {s["sae_run_id"] for s in FeatureIndex(world["index_uri"]).sets()}

    assert observe(world) == before  # features, examples, upload analysis and edit: bit for bit


def test_tampered_weights_are_refused_with_a_clear_error(world):
    from freud_pipeline.features.editing import EditError, edit_clip

    weights = world["first"].checkpoint_dir / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(data))
    clear_verified_cache()
    index = FeatureIndex(world["index_uri"], read_consistency_interval=0)
    with pytest.raises(CheckpointDigestError, match=r"sae_weights.safetensors: the weights' sha256 is .* not the"):
        index.clip_features(world["audio"], world["set_id"], n=3)
    with pytest.raises(EditError, match="rebuild the feature set"):
        edit_clip(world["audio"], world["set_id"], {0: 0.0}, index=index)


def _fake_run(runs_dir: Path, run_id: str, completed_at: float) -> Path:
    torch.manual_seed(int(completed_at))
    directory = save_checkpoint(_tiny_sae(), runs_dir / run_id)
    (directory / REPORT_FILE).write_text(json.dumps({"run_id": run_id, "completed_at": completed_at}))
    return directory


def _tiny_sae():
    from freud_pipeline.sae import TopKSAE

    return TopKSAE(8, 16, k=2)


def _index_run(index_uri: str, run_id: str) -> str:
    rng = np.random.default_rng(0)
    clips = [(f"c{i}", np.maximum(rng.normal(size=(10, 16)), 0).astype(np.float32)) for i in range(3)]
    set_id = f"tiny.en/{HOOK}/sae-topk-{run_id[:8]}"
    build_feature_set(clips, set_id=set_id, model="tiny.en", hook=HOOK, kind="sae", manifest_df=None,
                      index_uri=index_uri, top_k=2, sae_run_id=run_id, sae_checkpoint=f"/x/{run_id}")
    return set_id


def test_retention_keeps_the_champion_and_the_last_n_and_removes_the_rest_with_their_sets(tmp_path):
    runs_dir, index_uri = tmp_path / "sae" / "tiny.en-encoder.blocks.2-topk", str(tmp_path / "lancedb")
    ids = [f"{i:032x}" for i in range(1, 6)]  # oldest first
    for age, run_id in enumerate(ids):
        _fake_run(runs_dir, run_id, 1000.0 + age)
    sets = {run_id: _index_run(index_uri, run_id) for run_id in ids}
    (runs_dir / f"{'f' * 32}{PARTIAL_SUFFIX}").mkdir()  # a run in progress (or killed: kept to resume)
    legacy = save_checkpoint(_tiny_sae(), runs_dir)  # the older in-place layout: not a run directory

    removed = prune_runs(runs_dir, keep_last=2, keep=[ids[0], None], index_uri=index_uri)
    assert sorted(removed) == ids[1:3]  # not the champion (ids[0]), not the newest two
    left_dirs = sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    assert left_dirs == sorted([ids[0], *ids[3:], "f" * 32 + PARTIAL_SUFFIX])
    assert (legacy / "sae_weights.safetensors").is_file()
    left = {s["set_id"] for s in FeatureIndex(index_uri, read_consistency_interval=0).sets()}
    assert left == {sets[ids[0]], sets[ids[3]], sets[ids[4]]}
    assert prune_runs(runs_dir, keep_last=2, keep=[ids[0]], index_uri=index_uri) == []  # nothing by accident
    with pytest.raises(ValueError, match="keep_last"):
        prune_runs(runs_dir, keep_last=0)


def test_feature_sets_rows_written_before_sae_sha256_still_read_and_write(tmp_path):
    import pyarrow as pa

    from freud_pipeline.features import store

    old_schema = pa.schema([f for f in store.FEATURE_SETS_SCHEMA if f.name != "sae_sha256"])
    db = store.connect(str(tmp_path))
    db.create_table(store.FEATURE_SETS, schema=old_schema)
    old = _index_run(str(tmp_path), "a" * 32)  # a set written into the old table ...
    assert "sae_sha256" in db.open_table(store.FEATURE_SETS).schema.names  # ... which gained the column
    rows = {s["set_id"]: s for s in FeatureIndex(str(tmp_path)).sets()}
    assert rows[old]["sae_sha256"] is None and rows[old]["sae_run_id"] == "a" * 32


class _KilledAfter(TensorFrameSource):
    """Frames whose training stream (the second pass over the source; the first estimates the input scale) dies
    after `batches` batches, as a killed process would stop."""

    def __init__(self, frames, batches: int):
        super().__init__(frames)
        self.batches, self.calls = batches, 0

    def random_frames(self, hook, batch_size, seed):
        self.calls += 1
        call = self.calls
        for i, batch in enumerate(super().random_frames(hook, batch_size, seed)):
            if call == 2 and i == self.batches:
                raise RuntimeError("killed")
            yield batch


def test_a_killed_run_resumes_from_its_partial_directory_to_the_same_weights(tiny_en, tmp_path, store_uri):
    frames = torch.cat([prompt_frames(tiny_en, (name,)) for name in CLIPS])
    uri, runs_dir = store_uri, tmp_path / "runs"
    cfg = quick(steps=12, checkpoint_every=4, register_model=False)
    kwargs = dict(runs_dir=runs_dir, tracking_uri=uri)
    whole = run_sae(cfg, frames, frames[:256], **kwargs)
    with pytest.raises(RuntimeError, match="killed"):
        run_sae(cfg, _KilledAfter(frames, 9), frames[:256], **kwargs)
    (partial,) = runs_dir.glob(f"*{PARTIAL_SUFFIX}")  # the killed run: never renamed, never a run directory
    resumed = run_sae(cfg, frames, frames[:256], resume_from=partial / "checkpoints" / "step_00000008", **kwargs)
    a, b = (load_file(r.checkpoint_dir / "sae_weights.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.sha256 == whole.sha256 and resumed.checkpoint_dir == runs_dir / resumed.run_id
