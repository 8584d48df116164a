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


def sparse_transpose_product(
    rows: Tensor, cols: Tensor, values: Tensor, dense: Tensor, n_cols: int, by_col: Tensor | None = None
) -> Tensor:
    """Sᵀ @ dense for the sparse [n_rows, n_cols] matrix S with entries (rows, cols, values): [n_cols, d].

    An embedding bag over the entries sorted by column (one bag per column), which on CPU is several times faster
    than torch.sparse.mm of the same product. `by_col`: the sorting permutation, if already known."""
    if by_col is None:
        by_col = torch.argsort(cols, stable=True)
    offsets = torch.searchsorted(cols[by_col], torch.arange(n_cols, device=cols.device))
    return F.embedding_bag(rows[by_col], dense, offsets, mode="sum", per_sample_weights=values[by_col].to(dense.dtype))


class _ChosenPreActivations(torch.autograd.Function):
    """Entries (rows, cols) of centered @ weightᵀ + bias, already computed without autograd, with a backward that
    touches only those entries. A top-k layer's gradient is k-sparse per frame; the dense backward (two
    [N, n] x [n, d] products and [N, n] masks) would be most of a training step on CPU."""

    @staticmethod
    def forward(ctx, centered, weight, bias, rows, cols, chosen):
        ctx.save_for_backward(centered, weight, rows, cols)
        return chosen.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight, rows, cols = ctx.saved_tensors
        n_latents, n_rows = weight.shape[0], centered.shape[0]
        grad_centered = sparse_decode(weight, rows, cols, grad, n_rows).to(centered.dtype)
        grad_weight = sparse_transpose_product(rows, cols, grad, centered, n_latents).to(weight.dtype)
        grad_bias = weight.new_zeros(n_latents).index_add_(0, cols, grad.to(weight.dtype))
        return grad_centered, grad_weight, grad_bias, None, None, None


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
        values = self._differentiable(centered, rows, cols, chosen)
        x_hat = sparse_decode(self.W_dec, rows, cols, values, x.shape[0]) + self.b_dec
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

    def _differentiable(self, centered: Tensor, rows: Tensor, cols: Tensor, chosen: Tensor) -> Tensor:
        # ReLU again so that a chosen entry at exactly 0 passes no gradient, as the dense ReLU would.
        return F.relu(_ChosenPreActivations.apply(centered, self.encoder.weight, self.encoder.bias, rows, cols, chosen))

    def auxk_loss(self, pre: Tensor, centered: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        if dead_mask is None or not bool(dead_mask.any()):
            return residual.new_zeros((), dtype=torch.float32)
        residual = residual.detach()  # AuxK must not pull the live reconstruction towards the dead latents
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.k_aux, len(dead))
        with torch.no_grad():
            chosen, picked = pre[:, dead].topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k_aux)
        cols = dead[picked].reshape(-1)
        values = self._differentiable(centered, rows, cols, chosen.reshape(-1))
        residual_hat = sparse_decode(self.W_dec, rows, cols, values, pre.shape[0])
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
