"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

pre = W_enc (x - b_dec) + b_enc,  z_j = pre_j · H(pre_j - θ_j),  x_hat = W_dec z + b_dec, with a learned threshold
θ_j ≥ 0 per latent and unit-norm decoder rows (as TopK's). The step H has no useful derivative, so the thresholds
learn through the paper's straight-through estimator: with the rectangle kernel K(u) = 1 for |u| < 1/2,

  ∂z_j/∂θ_j := -(θ_j / ε) K((pre_j - θ_j) / ε)      ∂H(pre_j - θ_j)/∂θ_j := -(1 / ε) K((pre_j - θ_j) / ε)

(ε = `jumprelu_bandwidth`, in the units of the scaled training inputs); the encoder gets the ordinary gradient of
the active latents only. As in DeepMind's recipe the pseudo-derivatives reach the thresholds alone.

Loss = FVU + l0_coefficient · penalty, with L0 the mean number of active latents per frame (its derivative is the
one above): with `l0_target` T the penalty is (L0 / T - 1)², which steers the batch's average L0 to T from either
side (per-frame counts stay free, as BatchTopK's); without a target it is L0 itself, the paper's penalty.

Thresholds are parameters themselves, not exp(log θ) as in the paper (Adam moves a parameter ~lr per step, too
little in log space for short runs; SAELens 6 does the same), projected back to θ ≥ 0 after each step. With a
target they start, per latent, at the value that `l0_target / n_latents` of the first training frames exceed, so
training starts near the target L0; without one at `INIT_THRESHOLD`.

The forward pass is sparse like TopK's: the dense pre-activations are computed without autograd, and autograd sees
only the active entries and those inside the kernel's band (|pre - θ| < ε/2), whose only role is the thresholds'
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder
from freud_pipeline.sae.topk import (
    Entries,
    TopKSAE,
    ChosenPreActivations,
    SparseDecode,
    fraction_of_variance_unexplained,
)

INIT_THRESHOLD = 0.01  # SAELens' default jumprelu_init_threshold: nearly every positive pre-activation passes
_INIT_ELEMENTS = 1 << 25  # at most this many pre-activations (128 MB) estimate the initial thresholds


class _ThresholdJump(torch.autograd.Function):
    """Zero in the forward pass (it is added to x_hat); its backward is the straight-through pseudo-derivative of
    the reconstruction with respect to the thresholds: per band entry (i, j), -(θ_j / ε) · (∂L/∂x_hat_i · W_dec[j])."""

    @staticmethod
    def forward(ctx, threshold, W_dec, band: Entries, bandwidth: float, like: Tensor):
        ctx.save_for_backward(threshold, W_dec)
        ctx.band, ctx.bandwidth = band, bandwidth
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        threshold, W_dec = ctx.saved_tensors
        band: Entries = ctx.band
        dots = band.entry_dots(grad.to(W_dec.dtype).contiguous(), W_dec)  # ∂L/∂z at each band entry
        per_latent = torch.zeros_like(threshold).index_add_(0, band.cols, dots.to(threshold.dtype))
        return -per_latent * threshold / ctx.bandwidth, None, None, None, None


class _StepL0(torch.autograd.Function):
    """Mean active latents per frame, with -(1 / ε) · (band entries of latent j) / N as its derivative in θ_j."""

    @staticmethod
    def forward(ctx, threshold, band_cols: Tensor, n_active: int, n_frames: int, bandwidth: float):
        ctx.band_cols, ctx.n_frames, ctx.bandwidth = band_cols, n_frames, bandwidth
        ctx.n_latents = threshold.shape[0]
        return threshold.new_tensor(n_active / max(1, n_frames))

    @staticmethod
    def backward(ctx, grad):
        in_band = torch.bincount(ctx.band_cols, minlength=ctx.n_latents).to(grad.dtype)
        return -grad * in_band / (ctx.bandwidth * max(1, ctx.n_frames)), None, None, None, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"

    # TopK's parametrisation and decoder constraint: the transpose init, unit-norm decoder rows kept on the sphere.
    decode = TopKSAE.decode
    normalize_decoder = TopKSAE.normalize_decoder
    before_optimizer_step = TopKSAE.before_optimizer_step

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        l0_coefficient: float = 1.0,
        l0_target: float | None = 32.0,
        jumprelu_bandwidth: float = 0.05,
    ):
        super().__init__(d_in, n_latents)
        if l0_target is not None and not 0 < l0_target < n_latents:
            raise ValueError(f"l0_target must be in (0, n_latents = {n_latents}); got {l0_target}")
        if jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be positive; got {jumprelu_bandwidth}")
        self.l0_coefficient = l0_coefficient
        self.l0_target = l0_target
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.encoder = nn.Linear(d_in, n_latents)
        nn.init.zeros_(self.encoder.bias)
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.full((n_latents,), INIT_THRESHOLD))
        self.normalize_decoder()

    # --- interface -------------------------------------------------------------------------------------------
    def gate(self) -> Tensor:
        """The thresholds as the equations use them: SAELens' ReLU(pre) · H(pre - θ) is pre · H(pre - max(θ, 0))."""
        return self.threshold.detach().clamp_min(0.0)

    def encode(self, x: Tensor) -> Tensor:
        pre = self.encoder(x - self.b_dec)
        return torch.where(pre > self.gate().to(pre.dtype), pre, 0.0)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        n_frames = x.shape[0]
        centered = x - self.b_dec
        threshold = self.threshold
        learn_threshold = self.training and threshold.requires_grad and torch.is_grad_enabled()
        with torch.no_grad():  # the dense pass only finds the active and the band entries (see the module doc)
            pre = self.encoder(centered)
            rows, cols = (pre > self.gate().to(pre.dtype)).nonzero(as_tuple=True)  # rows come sorted
            chosen = pre[rows, cols]
            entries = Entries(rows, cols, n_frames, self.n_latents)
            band = None
            if learn_threshold:
                offset = (pre - threshold.detach().to(pre.dtype)).abs_()
                band_rows, band_cols = (offset < self.jumprelu_bandwidth / 2).nonzero(as_tuple=True)
                band = Entries(band_rows, band_cols, n_frames, self.n_latents)
            del pre
        values = ChosenPreActivations.apply(centered, self.encoder.weight, self.encoder.bias, chosen, entries)
        x_hat = SparseDecode.apply(self.W_dec, values, entries) + self.b_dec
        if band is not None:
            x_hat = x_hat + _ThresholdJump.apply(threshold, self.W_dec.detach(), band, self.jumprelu_bandwidth, x_hat)
            l0 = _StepL0.apply(threshold, band.cols, len(rows), n_frames, self.jumprelu_bandwidth)
        else:
            l0 = threshold.new_tensor(len(rows) / max(1, n_frames))
        fvu = fraction_of_variance_unexplained(x, x_hat)
        penalty = l0 if self.l0_target is None else (l0 / self.l0_target - 1).square()
        return ForwardOutput(
            x_hat=x_hat,
            latents=lambda: values.new_zeros(n_frames, self.n_latents).index_put_((rows, cols), values),
            loss_parts={"fvu": fvu, "l0_penalty": penalty, "loss": fvu + self.l0_coefficient * penalty},
            active=(rows, cols, values.detach()),
            n_latents=self.n_latents,
        )

    # --- constraints and training hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.normalize_decoder()
        self.threshold.clamp_(min=0.0)  # the equations use max(θ, 0) (`gate`): keep θ there

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        TopKSAE.init_from_data(self, sample)
        if self.l0_target is None:
            return
        sample = sample[: max(256, _INIT_ELEMENTS // self.n_latents)].to(self.device, torch.float32)
        pre = self.encoder(sample - self.b_dec)
        above = min(max(1, round(len(sample) * self.l0_target / self.n_latents)), len(sample) - 1)
        # Per latent, the value exactly `above` frames of the sample exceed.
        self.threshold.copy_(pre.kthvalue(len(sample) - above, dim=0).values.clamp_min(0.0))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.b_dec.div_(scale)
        self.encoder.bias.div_(scale)
        self.threshold.div_(scale)

    # --- SAELens' jumprelu tensors ---------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        return {**TopKSAE.export_tensors(self), "threshold": self.threshold}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        TopKSAE.load_exported(self, tensors)
        threshold = tensors["threshold"]
        if threshold.shape != (self.n_latents,):
            raise ValueError(f"threshold has shape {tuple(threshold.shape)}; expected ({self.n_latents},)")
        self.threshold.copy_(threshold.clamp_min(0.0))  # a negative one acts as 0 (see `gate`)

