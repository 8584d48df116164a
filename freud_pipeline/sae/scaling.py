"""Input scaling: train on activations rescaled to a mean norm of sqrt(d_in), ship weights that take raw ones.

A fixed scale (estimated once from the first batches) makes hyperparameters such as lr and l1_alpha transfer
between hook points whose activation norms differ by orders of magnitude. Folding it into the biases at save
time (see `SparseAutoencoder.fold_input_scale`) means nobody downstream has to know it existed.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import Tensor

from freud_pipeline.sae.base import SparseAutoencoder


def estimate_input_scale(batches: Iterable[Tensor], d_in: int) -> float:
    norms = torch.cat([batch.float().norm(dim=-1) for batch in batches])
    mean_norm = float(norms.mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot scale activations whose mean norm is {mean_norm}; are the frames all zero?")
    return math.sqrt(d_in) / mean_norm


def folded_copy(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of an SAE trained on `scale * x` that takes raw x (latents come out divided by `scale`)."""
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(scale)
    folded.metadata = {**sae.metadata, "input_scale_folded": scale}
    return folded.eval()
