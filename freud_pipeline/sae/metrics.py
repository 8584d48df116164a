"""Quality metrics of an SAE: reconstruction (FVU, explained variance) and sparsity (L0, dead, dense, density)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from freud_pipeline.sae.base import SparseAutoencoder

DENSE_FREQUENCY = 0.1  # a latent firing on more than 10% of frames is "dense": likely not a specific feature


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: sum |x - x_hat|² / sum |x - mean(x)|²."""
    return float((x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum().clamp_min(1e-30))


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - Var(x - x_hat) / Var(x), summed over dimensions; unlike 1 - FVU it ignores a constant offset."""
    residual = (x - x_hat).double()
    return float(1 - residual.var(0).sum() / x.double().var(0).sum().clamp_min(1e-30))


def l0(latents: Tensor) -> float:
    """Mean number of active latents per frame."""
    return float((latents != 0).sum(-1).double().mean())


def firing_frequency(latents: Tensor) -> Tensor:
    """Per latent, the fraction of frames on which it is active."""
    return (latents != 0).double().mean(0)


def dead_fraction(frequency: Tensor) -> float:
    return float((frequency == 0).double().mean())


def dense_fraction(frequency: Tensor, threshold: float = DENSE_FREQUENCY) -> float:
    return float((frequency > threshold).double().mean())


def density_histogram(frequency: Tensor, n_bins: int = 40, floor: float = 1e-7) -> dict:
    """Histogram of log10(firing frequency) of the latents that fired; dead ones are counted apart."""
    frequency = frequency.detach().double().cpu().numpy()
    alive = frequency[frequency > 0]
    edges = np.linspace(np.log10(floor), 0.0, n_bins + 1)
    counts, _ = np.histogram(np.log10(np.clip(alive, floor, 1.0)), bins=edges)
    return {"log10_bin_edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((frequency == 0).sum())}


@dataclass
class EvalReport:
    n_frames: int
    fvu: float
    explained_variance: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    histogram: dict
    firing_frequency: Tensor = field(repr=False)
    prefix_fvu: dict[int, float] = field(default_factory=dict)  # Matryoshka SAEs: FVU of each nested prefix

    def scalars(self) -> dict[str, float]:
        scalars = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}
        return scalars | {f"fvu_prefix_{size}": v for size, v in self.prefix_fvu.items()}

    def to_json(self) -> dict:
        return {**self.scalars(), "histogram": self.histogram}


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    source,
    hook: str,
    n_batches: int = 8,
    *,
    batch_size: int = 4096,
    seed: int = 0,
    input_scale: float = 1.0,
) -> EvalReport:
    """Metrics over `n_batches` batches of `source.random_frames(hook, batch_size, seed)`.

    `input_scale` evaluates an unfolded SAE (trained on scaled inputs) on the scale it was trained at; all
    metrics except MSE are invariant to it, and MSE is reported in raw units. An SAE with nested prefixes
    (`prefix_reconstructions`, Matryoshka) also gets the FVU of each prefix.
    """
    from freud_pipeline.sae.sources import as_frame_source

    source = as_frame_source(source, hook)
    was_training = sae.training
    sae.eval()
    device = sae.device
    d = source.width(hook)
    n = 0
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros_like(sum_x)
    sum_r = torch.zeros_like(sum_x)
    sum_r2 = torch.zeros_like(sum_x)
    sq_err = 0.0
    active = 0.0
    fire_counts = torch.zeros(sae.n_latents, dtype=torch.float64, device=device)
    nested = getattr(sae, "prefix_reconstructions", None)
    prefix_sq_err: dict[int, float] = {}
    batches = iter(source.random_frames(hook, batch_size, seed))
    for _ in range(n_batches):
        x = torch.as_tensor(next(batches)).to(device, torch.float32) * input_scale
        out = sae(x)
        for size, x_hat in (nested(out) if nested is not None else {}).items():
            err = float(((x - x_hat) / input_scale).double().pow(2).sum())
            prefix_sq_err[size] = prefix_sq_err.get(size, 0.0) + err
        residual = ((x - out.x_hat) / input_scale).double()
        x = x.double() / input_scale
        n += x.shape[0]
        sum_x += x.sum(0)
        sum_x2 += x.pow(2).sum(0)
        sum_r += residual.sum(0)
        sum_r2 += residual.pow(2).sum(0)
        sq_err += float(residual.pow(2).sum())
        fired = out.fired_counts()
        active += float(fired.sum())
        fire_counts += fired.to(fire_counts)
    sae.train(was_training)
    total_var = float((sum_x2 - sum_x.pow(2) / n).sum())
    residual_var = float((sum_r2 - sum_r.pow(2) / n).sum())
    frequency = (fire_counts / n).cpu()
    return EvalReport(
        n_frames=n,
        fvu=sq_err / max(total_var, 1e-30),
        explained_variance=1 - residual_var / max(total_var, 1e-30),
        mse=sq_err / (n * d),
        l0=active / n,
        dead_fraction=dead_fraction(frequency),
        dense_fraction=dense_fraction(frequency),
        histogram=density_histogram(frequency),
        firing_frequency=frequency,
        prefix_fvu={size: err / max(total_var, 1e-30) for size, err in prefix_sq_err.items()},
    )
