"""L1-penalised tied sparse autoencoder, as er537's Whisper SAE (and the original FREUD's "l1" variant).

One matrix W [d_in, n_latents] with unit-norm columns serves both ways: c = ReLU(x W + b_enc), x_hat = c Wᵀ.
Loss = recon_alpha * MSE + l1_alpha * mean over frames of ||c||_1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder


class L1SAE(SparseAutoencoder):
    architecture = "l1"

    def __init__(self, d_in: int, n_latents: int, l1_alpha: float = 10.0, recon_alpha: float = 1e4):
        super().__init__(d_in, n_latents)
        self.l1_alpha = l1_alpha
        self.recon_alpha = recon_alpha
        # Names match the original checkpoints: decoder.weight [d_in, n] (columns = latent directions), encoder_bias.
        self.decoder = nn.Linear(n_latents, d_in, bias=False)
        nn.init.orthogonal_(self.decoder.weight)
        self.encoder_bias = nn.Parameter(torch.zeros(n_latents))

    @torch.no_grad()
    def normalize_columns(self) -> None:
        # Via .data so that no autograd graph sees a version bump, and it is allowed under inference_mode.
        self.decoder.weight.data.copy_(F.normalize(self.decoder.weight.data, dim=0))

    def encode(self, x: Tensor) -> Tensor:
        # The constraint is imposed at every forward, as in the original: the L1 penalty could otherwise be
        # dodged by shrinking latents and growing columns.
        self.normalize_columns()
        return F.relu(x @ self.decoder.weight + self.encoder_bias)

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.decoder.weight.T

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        latents = self.encode(x)
        x_hat = self.decode(latents)
        mse = F.mse_loss(x_hat, x)
        l1 = latents.abs().sum(-1).mean()
        return ForwardOutput(
            x_hat=x_hat,
            latents=latents,
            loss_parts={"mse": mse, "l1": l1, "loss": self.recon_alpha * mse + self.l1_alpha * l1},
        )

    def after_optimizer_step(self) -> None:
        # Also here, so that a checkpoint taken right after a step already satisfies the constraint.
        self.normalize_columns()

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.encoder_bias.div_(scale)

    def export_tensors(self) -> dict[str, Tensor]:
        weight = self.decoder.weight
        return {"W_enc": weight, "b_enc": self.encoder_bias, "W_dec": weight.T, "b_dec": weight.new_zeros(self.d_in)}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        self.decoder.weight.copy_(tensors["W_dec"].T)
        self.encoder_bias.copy_(tensors["b_enc"])
