"""What an SAE trains on: a recorded selection of activation partitions.

The default selection is the default corpus' train split (training) and dev split (evaluation), plus every incoming
batch whose activations are complete (`shards.json` says so) for the model. A batch is split by clip: a clip is held
out for evaluation when the first byte of sha1(clip_id) is odd (`heldout_clip`), the rest is trained on.

A `TrainingSelection` names its partitions with their shard digests; its `digest` changes exactly when the frames it
would train or evaluate on change (a new batch, a recollected split). Each SAE run records it (the MLflow run's
dataset, a tag, the asset's metadata), and the retraining schedule skips a retrain whose selection is the one the
last run recorded. Building a selection reads only `shards.json` files (cheap enough for a schedule tick); the frames
are opened by `train_source` and `eval_source`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from freud_pipeline.activations.writer import MANIFEST
from freud_pipeline.features.labels import clip_heldout

log = logging.getLogger(__name__)

DEFAULT_DATASET = "default_corpus"
INCOMING_DATASET = "incoming_audio"  # the dynamic partitions of defs/incoming.py, one per batch
USES = ("train", "eval", "split")  # split: train on its clips, except the held-out ones (evaluation)


# An incoming clip is held out (evaluation only) by the rule the labels use: the first byte of sha1(clip_id) odd.
heldout_clip = clip_heldout


def activations_dir(data_root: str | Path, model: str, dataset: str, partition: str = "") -> Path:
    """Where the pipeline keeps a partition's shards: <data>/activations/<model>/<dataset>/<partition>."""
    return Path(data_root) / "activations" / model.replace("/", "_") / dataset / partition


def shards_digest(manifest: dict) -> str:
    """sha256 of what determines a shard directory's frames (spec, input, shard files), not of timings."""
    stable = {key: manifest.get(key) for key in ("spec", "input_fingerprint", "n_clips", "n_frames", "shards")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class SelectedPartition:
    dataset: str
    partition: str
    directory: str
    use: str  # one of USES
    n_clips: int
    n_frames: int
    shards_digest: str
    input_fingerprint: str = ""

    @classmethod
    def read(cls, dataset: str, partition: str, directory: str | Path, use: str) -> "SelectedPartition":
        if use not in USES:
            raise ValueError(f"use {use!r} is not one of {', '.join(USES)}")
        manifest = _read_manifest(Path(directory))
        if manifest is None:
            raise FileNotFoundError(f"{directory}: no {MANIFEST}; collect the activations of {dataset}/{partition}")
        return cls(dataset, partition, str(directory), use, int(manifest.get("n_clips", 0)),
                   int(manifest.get("n_frames", 0)), shards_digest(manifest), manifest.get("input_fingerprint", ""))


@dataclass(frozen=True)
class TrainingSelection:
    model: str
    partitions: tuple[SelectedPartition, ...]

    @property
    def digest(self) -> str:
        """sha256 of the sorted (dataset, partition, use, shards digest): the same frames, the same digest."""
        items = sorted((p.dataset, p.partition, p.use, p.shards_digest) for p in self.partitions)
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()

    def records(self) -> list[dict]:
        """[{dataset, partition, directory, use}]: what a feature set over the same selection needs."""
        return [{"dataset": p.dataset, "partition": p.partition, "directory": p.directory, "use": p.use}
                for p in self.partitions]

    def to_frame(self) -> pd.DataFrame:
        """One row per partition (the MLflow run's dataset record)."""
        return pd.DataFrame([asdict(p) for p in self.partitions], columns=list(SelectedPartition.__dataclass_fields__))

    def describe(self) -> str:
        counts = pd.Series([p.dataset for p in self.partitions]).value_counts()
        return ", ".join(f"{n} partition{'s' * (n > 1)} of {dataset}" for dataset, n in counts.items())

    def _source(self, uses: tuple[str, str]):
        from freud_pipeline.activations.reader import ActivationReader
        from freud_pipeline.sae.sources import ShardFrameSource

        keep_split = {"train": lambda clip_id: not heldout_clip(clip_id), "eval": heldout_clip}[uses[0]]
        return ShardFrameSource([(ActivationReader(p.directory), keep_split if p.use == "split" else None)
                                 for p in self.partitions if p.use in uses])

    def train_source(self):
        """The training frames: the `train` partitions and the kept clips of the `split` ones."""
        return self._source(("train", "split"))

    def eval_source(self):
        """The held-out frames: the `eval` partitions and the held-out clips of the `split` ones."""
        return self._source(("eval", "split"))


def incoming_batch(data_root: str | Path, model: str, key: str, hook: str | None = None) -> Path | None:
    """The shard directory of incoming batch `key` when its activations for `model` are complete, hold frames (of
    `hook`, when given) and pass the shard check (`validation.check_shards`, the blocking check of
    `incoming_activations`: a batch with NaN/Inf or broken shards must reach neither training nor the index);
    else None (a batch left out for its shards is logged with the check's verdict)."""
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.validation import check_shards

    directory = activations_dir(data_root, model, INCOMING_DATASET, key)
    manifest = _read_manifest(directory) if directory.is_dir() else None
    if not manifest or not manifest.get("complete") or not manifest.get("n_frames"):
        return None
    if hook is not None and hook not in (manifest.get("spec") or {}).get("hooks", []):
        return None
    rows_path = Path(data_root) / "datasets" / INCOMING_DATASET / key / "manifest.parquet"
    outcome = check_shards(directory, load_manifest(rows_path) if rows_path.is_file() else None)
    if not outcome.passed:
        log.warning("incoming batch %s left out: its shards fail their check (%s)", key, outcome.description)
        return None
    return directory


def incoming_batches(data_root: str | Path, model: str, hook: str | None = None) -> list[tuple[str, Path]]:
    """(batch key, shard directory) of every usable incoming batch (`incoming_batch`), in key order (keys begin
    with the batch's time)."""
    base = activations_dir(data_root, model, INCOMING_DATASET)
    keys = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    return [(key, directory) for key in keys if (directory := incoming_batch(data_root, model, key, hook))]


def default_selection(data_root: str | Path, model: str, activations_dirs: dict, *, train_split: str = "train",
                      eval_split: str = "dev", include_incoming: bool = True,
                      hook: str | None = None) -> TrainingSelection:
    """The default corpus' `train_split` (training) and `eval_split` (evaluation) from `activations_dirs`
    ({split: shard directory}), plus every complete incoming batch of `model` (see `incoming_batches`), split by
    clip, unless `include_incoming` is False."""
    missing = [s for s in (train_split, eval_split) if s not in activations_dirs]
    if missing:
        raise KeyError(f"no activations of the default corpus' {', '.join(missing)} split(s); there are "
                       f"{', '.join(sorted(activations_dirs)) or 'none'}")
    partitions = [SelectedPartition.read(DEFAULT_DATASET, train_split, activations_dirs[train_split], "train"),
                  SelectedPartition.read(DEFAULT_DATASET, eval_split, activations_dirs[eval_split], "eval")]
    if include_incoming:
        partitions += [SelectedPartition.read(INCOMING_DATASET, key, directory, "split")
                       for key, directory in incoming_batches(data_root, model, hook)]
    return TrainingSelection(model, tuple(partitions))


def dataset_selection(model: str, dataset: str, dirs: dict, train_split: str, eval_split: str) -> TrainingSelection:
    """A named dataset's `train_split` (training) and `eval_split` (evaluation): dirs {"train": ..., "eval": ...}."""
    return TrainingSelection(model, (SelectedPartition.read(dataset, train_split, dirs["train"], "train"),
                                     SelectedPartition.read(dataset, eval_split, dirs["eval"], "eval")))
