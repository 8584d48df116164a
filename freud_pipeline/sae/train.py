"""Train an SAE on frames from a frame source, tracked as one MLflow run, resumable bit-for-bit.

Layout of `out_dir` after a run: sae_weights.safetensors + cfg.json (the final SAE, taking raw activations),
trainer_state.pt (to resume or extend), eval_report.json, feature_density.png, checkpoints/step_XXXXXXXX/.
`freud_pipeline.sae.run.run_sae` gives every run its own directory, written under a temporary name and renamed
when the run is complete (docs/SAE_FORMAT.md, "Run directories").
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


def _initial_scale(source, cfg: TrainConfig, sae: SparseAutoencoder, d_in: int) -> float:
    """Input scale and data-dependent init from the first batches, read in a separate pass so that the training
    stream's position stays equal to the step count (which is what resuming relies on)."""
    batches = islice(source.random_frames(cfg.hook, cfg.batch_size, cfg.seed), cfg.scale_batches)
    first = [torch.as_tensor(b).float() for b in batches]
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
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig(**cfg)
    mlflow_tracking_uri = mlflow_tracking_uri or settings.mlflow_tracking_uri()
    source = as_frame_source(source, cfg.hook)
    eval_source = as_frame_source(eval_source, cfg.hook) if eval_source is not None else None
    device = resolve_device(cfg.device)
    d_in = source.width(cfg.hook)
    n_latents = cfg.latents_for(d_in)
    model_name = cfg.model_name or getattr(source, "model_name", None) or "unknown"
    saved = load_trainer_state(resume_from) if resume_from is not None else None
    if saved is not None:
        _check_resumable(saved["config"], cfg)

    torch.manual_seed(cfg.seed)
    sae = architecture_class(cfg.architecture).from_cfg({"d_in": d_in, "d_sae": n_latents, **cfg.model_dump()})
    sae.metadata = {"hook_name": cfg.hook, "model_name": model_name}
    sae.to(device)
    optimizer = make_optimizer(cfg, sae)
    scheduler = LambdaLR(optimizer, lr_factor(cfg))
    tracker = FiringTracker(n_latents, cfg.dead_after_frames, device)
    if saved is not None:
        sae.load_state_dict(saved["sae"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        tracker.load_state_dict(saved["firing"])
        scale, start = saved["input_scale"], saved["step"]
        restore_rng(saved["rng"])
    else:
        scale, start = _initial_scale(source, cfg, sae, d_in), 0
    stream = FrameStream(source, cfg.hook, cfg.batch_size, cfg.seed, skip=start)
    bf16 = device.type == "cuda" and cfg.bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    run_tags = {"model": model_name, "hook": cfg.hook, "architecture": cfg.architecture}
    run_tags |= tags or {}
    if saved is not None:
        run_tags |= {"resumed_from": resume_from, "resumed_from_run": saved.get("run_id"), "resumed_at_step": start}
    run_name = run_name or f"{cfg.architecture}-{cfg.hook}-{n_latents}"

    def checkpoint(directory: Path, step: int) -> SparseAutoencoder:
        shipped = folded_copy(sae, scale)
        extra = {"step": step, "mlflow_run_id": run.run_id, "train_config": cfg.model_dump()}
        save_checkpoint(shipped, directory, extra)
        save_trainer_state(directory, {
            "step": step, "config": cfg.model_dump(), "run_id": run.run_id, "input_scale": scale,
            "sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "firing": tracker.state_dict(), "rng": capture_rng(),
        })  # fmt: skip
        return shipped

    with TrainingRun(mlflow_tracking_uri, experiment, run_name, {k: str(v) for k, v in run_tags.items()}) as run:
        run.log_params({
            **cfg.model_dump(), "d_in": d_in, "n_latents_resolved": n_latents, "input_scale": scale,
            "start_step": start, "device_resolved": str(device),
        })  # fmt: skip
        if callable(out_dir):
            out_dir = Path(out_dir(run.run_id))
        else:
            out_dir = Path(out_dir) if out_dir is not None else settings.data_dir() / "sae" / run.run_id
        metrics: dict[str, float] = {}
        started, frames_done = time.perf_counter(), 0
        for step in range(start + 1, cfg.steps + 1):
            x = next(stream).to(device, torch.float32) * scale
            out, grad_norm, fired_counts = training_step(
                sae, x, optimizer, scheduler, tracker, cfg.grad_clip, autocast
            )
            frames_done += x.shape[0]

            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = _step_metrics(out, x, tracker, fired_counts) | {
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "frames_per_s": frames_done / (time.perf_counter() - started),
                }
                run.log_metrics(metrics, step)
                log.info("step %d/%d loss %.4g fvu %.4f", step, cfg.steps, metrics["loss"], metrics["fvu"])
            # The last step's evaluation is the final one below, on the shipped SAE.
            if eval_source is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                report = evaluate_sae(
                    sae, eval_source, cfg.hook, cfg.eval_batches, batch_size=cfg.batch_size, seed=cfg.seed,
                    input_scale=scale,
                )  # fmt: skip
                run.log_metrics({f"eval/{k}": v for k, v in report.scalars().items()}, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                checkpoint(out_dir / "checkpoints" / f"step_{step:08d}", step)
        elapsed = time.perf_counter() - started
        final = checkpoint(out_dir, cfg.steps)
        sha256 = checkpoint_sha256(out_dir)
        run.client.set_tag(run.run_id, "checkpoint_sha256", sha256)
        eval_metrics = _publish_final(run, final, cfg, source, eval_source, out_dir)

    return TrainResult(
        run_id=run.run_id,
        checkpoint_dir=out_dir,
        metrics={**metrics, **eval_metrics},
        sae=final,
        input_scale=scale,
        steps=cfg.steps,
        frames_per_second=frames_done / elapsed if elapsed > 0 else float("nan"),
        sha256=sha256,
    )
