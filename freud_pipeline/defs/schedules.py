"""Weekly SAE retraining, and the feature index that follows each new SAE by declarative automation.

`weekly_retraining` runs `sae_retrain_job` (topk_sae only) on FREUD_RETRAIN_CRON (default Mondays 03:00 UTC)
with the SAE config's defaults (`demo_config()`, what `make demo` trains), overridden by the YAML mapping in
FREUD_RETRAIN_CONFIG when set. It trains on the default selection (the default corpus plus every complete incoming
batch, freud_pipeline/sae/selection.py); a tick whose selection is the one the latest topk_sae materialisation
recorded (its `selection_digest`) is skipped with the reason: no new data, no new run. The SAE
feature index carries AutomationCondition.eager() (unless an input's blocking check failed): once the new SAE is
materialised and passed sae_quality (and none of its inputs is missing or in progress), `automation_sensor`
requests sae_feature_index.
"""

import os
from pathlib import Path

import dagster as dg
import pydantic
import yaml

from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.defs.sae import SaeAssetConfig, training_selection
from freud_pipeline.sae.run import SELECTION_TAG
from freud_pipeline.errors import FreudError

DEFAULT_RETRAIN_CRON = "0 3 * * 1"

sae_retrain_job = dg.define_asset_job(
    "sae_retrain_job", selection=dg.AssetSelection.assets("topk_sae"),
    description="Retrain the SAE on the current activations (the SAE feature index follows automatically).")


def retrain_cron() -> str:
    cron = os.environ.get("FREUD_RETRAIN_CRON", "").strip() or DEFAULT_RETRAIN_CRON
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(cron):
        raise FreudError(f"FREUD_RETRAIN_CRON={cron!r} is not a cron expression (e.g. {DEFAULT_RETRAIN_CRON!r}: "
                         "minute hour day-of-month month day-of-week)")
    return cron


def retrain_run_config() -> dict:
    """topk_sae's config: defaults, then the mapping in the YAML file named by FREUD_RETRAIN_CONFIG."""
    overrides = {}
    if path := os.environ.get("FREUD_RETRAIN_CONFIG"):
        if not Path(path).is_file():
            raise FreudError(f"FREUD_RETRAIN_CONFIG={path}: no such file")
        overrides = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(overrides, dict):
            raise FreudError(f"{path}: expected a mapping of topk_sae config fields")
    try:
        config = SaeAssetConfig(**overrides)
    except pydantic.ValidationError as exc:
        raise FreudError(f"FREUD_RETRAIN_CONFIG={path}: not a valid topk_sae config: {exc}") from None
    return {"ops": {"topk_sae": {"config": config.model_dump()}}}


def _activations_outputs(instance: dg.DagsterInstance, config: SaeAssetConfig) -> dict:
    """The `activations` partitions topk_sae would receive ({split: {directory, model}}), from their latest
    materialisations."""
    found = {}
    for split in {config.train_split, config.eval_split}:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("activations"), asset_partitions=[split]), limit=1).records
        if records:
            metadata = records[0].asset_materialization.metadata
            found[split] = {"directory": str(metadata["directory"].value), "model": str(metadata["model"].value)}
    return found


def retrain_request(context: dg.ScheduleEvaluationContext, storage: FreudStorage) -> dg.RunRequest | dg.SkipReason:
    """A RunRequest tagged with the selection's digest; a SkipReason when the latest topk_sae materialisation
    recorded this very selection (no new data since). The first run ever, or one whose selection cannot be known
    yet (no activations: the run reports why), is requested."""
    run_config = retrain_run_config()
    config = SaeAssetConfig(**run_config["ops"]["topk_sae"]["config"])
    tags = {"freud/trigger": "weekly_retraining"}
    try:
        _, selection = training_selection(config, storage, _activations_outputs(context.instance, config))
    except (dg.Failure, FileNotFoundError, KeyError) as exc:
        context.log.warning(f"retraining without knowing its selection: {exc}")
        return dg.RunRequest(run_config=run_config, tags=tags)
    last = context.instance.get_latest_materialization_event(dg.AssetKey("topk_sae"))
    recorded = last.asset_materialization.metadata.get("selection_digest") if last is not None else None
    if recorded is not None and recorded.value == selection.digest:
        return dg.SkipReason(
            f"no new data since run {last.run_id} (selection {selection.digest[:12]}): it trained on the same "
            f"{selection.describe()}; a new incoming batch, or recollected activations, start the next retrain")
    return dg.RunRequest(run_config=run_config, tags={**tags, SELECTION_TAG: selection.digest})


def build_weekly_retraining(cron: str | None = None) -> dg.ScheduleDefinition:
    @dg.schedule(name="weekly_retraining", job=sae_retrain_job, cron_schedule=cron or retrain_cron(),
                 execution_timezone=os.environ.get("FREUD_RETRAIN_TIMEZONE", "UTC"),
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Retrain the SAE when it has new data to train on (cron: FREUD_RETRAIN_CRON).")
    def weekly_retraining(context: dg.ScheduleEvaluationContext, storage: FreudStorage):
        return retrain_request(context, storage)

    return weekly_retraining


weekly_retraining = build_weekly_retraining()
SCHEDULES = [weekly_retraining]

# eager: once after each update of an input, when none is missing or in progress; but never on top of an input
# whose blocking check (e.g. sae_quality, shards_valid) failed against its latest materialisation.
_INPUT_CHECK_FAILED = dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed(), blocking_only=True)
).with_label("an input's blocking check failed")
INDEX_AUTOMATION = (dg.AutomationCondition.eager() & ~_INPUT_CHECK_FAILED).with_label(
    "eager unless an input's blocking check failed")


def rebuild_on_new_sae(index_asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The SAE feature index asset with an eager automation condition (its code is unchanged)."""
    return dg.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=INDEX_AUTOMATION),
                              [index_asset])[0]
