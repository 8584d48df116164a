"""The Dagster code location: every asset, resource and job of the FREUD pipeline."""

from __future__ import annotations

import dagster as dg

from freud_pipeline import settings
from freud_pipeline.defs import activations, datasets, features, sae
from freud_pipeline.defs.resources import FreudStorage

DEFAULT_ASSETS = [
    datasets.asterisk_prompts, datasets.festival_speech, datasets.default_corpus,
    activations.activations, sae.topk_sae, features.neuron_feature_index, features.sae_feature_index,
]
EXTERNAL_ASSETS = [datasets.librispeech, datasets.esc50, datasets.audioset, datasets.audio_folder]

demo_job = dg.define_asset_job(
    "demo_job", selection=dg.AssetSelection.assets(*DEFAULT_ASSETS),
    description="The whole default graph on the embedded data: corpus -> activations -> SAE -> feature index.",
)


def resources() -> dict:
    return {
        "storage": FreudStorage(
            data_dir=dg.EnvVar("FREUD_DATA_DIR").get_value("") or "",
            mlflow_tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI").get_value("") or "",
            lancedb_uri=dg.EnvVar("FREUD_LANCEDB_URI").get_value("") or "",
        ),
        # Outputs (small dicts of paths) persist under the data directory, so any later run can load them.
        "io_manager": dg.FilesystemIOManager(base_dir=str(settings.data_dir() / "dagster_storage")),
    }


defs = dg.Definitions(assets=DEFAULT_ASSETS + EXTERNAL_ASSETS, jobs=[demo_job], resources=resources())
