"""Sensors: new audio in a watched folder, and declarative automation (the SAE feature index follows the SAE).

new_audio_sensor keeps a cursor {folder, files: {relative path: [size, mtime_ns]}} of every file it has handed
to a batch. A file is taken once its (size, mtime) differs from the cursor's and it has been still for
FREUD_WATCH_SETTLE_S seconds; a file rewritten later is taken again (new content, new batch). The cursor is
saved by Dagster with each tick, so a restart neither repeats nor misses files; if the cursor is lost (sensor
reset, new instance) it is rebuilt from the batch records of the partitions this instance already has.
"""

import json
import os
import time
from pathlib import Path

import dagster as dg

from freud_pipeline.audio.datasets.incoming import batch_key, plan_batches, scan_folder, seen_in_batches, select_new
from freud_pipeline.audio.datasets.incoming import write_batch
from freud_pipeline.defs.incoming import INCOMING, batches_dir, incoming_job, incoming_partitions
from freud_pipeline.defs.resources import FreudStorage
from freud_pipeline.errors import FreudError


def watch_dir(storage: FreudStorage) -> Path:
    """FREUD_WATCH_DIR, default <data dir>/incoming."""
    return Path(os.environ.get("FREUD_WATCH_DIR") or storage.root / "incoming").expanduser().resolve()


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise FreudError(f"{name}={raw!r} is not a number") from None


def settle_seconds() -> float:
    """FREUD_WATCH_SETTLE_S (default 10): a file modified more recently is still being written."""
    return _env_number("FREUD_WATCH_SETTLE_S", 10.0)


def batch_max_files() -> int:
    """FREUD_WATCH_BATCH_MAX (default 200): files per batch, i.e. per partition and run."""
    return max(1, int(_env_number("FREUD_WATCH_BATCH_MAX", 200)))


def _cursor_files(files: dict) -> dict:
    return {rel: list(state) for rel, state in sorted(files.items())}


@dg.sensor(name="new_audio_sensor", job=incoming_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds a partition of incoming_audio per batch of new files in FREUD_WATCH_DIR (default "
                       "<data dir>/incoming) and requests its manifest and activations.")
def new_audio_sensor(context: dg.SensorEvaluationContext, storage: FreudStorage):
    folder = watch_dir(storage)
    if not folder.is_dir():
        return dg.SkipReason(f"the watched folder {folder} does not exist: create it or set FREUD_WATCH_DIR")
    cursor = json.loads(context.cursor) if context.cursor else {}
    records = batches_dir(storage)
    if cursor.get("folder") == str(folder):
        seen = {rel: tuple(state) for rel, state in cursor.get("files", {}).items()}
    else:  # first tick, a reset cursor or another folder: what this instance's batches already hold
        seen = seen_in_batches(records, folder, context.instance.get_dynamic_partitions(INCOMING))
    current = scan_folder(folder)
    new = select_new(current, seen, now_ns=time.time_ns(), settle_s=settle_seconds())
    if not new:
        waiting = sum(1 for rel, state in current.items() if tuple(seen.get(rel, ())) != tuple(state))
        reason = f"no new files in {folder}" + (f" ({waiting} still being written)" if waiting else "")
        return dg.SensorResult(skip_reason=reason, cursor=json.dumps({"folder": str(folder),
                                                                      "files": _cursor_files(seen)}))
    keys = []
    for files in plan_batches(new, current, batch_max_files()):
        key = batch_key(files)
        write_batch(records, key, folder, files)  # before the partition exists: a run always finds its record
        keys.append(key)
    seen.update({rel: current[rel] for rel in new})
    context.log.info(f"{len(new)} new files in {folder} -> batches {keys}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"{INCOMING}-{key}") for key in keys],
        dynamic_partitions_requests=[incoming_partitions.build_add_request(keys)],
        cursor=json.dumps({"folder": str(folder), "files": _cursor_files(seen)}),
    )


# Evaluates every asset's automation condition (sae_feature_index: eager, see defs/schedules.py).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Declarative automation: rebuilds the SAE feature index when a new SAE is materialised.",
)

SENSORS = [new_audio_sensor, automation_sensor]
