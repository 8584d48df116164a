"""The Dagster code location: every asset, resource and job of the FREUD pipeline."""


import dagster as dg

from freud_pipeline import objectstore, settings
from freud_pipeline.defs import activations, datasets, effects, features, latents, sae, stability
from freud_pipeline.defs import multi_sae  # one SAE per hook from one pass (on request)
from freud_pipeline.defs.partitions import SPLITS, split_partitions
from freud_pipeline.defs.io import ObjectStoreIOManager
from freud_pipeline.defs.resources import ClusterStorage, FreudStorage, MlflowTracking
from freud_pipeline.defs import checks, executors, incoming, runner, schedules, sensors

CORPUS_ASSETS = [datasets.asterisk_prompts, datasets.festival_speech, datasets.default_corpus]
# The large corpus (more voices, speakers, languages): built on request, never by the default stages (`make demo`).
LARGE_CORPUS_ASSETS = [datasets.festival_voices, datasets.asterisk_languages, datasets.large_corpus]
# Built from the large corpus' activations (configs/features/large_corpus_*.yaml) and a width/k sweep
# (configs/train/large_corpus_sweep.yaml): only on request.
LARGE_INDEX_ASSETS = [features.large_corpus_neuron_index, sae.sae_sweep]
ACTIVATION_ASSETS = [activations.activations]
# The SAE feature index rebuilds by itself when a new SAE lands (eager automation condition, defs/schedules.py).
INDEX_ASSETS = [sae.topk_sae, features.neuron_feature_index, schedules.rebuild_on_new_sae(features.sae_feature_index)]
DEFAULT_ASSETS = CORPUS_ASSETS + ACTIVATION_ASSETS + INDEX_ASSETS
EXTERNAL_ASSETS = [datasets.librispeech, datasets.esc50, datasets.audioset, datasets.audio_folder,
                   *activations.EXTERNAL_ACTIVATIONS, latents.sae_latents]
# Seed stability of the SAE recipe (trains it again: on request, configs/train/demo_seed_stability.yaml) and the
# counterparts of SAE features across indexed SAEs (eager after each SAE index build; not in `make demo`'s job).
STABILITY_ASSETS = stability.STABILITY_ASSETS
# Each SAE feature's effect on the transcript when ablated alone (on request: minutes on CPU; not in `make demo`).
EFFECT_ASSETS = effects.EFFECT_ASSETS
# New audio arriving in FREUD_WATCH_DIR, one dynamic partition per batch, merged into the default feature sets.
INCOMING_ASSETS = incoming.INCOMING_ASSETS + [features.incoming_index]

# Partitioned and unpartitioned assets cannot share a job, so the default graph runs as three stages.
corpus_job = dg.define_asset_job("corpus_job", selection=dg.AssetSelection.assets(*CORPUS_ASSETS),
                                 description="Build the embedded default corpus (manifests and alignments).")
activations_job = dg.define_asset_job("activations_job", selection=dg.AssetSelection.assets(*ACTIVATION_ASSETS),
                                      partitions_def=split_partitions,
                                      description="Collect activations of one split (a partition).")
index_job = dg.define_asset_job("index_job", selection=dg.AssetSelection.assets(*INDEX_ASSETS),
                                description="Train the SAE and build the feature index.")
large_corpus_job = dg.define_asset_job(
    "large_corpus_job", selection=dg.AssetSelection.assets(*LARGE_CORPUS_ASSETS),
    description="Build the large corpus (every Festival voice, other-language prompts); needs asterisk_prompts.")
STAGES = [(corpus_job, None), (activations_job, SPLITS), (index_job, None)]


def resources() -> dict:
    objectstore.configure_environment()
    object_store = objectstore.object_store_uri()
    storage = (ClusterStorage if object_store else FreudStorage)(
        data_dir=dg.EnvVar("FREUD_DATA_DIR").get_value("") or "",
        mlflow_tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI").get_value("") or "",
        lancedb_uri=dg.EnvVar("FREUD_LANCEDB_URI").get_value("") or "",
        object_store=object_store,
    )
    return {
        "storage": storage,
        "mlflow": MlflowTracking(storage=storage),  # the SAE run's MLflow store, through an explicit client
        # Outputs (small dicts of paths) persist under the data directory, so any later run can load them; with an
        # object store, in the bucket, their paths written relative to the data directory (defs/io.py).
        "io_manager": (ObjectStoreIOManager(storage=storage) if storage.object_store else
                       dg.FilesystemIOManager(base_dir=str(settings.data_dir() / "dagster_storage"))),
    }


defs = dg.Definitions(
    assets=DEFAULT_ASSETS + LARGE_CORPUS_ASSETS + EXTERNAL_ASSETS + LARGE_INDEX_ASSETS + INCOMING_ASSETS
    + STABILITY_ASSETS + EFFECT_ASSETS + multi_sae.MULTI_SAE_ASSETS,
    jobs=[corpus_job, large_corpus_job, activations_job, index_job, incoming.incoming_job, schedules.sae_retrain_job],
    resources=resources(),
    asset_checks=checks.CHECKS + sae.SAE_CHECKS + stability.STABILITY_CHECKS,  # sae_quality: the SAE's blocking gate
    sensors=sensors.SENSORS,
    schedules=schedules.SCHEDULES,
    executor=executors.freud_executor(),  # multiprocess by default; celery via run config or FREUD_EXECUTOR
)


def materialize_default(run_config: dict | None = None, instance: dg.DagsterInstance | None = None,
                        definitions: dg.Definitions = defs) -> list[dg.ExecuteInProcessResult]:
    """Materialise the whole default graph, stage by stage (every split of the activations)."""
    run_config = run_config or {}
    runner.free_dead_runs(instance)  # a killed earlier run must not hold the pool slots these runs need
    results = []
    for job, partitions in STAGES:
        job_def = definitions.resolve_job_def(job.name)
        ops = {k: v for k, v in run_config.get("ops", {}).items() if job_def.graph.has_node_named(k)}
        for partition in partitions or [None]:
            result = job_def.execute_in_process(run_config={"ops": ops}, instance=instance, partition_key=partition,
                                                raise_on_error=False, tags=runner.process_tags())
            results.append(result)
            if not result.success:
                return results
    return results
