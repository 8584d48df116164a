"""Many SAEs from one pass: one SAE per hook, trained in lockstep on one read of the activations.

`train_saes(source, {hook: TrainConfig})` draws each step's frame positions once and reads them for every hook
(`random_frames_multi` of an `ActivationReader`, a `ShardFrameSource` or a `StreamingActivations`: then one Whisper
pass per clip captures every hook and no shard is written). Each SAE is a `train.SaeTrainer`, the very code
`train_sae` runs: its own optimiser, schedule, firing tracker, RNG state, checkpoints and MLflow run, so each ends
with exactly the weights `train_sae` gives it alone with the same config (tested). The SAEs share what decides the
batches: `steps`, `batch_size` and `seed` must be equal; the rest (architecture, width, k, lr...) may differ.

MLflow: a parent run (tag `freud.kind=multi_sae`, params: the hooks and the shared fields; a tag
`run:<hook>` and `dir:<hook>` per SAE) groups one run per hook (`mlflow.parentRunId`, tag `hook`), each exactly what
`train_sae` logs. Resume: a killed multi run continues from the latest checkpoint step every SAE reached
(`resume_points(tracking_uri, parent run id)`), each SAE bit for bit (tested).

`run_saes` is `run.run_sae` for several hooks: the shared training, then per hook `run.complete_run` (splice-
evaluate, gate, register, promote, report), each into its own run directory `<runs_dir[hook]>/<run id>/`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Mapping

from freud_pipeline import settings
from freud_pipeline.sae.config import TrainConfig
from freud_pipeline.sae.sources import FrameStream, multi_frames
from freud_pipeline.sae.tracking import TrainingRun
from freud_pipeline.sae.train import SaeTrainer, TrainResult

log = logging.getLogger(__name__)

KIND_TAG, KIND = "freud.kind", "multi_sae"  # the parent run's tag (the runs page lists trained SAEs, not it)
PARENT_TAG = "freud.multi_parent"  # on each SAE's run: its parent's run id
SHARED_FIELDS = ("steps", "batch_size", "seed")  # what decides the batches: equal for SAEs trained together
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _configs(cfgs: Mapping[str, TrainConfig | dict]) -> dict[str, TrainConfig]:
    out = {hook: cfg if isinstance(cfg, TrainConfig) else TrainConfig(**{"hook": hook, **cfg})
           for hook, cfg in cfgs.items()}
    if not out:
        raise ValueError("train_saes needs at least one hook")
    wrong = [f"{hook} (its config says {cfg.hook})" for hook, cfg in out.items() if cfg.hook != hook]
    if wrong:
        raise ValueError("each config's hook must be its key: " + ", ".join(wrong))
    first = next(iter(out.values()))
    differ = [f for f in SHARED_FIELDS if len({getattr(cfg, f) for cfg in out.values()}) > 1]
    if differ:
        raise ValueError(f"SAEs trained from one pass share their batches: {', '.join(differ)} must be equal "
                         f"for every hook (e.g. {first.hook}: "
                         + ", ".join(f"{f}={getattr(first, f)}" for f in differ) + ")")
    return out


def _out_dir(out_dir, hook: str):
    if out_dir is None:
        return None
    if callable(out_dir):
        return lambda run_id: Path(out_dir(hook, run_id))
    return Path(out_dir) / hook


def train_saes(
    source,
    cfgs: Mapping[str, TrainConfig | dict],
    *,
    out_dir: str | Path | Callable[[str, str], Path] | None = None,
    mlflow_tracking_uri: str | None = None,
    experiment: str = "freud-sae",
    run_name: str | None = None,
    tags: dict | None = None,
    eval_source=None,
    resume_from: Mapping[str, str | Path] | None = None,
    hook_tags: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, TrainResult]:
    """Train one SAE per hook of `cfgs` ({hook: TrainConfig}) in lockstep, every step on one batch of frame
    positions read for all hooks. `source`: a frame source of all the hooks (`random_frames_multi` gives one read
    per step; a source without it is read per hook, with the same batches). `out_dir`: a directory (each SAE in
    `<out_dir>/<hook>`), or a function of (hook, MLflow run id); default <data_dir>/sae/<run id>. `tags` go on
    every run, `hook_tags[hook]` on that hook's; `run_name` names the parent run. `resume_from`: {hook: checkpoint directory} of a killed multi
    run, every hook at the same step (`resume_points`). Returns {hook: TrainResult}, each with `parent_run_id`."""
    cfgs = _configs(cfgs)
    hooks = list(cfgs)
    shared = next(iter(cfgs.values()))
    if resume_from is not None and set(resume_from) != set(hooks):
        raise ValueError(f"resume_from must name a checkpoint for every hook: {', '.join(hooks)}")
    first = None
    if resume_from is None:  # scale and init: a separate pass, as train_sae reads them
        scale_batches = max(cfg.scale_batches for cfg in cfgs.values())
        first = list(islice(multi_frames(source, hooks, shared.batch_size, shared.seed), scale_batches))
    trainers = {hook: SaeTrainer(source, cfg, eval_source=eval_source, own_rng=True,
                                 resume_from=resume_from[hook] if resume_from is not None else None,
                                 first_batches=[batch[hook] for batch in first] if first is not None else None)
                for hook, cfg in cfgs.items()}
    starts = {hook: trainer.start for hook, trainer in trainers.items()}
    if len(set(starts.values())) > 1:
        raise ValueError(f"resume_from: every hook must resume from the same step, got {starts}")
    start = starts[hooks[0]]
    model = next(iter(trainers.values())).model_name
    uri = mlflow_tracking_uri or settings.mlflow_tracking_uri()
    parent_tags = {KIND_TAG: KIND, "model": model, "hooks": ",".join(hooks), **(tags or {})}
    if resume_from is not None:
        old = {t.saved.get("run_id") for t in trainers.values()}
        parent_tags |= {"resumed_at_step": start, "resumed_runs": ",".join(sorted(map(str, old)))}
    stream = FrameStream(source, hooks, shared.batch_size, shared.seed, skip=start)
    name = run_name or f"multi-{len(hooks)}-{'-'.join(sorted({c.architecture for c in cfgs.values()}))}"
    with TrainingRun(uri, experiment, name, {k: str(v) for k, v in parent_tags.items()}) as parent, \
            contextlib.ExitStack() as children:
        parent.log_params({"hooks": hooks, **{f: getattr(shared, f) for f in SHARED_FIELDS}, "start_step": start})
        for hook, trainer in trainers.items():
            child_tags = {**(tags or {}), **(hook_tags or {}).get(hook, {}), "mlflow.parentRunId": parent.run_id,
                          PARENT_TAG: parent.run_id}
            children.enter_context(trainer.tracked(uri, experiment, None, child_tags, _out_dir(out_dir, hook)))
            parent.client.set_tag(parent.run_id, f"run:{hook}", trainer.run.run_id)
            parent.client.set_tag(parent.run_id, f"dir:{hook}", str(trainer.out_dir))
        started = time.perf_counter()
        for step in range(start + 1, shared.steps + 1):
            batch = next(stream)
            for hook, trainer in trainers.items():
                trainer.step(step, batch[hook])
        elapsed = time.perf_counter() - started
        results = {hook: trainer.finish() for hook, trainer in trainers.items()}
        frames = (shared.steps - start) * shared.batch_size
        parent.log_metrics({"frames_per_s": frames / elapsed if elapsed > 0 else 0.0,
                            **{f"{hook}/eval_fvu": r.metrics["eval/fvu"] for hook, r in results.items()
                               if "eval/fvu" in r.metrics}}, shared.steps)
    for result in results.values():
        result.parent_run_id = parent.run_id
    return results


def resume_points(tracking_uri: str, parent_run_id: str, step: int | None = None) -> dict[str, Path]:
    """{hook: checkpoint directory} to resume the multi run `parent_run_id` from: the latest `checkpoints/step_*`
    every one of its SAEs reached (or `step`), found through the parent run's `dir:<hook>` tags."""
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(parent_run_id).data.tags
    if tags.get(KIND_TAG) != KIND:
        raise ValueError(f"MLflow run {parent_run_id} is not the parent run of SAEs trained together")
    dirs = {key.removeprefix("dir:"): Path(value) for key, value in tags.items() if key.startswith("dir:")}
    steps = {}
    for hook, directory in dirs.items():
        found = directory / "checkpoints"
        steps[hook] = {int(m.group(1)) for p in (found.iterdir() if found.is_dir() else [])
                       if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.pt").is_file()}
    common = set.intersection(*steps.values()) if steps else set()
    if step is None and not common:
        raise FileNotFoundError(f"multi run {parent_run_id}: no checkpoint step reached by all of "
                                f"{', '.join(dirs)}; train again")
    chosen = max(common) if step is None else step
    if chosen not in common:
        raise FileNotFoundError(f"multi run {parent_run_id}: step {chosen} is not checkpointed for every hook "
                                f"(common steps: {sorted(common)})")
    return {hook: directory / "checkpoints" / f"step_{chosen:08d}" for hook, directory in dirs.items()}


def run_saes(
    cfgs: Mapping,
    train,
    dev,
    *,
    runs_dir: Mapping[str, str | Path],
    tracking_uri: str,
    experiment: str | None = None,
    corpus_manifest: str | Path | None = None,
    data_root: str | Path | None = None,
    tags: Mapping[str, str] | None = None,
    resume_from: Mapping[str, str | Path] | None = None,
    selection=None,
    run_name: str | None = None,
    hook_tags: Mapping[str, Mapping[str, str]] | None = None,
) -> dict:
    """`run.run_sae` for several hooks from one pass: {hook: SaeRunConfig} trained together on `train` (evaluated
    on `dev`), then each spliced, gated, registered, promoted and reported on its own (`run.complete_run`), its
    run directory `<runs_dir[hook]>/<run id>/`. Returns {hook: SaeRunResult}."""
    from freud_pipeline.sae.retention import PARTIAL_SUFFIX
    from freud_pipeline.sae.run import EXPERIMENT, SELECTION_TAG, complete_run

    model = next(iter(cfgs.values())).model_name or getattr(train, "model_name", None)
    if not model:
        raise ValueError("run_saes needs the Whisper model of the frames: set model_name in the configs")
    dirs = {hook: Path(runs_dir[hook]) for hook in cfgs}
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    tags = {**(tags or {}), **({SELECTION_TAG: selection.digest} if selection is not None else {})}
    started = time.perf_counter()
    trained = train_saes(train, {hook: cfg.train_config().model_copy(update={"model_name": model})
                                 for hook, cfg in cfgs.items()},
                         out_dir=lambda hook, run_id: dirs[hook] / f"{run_id}{PARTIAL_SUFFIX}",
                         mlflow_tracking_uri=tracking_uri, experiment=experiment or EXPERIMENT, run_name=run_name,
                         tags=tags, hook_tags=hook_tags, eval_source=dev, resume_from=resume_from)
    train_s = time.perf_counter() - started
    return {hook: complete_run(cfgs[hook], trained[hook], runs_dir=dirs[hook], tracking_uri=tracking_uri,
                               model=model, corpus_manifest=corpus_manifest, data_root=data_root, tags=tags,
                               selection=selection, train_seconds=train_s)
            for hook in cfgs}
