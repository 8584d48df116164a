"""BatchTopK sparse autoencoder (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * batch largest activations of the whole batch instead of k per frame, so busy frames can
use more latents than quiet ones. Inference cannot depend on the rest of a batch, so it keeps every activation
above a threshold: a running average of the smallest activation training kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freud_pipeline.sae.topk import TopKSAE


def batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k * N largest entries of pre [N, n] as (rows sorted ascending, cols, values)."""
    n_rows, n_cols = pre.shape
    n_keep = k * n_rows
    # A top-(k·N) over all N·n entries is the bottleneck on CPU. The winners almost always lie within each row's
    # top 4k; if some row's 4k-th value still beats the cut, that row may hold more winners, so fall back.
    per_row = min(4 * k, n_cols)
    row_values, row_cols = pre.topk(per_row, dim=-1, sorted=True)
    values, flat = row_values.reshape(-1).topk(n_keep, sorted=False)
    if per_row < n_cols and bool((row_values[:, -1] > values.min()).any()):
        values, flat_all = pre.reshape(-1).topk(n_keep, sorted=False)
        flat_all, order = flat_all.sort()
        return flat_all // n_cols, flat_all % n_cols, values[order]
    flat, order = flat.sort()
    rows = flat // per_row
    return rows, row_cols.reshape(-1)[flat], values[order]


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int = 32,
        k_aux: int | None = None,
        auxk_alpha: float = 1 / 32,
        threshold_decay: float = 0.99,
    ):
        super().__init__(d_in, n_latents, k, k_aux, auxk_alpha)
        self.threshold_decay = threshold_decay
        # 0 means "not estimated yet": inference then keeps every positive activation.
        self.register_buffer("threshold", torch.zeros(()))

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.training:
            rows, cols = (pre > self.threshold).nonzero(as_tuple=True)  # row-major, so rows come sorted
            return rows, cols, pre[rows, cols]
        rows, cols, values = batch_topk(pre, self.k)
        self._update_threshold(values)
        return rows, cols, values

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        kept = kept[kept > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().float()
        if float(self.threshold) == 0.0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * smallest)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)

    def export_tensors(self) -> dict[str, Tensor]:
        # Per latent, as SAELens' JumpReLU SAE (the architecture it saves BatchTopK SAEs as) stores it.
        return {**super().export_tensors(), "threshold": self.threshold.expand(self.n_latents)}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        super().load_exported(tensors)
        threshold = tensors["threshold"]  # [d_sae], or a scalar in checkpoints written before the JumpReLU layout
        if threshold.dim() > 0:
            if threshold.shape != (self.n_latents,):
                raise ValueError(f"threshold has shape {tuple(threshold.shape)}; expected () or ({self.n_latents},)")
            if not bool((threshold == threshold[0]).all()):
                raise ValueError("threshold differs between latents; a BatchTopK SAE has one threshold for all")
            threshold = threshold[0]
        self.threshold.copy_(threshold)
