"""Train an SAE on frames from a frame source, tracked as one MLflow run, resumable bit-for-bit.

Layout of `out_dir` after a run: sae_weights.safetensors + cfg.json (the final SAE, taking raw activations),
trainer_state.pt (to resume or extend), eval_report.json, feature_density.png, checkpoints/step_XXXXXXXX/.
`freud_pipeline.sae.run.run_sae` gives every run its own directory, written under a temporary name and renamed
when the run is complete (docs/SAE_FORMAT.md, "Run directories").

`SaeTrainer` is one SAE's training (step, evaluation, checkpoints, MLflow run); `train_sae` drives one on its own
stream of batches, `sae.multi.train_saes` one per hook in lockstep on one shared read of the activations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from freud_pipeline import settings
from freud_pipeline.devices import resolve_device
from freud_pipeline.sae.architectures import architecture_class
from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder
from freud_pipeline.sae.checkpoint import CFG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_sha256, save_checkpoint
from freud_pipeline.sae.config import TrainConfig
from freud_pipeline.sae.density_plot import write_density_plot
from freud_pipeline.sae.firing import FiringTracker
from freud_pipeline.sae.metrics import DENSE_FREQUENCY, evaluate_sae, fvu
from freud_pipeline.sae.resume import capture_rng, load_trainer_state, restore_rng, save_trainer_state
from freud_pipeline.sae.scaling import estimate_input_scale, folded_copy
from freud_pipeline.sae.sources import FrameStream, as_frame_source
from freud_pipeline.sae.tracking import TrainingRun

log = logging.getLogger(__name__)

# Changing any of these between a checkpoint and its resumption would silently train a different model.
_TRAJECTORY_FIELDS = (
    "architecture", "hook", "expansion_factor", "n_latents", "k", "k_aux", "auxk_alpha", "l1_alpha",
    "recon_alpha", "threshold_decay", "l0_coefficient", "l0_target", "jumprelu_bandwidth", "matryoshka_prefixes",
    "normalize_inputs", "scale_batches", "lr", "optimiser", "optimiser_eps",
    "schedule", "warmup_steps", "batch_size", "grad_clip", "weight_decay", "seed", "dead_after_frames",
)  # fmt: skip


@dataclass
class TrainResult:
    run_id: str
    checkpoint_dir: Path
    metrics: dict[str, float]  # last logged step metrics plus the final evaluation ("eval/...")
    sae: SparseAutoencoder  # the final SAE, input scale folded in, eval mode
    input_scale: float
    steps: int
    frames_per_second: float
    sha256: str = ""  # of the final weights file (checkpoint_sha256)
    parent_run_id: str = ""  # the MLflow run grouping the SAEs trained together (sae.multi.train_saes)


def lr_factor(cfg: TrainConfig):
    def factor(steps_done: int) -> float:
        warm = min(1.0, (steps_done + 1) / max(1, cfg.warmup_steps))
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, steps_done / cfg.steps)))
        return warm

    return factor


def make_optimizer(cfg: TrainConfig, sae: SparseAutoencoder) -> torch.optim.Optimizer:
    if cfg.optimiser == "radam":
        return torch.optim.RAdam(sae.parameters(), lr=cfg.lr, eps=cfg.optimiser_eps, weight_decay=cfg.weight_decay)
    # The fused kernel does Adam's element-wise update in one pass: a few times faster than the default on CPU.
    fused = sae.device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in sae.parameters())
    return torch.optim.Adam(
        sae.parameters(), lr=cfg.lr, eps=cfg.optimiser_eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    # A field missing from an older trainer state did not exist yet: that run trained with the field's default.
    saved = {f: saved.get(f, TrainConfig.model_fields[f].default) for f in _TRAJECTORY_FIELDS}
    changed = [f for f in _TRAJECTORY_FIELDS if saved[f] != getattr(cfg, f)]
    if changed:
        raise CheckpointError(
            "cannot resume: the config differs from the checkpoint's in "
            + ", ".join(f"{f} ({saved[f]!r} -> {getattr(cfg, f)!r})" for f in changed)
        )


def training_step(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler,
    tracker: FiringTracker,
    grad_clip: float | None,
    autocast=contextlib.nullcontext(),
) -> tuple[ForwardOutput, torch.Tensor, torch.Tensor]:
    """One optimisation step on the batch x (already scaled): (forward output, gradient norm, per-latent counts
    of the frames each fired on). benchmarks/train.py times exactly this."""
    sae.train()
    with autocast:
        out = sae(x, dead_mask=tracker.dead_mask())
    optimizer.zero_grad(set_to_none=True)
    out.loss_parts["loss"].backward()
    sae.before_optimizer_step()
    grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip or math.inf)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    sae.after_optimizer_step()
    fired_counts = out.fired_counts()
    tracker.update_fired(x.shape[0], fired_counts > 0)
    return out, grad_norm, fired_counts


def _step_metrics(out: ForwardOutput, x: torch.Tensor, tracker: FiringTracker, fired_counts: torch.Tensor):
    return {
        **{("loss" if k == "loss" else f"loss_{k}"): float(v.detach()) for k, v in out.loss_parts.items()},
        "fvu": fvu(x, out.x_hat.detach().float()),
        "l0": out.l0(),
        "dead_pct": 100 * tracker.dead_fraction(),
        "dense_pct": 100 * float((fired_counts / x.shape[0] > DENSE_FREQUENCY).double().mean()),
    }


def _initial_scale(first: list[torch.Tensor], cfg: TrainConfig, sae: SparseAutoencoder, d_in: int) -> float:
    """Input scale and data-dependent init from the first `cfg.scale_batches` batches, read in a separate pass so
    that the training stream's position stays equal to the step count (which is what resuming relies on)."""
    first = [torch.as_tensor(b).float() for b in first]
    scale = estimate_input_scale(first, d_in) if cfg.normalize_inputs else 1.0
    sae.init_from_data(torch.cat(first).to(sae.device) * scale)
    return scale


