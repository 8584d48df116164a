"""Audio arriving over time: one dynamic partition per batch of new files in the watched folder.

`new_audio_sensor` (defs/sensors.py) records each batch and adds its key to the `incoming_audio` partitions;
`incoming_audio` turns the batch into a manifest (unreadable files skipped, with the reason in the metadata),
`incoming_activations` collects its activations exactly like the corpus' activations, and `incoming_index`
(defs/features.py) merges them into the default feature sets; the SAE's retraining includes every batch.
"""

from pathlib import Path

import dagster as dg

from freud_pipeline.audio.datasets.incoming import build_audio_files, read_batch
from freud_pipeline.defs.activations import activations_asset
from freud_pipeline.defs.datasets import dataset_output
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.diskspace import require_free_space
from freud_pipeline.sae.selection import INCOMING_DATASET

INCOMING = INCOMING_DATASET  # the dynamic partitions, their dataset directory and the selection name agree
incoming_partitions = dg.DynamicPartitionsDefinition(name=INCOMING)


def batches_dir(storage: FreudStorage) -> Path:
    """Where the sensor records batches (on the shared data directory, so any worker can read them)."""
    return storage.path("datasets", INCOMING, "_batches")


class IncomingConfig(dg.Config):
    align: bool = True  # force-align clips that come with a sidecar transcript (name.txt)
    speaker: str = "unknown"


@dg.asset(name=INCOMING, group_name="incoming", kinds={"parquet"}, partitions_def=incoming_partitions,
          description="A batch of new files from the watched folder (FREUD_WATCH_DIR), converted to 16 kHz WAV "
                      "with a manifest; files that do not decode are skipped and listed with the reason.")
def incoming_audio(context: dg.AssetExecutionContext, config: IncomingConfig, storage: FreudStorage) -> dict:
    key = context.partition_key
    batch = read_batch(batches_dir(storage), key)
    out_dir = storage.root / "datasets" / INCOMING / key
    require_free_space(out_dir, need_bytes=sum(size for size, _ in batch["files"].values()),
                       what=f"incoming batch {key}")
    build = build_audio_files(batch["folder"], list(batch["files"]), out_dir, source="incoming",
                              speaker=config.speaker, align=config.align, data_root=storage.root)
    return dataset_output(context, build, batch=key, n_files=len(batch["files"]),
                          folder=dg.MetadataValue.path(batch["folder"]))


incoming_activations = activations_asset("incoming_activations", INCOMING, incoming_partitions,
                                         same_partitions=True)
INCOMING_ASSETS = [incoming_audio, incoming_activations]

incoming_job = dg.define_asset_job(
    "incoming_job", selection=dg.AssetSelection.assets(*INCOMING_ASSETS, "incoming_index"),
    partitions_def=incoming_partitions,
    description="Manifest and activations of one batch of newly arrived audio (a dynamic partition), merged into the "
                "default feature sets (incoming_index, defs/features.py).")
