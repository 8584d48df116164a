"""Weekly SAE retraining, and the feature index that follows each new SAE by declarative automation.

`weekly_retraining` runs `sae_retrain_job` (topk_sae only) on FREUD_RETRAIN_CRON (default Mondays 03:00 UTC)
with the SAE config's defaults (`demo_config()`, what `make demo` trains), overridden by the YAML mapping in FREUD_RETRAIN_CONFIG when set. The SAE
feature index carries AutomationCondition.eager() (unless an input's blocking check failed): once the new SAE is
materialised and passed sae_quality (and none of its inputs is missing or in progress), `automation_sensor`
requests sae_feature_index.
"""

import os
from pathlib import Path

import dagster as dg
import pydantic
import yaml

from freud_pipeline.defs.sae import SaeAssetConfig
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


def build_weekly_retraining(cron: str | None = None) -> dg.ScheduleDefinition:
    @dg.schedule(name="weekly_retraining", job=sae_retrain_job, cron_schedule=cron or retrain_cron(),
                 execution_timezone=os.environ.get("FREUD_RETRAIN_TIMEZONE", "UTC"),
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Retrain the SAE on the current activations (cron: FREUD_RETRAIN_CRON).")
    def weekly_retraining(context: dg.ScheduleEvaluationContext):
        return dg.RunRequest(run_config=retrain_run_config(), tags={"freud/trigger": "weekly_retraining"})

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
