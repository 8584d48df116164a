"""TopK sparse autoencoder with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec z + b_dec, with unit-norm decoder rows.
Training minimises FVU + auxk_alpha * AuxK, where AuxK asks the k_aux most active *dead* latents to reconstruct
the (detached) residual x - x_hat, giving dead latents a gradient again. AuxK sees the same ReLU'd
pre-activations as the encoder, so it reaches dead latents that are still positive on some frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder


def sparse_decode(W_dec: Tensor, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """sum_j values_j * W_dec[cols_j] per row; rows must be sorted. Never builds the dense [N, n] @ W_dec product,
    which is the dominant cost of a step on CPU."""
    offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))


def _exclusive_cumsum(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, 0) - counts


class Entries:
    """The active entries (rows ascending, cols) of a sparse [n_rows, n_cols] matrix, indexed both ways.

    Every product a top-k layer needs is an embedding bag: by row (decode: one bag per frame) or by column
    (weight gradients: one bag per latent, over the entries sorted by column). The column order is computed once,
    on first use, and shared by the encoder's and the decoder's backward."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int):
        self.rows, self.cols, self.n_rows, self.n_cols = rows, cols, n_rows, n_cols
        self.row_offsets = _exclusive_cumsum(torch.bincount(rows, minlength=n_rows))
        self._by_col: tuple[Tensor, Tensor, Tensor] | None = None

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(permutation sorting the entries by column, their rows in that order, one offset per column)."""
        if self._by_col is None:
            order = torch.argsort(self.cols, stable=True)
            offsets = _exclusive_cumsum(torch.bincount(self.cols, minlength=self.n_cols))
            self._by_col = (order, self.rows[order], offsets)
        return self._by_col

    def decode(self, weight: Tensor, values: Tensor) -> Tensor:
        """[n_rows, d]: per row, the sum of values_j * weight[cols_j] (no autograd)."""
        return F.embedding_bag(self.cols, weight, self.row_offsets, mode="sum", per_sample_weights=values)

    def transpose_product(self, values: Tensor, dense: Tensor) -> Tensor:
        """Sᵀ @ dense for S = this matrix holding `values`: [n_cols, d] (no autograd)."""
        order, rows_by_col, offsets = self.by_col()
        return F.embedding_bag(rows_by_col, dense, offsets, mode="sum", per_sample_weights=values[order])

    def entry_dots(self, dense: Tensor, weight: Tensor) -> Tensor:
        """Per entry j, dense[rows_j] · weight[cols_j]: the gradient of `decode` with respect to its values."""
        # The kernel behind embedding_bag's per_sample_weights gradient; `rows` is its offset2bag.
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dense, weight, self.cols, self.row_offsets, self.rows, 0, -1
        )


class ChosenPreActivations(torch.autograd.Function):
    """Entries (rows, cols) of centered @ weightᵀ + bias, already computed without autograd, with a backward that
    touches only those entries. A top-k layer's gradient is k-sparse per frame; the dense backward (two
    [N, n] x [n, d] products and [N, n] masks) would be most of a training step on CPU."""

    @staticmethod
    def forward(ctx, centered, weight, bias, chosen, entries):
        ctx.save_for_backward(centered, weight)
        ctx.entries = entries
        return chosen.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad_centered = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_centered = entries.decode(weight, grad.to(weight.dtype)).to(centered.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = entries.transpose_product(grad.to(centered.dtype), centered).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = weight.new_zeros(weight.shape[0]).index_add_(0, entries.cols, grad.to(weight.dtype))
        return grad_centered, grad_weight, grad_bias, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j values_j · weight[cols_j] per row, with the weight gradient as a by-column embedding bag (sharing the
    column sort with the encoder's backward) instead of embedding_bag's own sort-and-scatter backward."""

    @staticmethod
    def forward(ctx, weight, values, entries):
        ctx.save_for_backward(weight, values)
        ctx.entries = entries
        return entries.decode(weight, values.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, values = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad = grad.to(weight.dtype).contiguous()
        grad_weight = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_weight = entries.transpose_product(values.to(weight.dtype), grad)
        if ctx.needs_input_grad[1]:
            grad_values = entries.entry_dots(grad, weight).to(values.dtype)
        return grad_weight, grad_values, None


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    total = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (x_hat - x).pow(2).sum() / total


class TopKSAE(SparseAutoencoder):
    architecture = "topk"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, k_aux: int | None = None, auxk_alpha: float = 1 / 32):
        super().__init__(d_in, n_latents)
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents ({n_latents}); got {k}")
        self.k = k
        self.k_aux = k_aux if k_aux is not None else d_in // 2  # paper's heuristic, Appendix B.1
        self.auxk_alpha = auxk_alpha
        self.encoder = nn.Linear(d_in, n_latents)
        nn.init.zeros_(self.encoder.bias)
        # Decoder starts as the encoder's rows (the paper's transpose init, in this layout) on the unit sphere.
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.normalize_decoder()

    # --- selection -------------------------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return F.relu(self.encoder(x - self.b_dec))

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Active entries as (rows sorted ascending, cols, values)."""
        values, cols = pre.topk(self.k, dim=-1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)
        return rows, cols.reshape(-1), values.reshape(-1)

    def _dense(self, pre: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
        return torch.zeros_like(pre, dtype=values.dtype).index_put_((rows, cols), values)

    # --- interface -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return self._dense(pre, *self.select(pre))

    def decode(self, latents: Tensor) -> Tensor:
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        centered = x - self.b_dec
        with torch.no_grad():  # the dense pass only picks the winners; autograd sees just those (see above)
            pre = self.encoder(centered).relu_()
            rows, cols, chosen = self.select(pre)
            entries = Entries(rows, cols, x.shape[0], self.n_latents)
        values = self._differentiable(centered, entries, chosen)
        x_hat = SparseDecode.apply(self.W_dec, values, entries) + self.b_dec
        fvu = fraction_of_variance_unexplained(x, x_hat)
        auxk = self.auxk_loss(pre, centered, x - x_hat, dead_mask) if self.training else x_hat.new_zeros(())
        return ForwardOutput(
            x_hat=x_hat,
            # Built only if read (the trainer's firing statistics use the entries), and without keeping `pre`.
            latents=lambda: values.new_zeros(x.shape[0], self.n_latents).index_put_((rows, cols), values),
            loss_parts={"fvu": fvu, "auxk": auxk, "loss": fvu + self.auxk_alpha * auxk},
            active=(rows, cols, values.detach()),
            n_latents=self.n_latents,
        )

    def _differentiable(self, centered: Tensor, entries: Entries, chosen: Tensor) -> Tensor:
        # ReLU again so that a chosen entry at exactly 0 passes no gradient, as the dense ReLU would.
        return F.relu(ChosenPreActivations.apply(centered, self.encoder.weight, self.encoder.bias, chosen, entries))

    def auxk_loss(self, pre: Tensor, centered: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        if dead_mask is None or not bool(dead_mask.any()):
            return residual.new_zeros((), dtype=torch.float32)
        residual = residual.detach()  # AuxK must not pull the live reconstruction towards the dead latents
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.k_aux, len(dead))
        with torch.no_grad():
            chosen, picked = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)  # 2x pre[:, dead]
            rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k_aux)
            entries = Entries(rows, dead[picked].reshape(-1), pre.shape[0], self.n_latents)
        values = self._differentiable(centered, entries, chosen.reshape(-1))
        residual_hat = SparseDecode.apply(self.W_dec, values, entries)
        # Normalised by the residual's variance so the loss stays O(1) however good the main reconstruction gets.
        return fraction_of_variance_unexplained(residual, residual_hat)

    # --- constraints and training hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        # Only the tangential part of the gradient moves a unit-norm row along the sphere; the radial part would
        # be undone by renormalisation anyway but still disturbs Adam's moment estimates.
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec

    def after_optimizer_step(self) -> None:
        self.normalize_decoder()

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        # The data mean stands in for the paper's geometric median: close enough, and exact to compute.
        self.b_dec.copy_(sample.float().mean(0))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.b_dec.div_(scale)
        self.encoder.bias.div_(scale)

    # --- SAELens-style tensors -----------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        return {
            "W_enc": self.encoder.weight.T,
            "b_enc": self.encoder.bias,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        self.encoder.weight.copy_(tensors["W_enc"].T)
        self.encoder.bias.copy_(tensors["b_enc"])
        self.W_dec.copy_(tensors["W_dec"])
        self.b_dec.copy_(tensors["b_dec"])