def _publish_final(run: TrainingRun, final: SparseAutoencoder, cfg: TrainConfig, source, eval_source, out_dir: Path):
    """Evaluate the shipped (folded) SAE on raw frames; write and upload the report, the plot and the checkpoint."""
    frames = eval_source if eval_source is not None else source
    report = evaluate_sae(final, frames, cfg.hook, cfg.eval_batches, batch_size=cfg.batch_size, seed=cfg.seed)
    eval_metrics = {f"eval/{k}": v for k, v in report.scalars().items()}
    run.log_metrics(eval_metrics, cfg.steps)
    report_path = out_dir / "eval_report.json"
    on = "eval_source" if eval_source is not None else "training source"
    report_path.write_text(json.dumps({**report.to_json(), "frames": on}, indent=2))
    plot = write_density_plot(report.histogram, out_dir, title=f"{cfg.architecture} {cfg.hook} feature density")
    for name in (WEIGHTS_FILE, CFG_FILE):
        run.log_artifact(out_dir / name, "checkpoint")
    run.log_artifact(report_path)
    run.log_artifact(plot)
    return eval_metrics


class SaeTrainer:
    """One SAE's training: its model, optimiser, schedule, firing tracker, MLflow run and checkpoints, advanced one
    batch at a time. `train_sae` drives one; `sae.multi.train_saes` drives one per hook in lockstep on a shared
    batch. Everything an SAE's trajectory depends on is its own (`own_rng`: its own RNG state too, swapped in
    around each step), so an SAE trained beside others ends with the weights it would have had alone.

    `first_batches`: the first `cfg.scale_batches` batches of the source (input scale, init), when the caller read
    them already; else they are read here. `resume_from`: a checkpoint directory (its trainer_state.pt)."""

    def __init__(self, source, cfg: TrainConfig | dict, *, eval_source=None, resume_from: str | Path | None = None,
                 first_batches: list[torch.Tensor] | None = None, own_rng: bool = False):
        cfg = self.cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig(**cfg)
        self.source = as_frame_source(source, cfg.hook)
        self.eval_source = as_frame_source(eval_source, cfg.hook) if eval_source is not None else None
        self.device = resolve_device(cfg.device)
        self.d_in = self.source.width(cfg.hook)
        self.n_latents = cfg.latents_for(self.d_in)
        self.model_name = cfg.model_name or getattr(self.source, "model_name", None) or "unknown"
        self.resume_from = resume_from
        saved = self.saved = load_trainer_state(resume_from) if resume_from is not None else None
        if saved is not None:
            _check_resumable(saved["config"], cfg)
        self.own_rng = own_rng
        outer = capture_rng() if own_rng else None

        torch.manual_seed(cfg.seed)
        sae = self.sae = architecture_class(cfg.architecture).from_cfg(
            {"d_in": self.d_in, "d_sae": self.n_latents, **cfg.model_dump()})
        sae.metadata = {"hook_name": cfg.hook, "model_name": self.model_name}
        sae.to(self.device)
        self.optimizer = make_optimizer(cfg, sae)
        self.scheduler = LambdaLR(self.optimizer, lr_factor(cfg))
        self.tracker = FiringTracker(self.n_latents, cfg.dead_after_frames, self.device)
        if saved is not None:
            sae.load_state_dict(saved["sae"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.tracker.load_state_dict(saved["firing"])
            self.scale, self.start = saved["input_scale"], saved["step"]
            restore_rng(saved["rng"])
        else:
            if first_batches is None:
                first_batches = list(islice(self.source.random_frames(cfg.hook, cfg.batch_size, cfg.seed),
                                            cfg.scale_batches))
            self.scale, self.start = _initial_scale(first_batches[: cfg.scale_batches], cfg, sae, self.d_in), 0
        bf16 = self.device.type == "cuda" and cfg.bf16
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if own_rng:  # this SAE's RNG state from here on; the caller's is left as it was
            self.rng = capture_rng()
            restore_rng(outer)
        self.run: TrainingRun | None = None
        self.out_dir: Path | None = None
        self.metrics: dict[str, float] = {}
        self.frames_done = 0
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def tracked(self, mlflow_tracking_uri: str | None = None, experiment: str = "freud-sae",
                run_name: str | None = None, tags: dict | None = None,
                out_dir: str | Path | Callable[[str], Path] | None = None):
        """The SAE's MLflow run (FINISHED on a clean exit, FAILED or KILLED otherwise), params logged and the output
        directory resolved (`out_dir` as in `train_sae`)."""
        cfg, saved = self.cfg, self.saved
        run_tags = {"model": self.model_name, "hook": cfg.hook, "architecture": cfg.architecture} | (tags or {})
        if saved is not None:
            run_tags |= {"resumed_from": self.resume_from, "resumed_from_run": saved.get("run_id"),
                         "resumed_at_step": self.start}
        run_name = run_name or f"{cfg.architecture}-{cfg.hook}-{self.n_latents}"
        with TrainingRun(mlflow_tracking_uri or settings.mlflow_tracking_uri(), experiment, run_name,
                         {k: str(v) for k, v in run_tags.items()}) as run:
            self.run = run
            run.log_params({
                **cfg.model_dump(), "d_in": self.d_in, "n_latents_resolved": self.n_latents,
                "input_scale": self.scale, "start_step": self.start, "device_resolved": str(self.device),
            })  # fmt: skip
            if callable(out_dir):
                self.out_dir = Path(out_dir(run.run_id))
            else:
                self.out_dir = Path(out_dir) if out_dir is not None else settings.data_dir() / "sae" / run.run_id
            self.started = time.perf_counter()
            yield self

    @contextlib.contextmanager
    def _rng(self):
        if not self.own_rng:
            yield
            return
        outer = capture_rng()
        restore_rng(self.rng)
        try:
            yield
        finally:
            self.rng = capture_rng()
            restore_rng(outer)

    def step(self, step: int, batch: torch.Tensor) -> None:
        """Step number `step` (1-based) on `batch` (raw frames of this SAE's hook): train, log, evaluate and
        checkpoint on the config's cadence (the last step's evaluation and checkpoint are `finish`'s)."""
        cfg, run = self.cfg, self.run
        x = batch.to(self.device, torch.float32) * self.scale
        with self._rng():
            out, grad_norm, fired_counts = training_step(
                self.sae, x, self.optimizer, self.scheduler, self.tracker, cfg.grad_clip, self.autocast
            )
            self.frames_done += x.shape[0]
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.metrics = _step_metrics(out, x, self.tracker, fired_counts) | {
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "frames_per_s": self.frames_done / (time.perf_counter() - self.started),
                }
                run.log_metrics(self.metrics, step)
                log.info("%s step %d/%d loss %.4g fvu %.4f", cfg.hook, step, cfg.steps, self.metrics["loss"],
                         self.metrics["fvu"])
            if self.eval_source is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                report = evaluate_sae(
                    self.sae, self.eval_source, cfg.hook, cfg.eval_batches, batch_size=cfg.batch_size,
                    seed=cfg.seed, input_scale=self.scale,
                )  # fmt: skip
                run.log_metrics({f"eval/{k}": v for k, v in report.scalars().items()}, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                self._checkpoint(self.out_dir / "checkpoints" / f"step_{step:08d}", step)

    def _checkpoint(self, directory: Path, step: int) -> SparseAutoencoder:
        cfg, run = self.cfg, self.run
        shipped = folded_copy(self.sae, self.scale)
        save_checkpoint(shipped, directory, {"step": step, "mlflow_run_id": run.run_id,
                                             "train_config": cfg.model_dump()})
        save_trainer_state(directory, {
            "step": step, "config": cfg.model_dump(), "run_id": run.run_id, "input_scale": self.scale,
            "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "firing": self.tracker.state_dict(), "rng": capture_rng(),
        })  # fmt: skip
        return shipped

    def finish(self) -> TrainResult:
        """The final checkpoint in the output directory, its digest, the evaluation of the shipped SAE."""
        cfg, run, out_dir = self.cfg, self.run, self.out_dir
        elapsed = time.perf_counter() - self.started
        with self._rng():
            final = self._checkpoint(out_dir, cfg.steps)
        sha256 = checkpoint_sha256(out_dir)
        run.client.set_tag(run.run_id, "checkpoint_sha256", sha256)
        eval_metrics = _publish_final(run, final, cfg, self.source, self.eval_source, out_dir)
        return TrainResult(
            run_id=run.run_id,
            checkpoint_dir=out_dir,
            metrics={**self.metrics, **eval_metrics},
            sae=final,
            input_scale=self.scale,
            steps=cfg.steps,
            frames_per_second=self.frames_done / elapsed if elapsed > 0 else float("nan"),
            sha256=sha256,
        )


def train_sae(
    source,
    cfg: TrainConfig | dict,
    *,
    out_dir: str | Path | Callable[[str], Path] | None = None,
    mlflow_tracking_uri: str | None = None,
    experiment: str = "freud-sae",
    run_name: str | None = None,
    tags: dict | None = None,
    eval_source=None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train `cfg.architecture` on `source` (a frame source, or a 2-D tensor/array of frames).

    `out_dir`: a directory, or a function of the MLflow run id giving one; default <data_dir>/sae/<run id>.
    `eval_source` is evaluated every `cfg.eval_every` steps and at the end (else the training source, at the end).
    `resume_from`: a checkpoint directory of an earlier run (its trainer_state.pt); the run continues in a new
    MLflow run tagged with the old one and ends with the weights the uninterrupted run would have had.
    """
    trainer = SaeTrainer(source, cfg, eval_source=eval_source, resume_from=resume_from)
    cfg = trainer.cfg
    stream = FrameStream(trainer.source, cfg.hook, cfg.batch_size, cfg.seed, skip=trainer.start)
    with trainer.tracked(mlflow_tracking_uri, experiment, run_name, tags, out_dir):
        for step in range(trainer.start + 1, cfg.steps + 1):
            trainer.step(step, next(stream))
        return trainer.finish()
