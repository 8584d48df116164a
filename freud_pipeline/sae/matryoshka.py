"""Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; Nabeshima 2024).

A BatchTopK SAE (same selection, threshold, AuxK and tensors) whose dictionary has nested prefixes
p_1 < p_2 < ... < p_m = n_latents: latents 0..p-1 alone must reconstruct x as well as they can. The loss is the mean
over the prefixes of the FVU of b_dec + Σ_{j < p} z_j W_dec[j], plus AuxK on the full reconstruction's residual.
Early latents are therefore pushed towards general, frequent features and later ones refine them, which counters
feature absorption; a prefix can be used as a smaller SAE on its own.

`matryoshka_prefixes`: values ≤ 1 are fractions of n_latents, values > 1 latent counts; the full dictionary is
appended when the last prefix is smaller. Stored resolved (latent counts), so cfg.json records the actual sizes.
Training logs `loss_fvu_prefix_<p>` per step and evaluation `fvu_prefix_<p>` (`prefix_reconstructions`, which
`evaluate_sae` reads). At inference it is a BatchTopK SAE; SAELens, which has no inference class for it either,
saves it the same way (as JumpReLU, one threshold repeated).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from freud_pipeline.sae.base import ForwardOutput
from freud_pipeline.sae.batchtopk import BatchTopKSAE
from freud_pipeline.sae.metrics import fvu
from freud_pipeline.sae.topk import Entries, SparseDecode, fraction_of_variance_unexplained, sparse_decode

DEFAULT_PREFIXES = (1 / 16, 1 / 4, 1.0)


def resolve_prefixes(prefixes: Sequence[float], n_latents: int) -> list[int]:
    """Prefix sizes in latents, strictly increasing and ending at n_latents (see the module doc)."""
    sizes = []
    for p in prefixes:
        if isinstance(p, float) and 0 < p <= 1:
            sizes.append(max(1, round(p * n_latents)))
        elif p >= 1 and float(p).is_integer():
            sizes.append(int(p))
        else:
            raise ValueError(f"a Matryoshka prefix is a fraction in (0, 1] or a whole number of latents; got {p!r}")
    if not sizes or sizes[-1] < n_latents:
        sizes.append(n_latents)
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != n_latents:
        raise ValueError(f"Matryoshka prefixes must increase strictly up to n_latents ({n_latents}); got {sizes}")
    return sizes


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int = 32,
        k_aux: int | None = None,
        auxk_alpha: float = 1 / 32,
        threshold_decay: float = 0.99,
        matryoshka_prefixes: Sequence[float] = DEFAULT_PREFIXES,
    ):
        super().__init__(d_in, n_latents, k, k_aux, auxk_alpha, threshold_decay)
        self.matryoshka_prefixes = resolve_prefixes(matryoshka_prefixes, n_latents)

    def _groups(self, cols: Tensor) -> Tensor:
        """Per entry, the index of the first prefix that holds its latent."""
        bounds = torch.tensor(self.matryoshka_prefixes, device=cols.device)
        return torch.bucketize(cols, bounds, right=True)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        n_frames = x.shape[0]
        centered = x - self.b_dec
        with torch.no_grad():
            pre = self.encoder(centered).relu_()
            rows, cols, chosen = self.select(pre)
            entries = Entries(rows, cols, n_frames, self.n_latents)
            group = self._groups(cols)
        values = self._differentiable(centered, entries, chosen)
        # Each group of latents decoded apart (together one full decode), the prefixes as their running sums.
        partial, prefix_fvu = self.b_dec.expand(n_frames, -1), {}
        for g, size in enumerate(self.matryoshka_prefixes):
            mine = group == g  # keeps the entries' order: rows stay sorted
            sub = Entries(rows[mine], cols[mine], n_frames, self.n_latents)
            partial = partial + SparseDecode.apply(self.W_dec, values[mine], sub)
            prefix_fvu[size] = fraction_of_variance_unexplained(x, partial)
        x_hat = partial
        auxk = self.auxk_loss(pre, centered, x - x_hat, dead_mask) if self.training else x_hat.new_zeros(())
        nested = torch.stack(list(prefix_fvu.values())).mean()
        return ForwardOutput(
            x_hat=x_hat,
            latents=lambda: values.new_zeros(n_frames, self.n_latents).index_put_((rows, cols), values),
            loss_parts={
                "fvu": prefix_fvu[self.n_latents],
                **{f"fvu_prefix_{size}": v for size, v in prefix_fvu.items()},
                "auxk": auxk,
                "loss": nested + self.auxk_alpha * auxk,
            },
            active=(rows, cols, values.detach()),
            n_latents=self.n_latents,
        )

    @torch.no_grad()
    def prefix_reconstructions(self, out: ForwardOutput) -> dict[int, Tensor]:
        """Per prefix size p, the reconstruction from latents 0..p-1 of a forward output of this SAE."""
        rows, cols, values = out.active
        group = self._groups(cols)
        partial, found = self.b_dec.expand(out.n_frames, -1), {}
        for g, size in enumerate(self.matryoshka_prefixes):
            mine = group == g
            partial = partial + sparse_decode(self.W_dec, rows[mine], cols[mine], values[mine], out.n_frames)
            found[size] = partial
        return found

    @torch.no_grad()
    def prefix_fvu(self, x: Tensor) -> dict[int, float]:
        """FVU of each prefix on the frames x, at inference (thresholded latents, as `evaluate_sae` sees them)."""
        was_training = self.training
        self.eval()
        try:
            return {size: fvu(x, x_hat) for size, x_hat in self.prefix_reconstructions(self(x)).items()}
        finally:
            self.train(was_training)
