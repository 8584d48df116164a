"""The interface every sparse autoencoder architecture shares.

Latents are returned dense ([N, n_latents], zeros where a latent is inactive) so that downstream code (feature
mining, the app) never needs to know which architecture produced them.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn


class ForwardOutput:
    """x_hat, latents (dense [N, n_latents]) and loss_parts (always holds "loss", the scalar the trainer minimises).

    An architecture that selects latents sparsely may pass `latents` as a zero-argument function and the active
    entries as `active=(rows, cols, values)`: the dense matrix, the largest tensor of a training step, is then
    built only if someone reads `.latents`, and the firing statistics the trainer needs every step come from the
    entries alone.
    """

    __slots__ = ("x_hat", "_latents", "loss_parts", "active", "n_latents")

    def __init__(
        self,
        x_hat: Tensor,
        latents: Tensor | Callable[[], Tensor],
        loss_parts: dict[str, Tensor],
        active: tuple[Tensor, Tensor, Tensor] | None = None,
        n_latents: int | None = None,
    ):
        if active is not None and n_latents is None:
            raise ValueError("ForwardOutput: pass n_latents with the active entries")
        self.x_hat = x_hat
        self._latents = latents
        self.loss_parts = loss_parts
        self.active = active
        self.n_latents = n_latents

    @property
    def latents(self) -> Tensor:
        if callable(self._latents):
            self._latents = self._latents()
        return self._latents

    @property
    def n_frames(self) -> int:
        return self.x_hat.shape[0]

    @torch.no_grad()
    def fired_counts(self) -> Tensor:
        """Per latent, on how many frames of this batch it was non-zero (int64 [n_latents])."""
        if self.active is None:
            return (self.latents != 0).sum(0)
        _, cols, values = self.active
        return torch.bincount(cols[values != 0], minlength=self.n_latents)

    @torch.no_grad()
    def l0(self) -> float:
        """Mean number of non-zero latents per frame."""
        if self.active is None:
            return float((self.latents != 0).sum(-1).double().mean())
        return float((self.active[2] != 0).sum()) / max(1, self.n_frames)


class SparseAutoencoder(nn.Module, ABC):
    architecture: ClassVar[str]

    def __init__(self, d_in: int, n_latents: int):
        super().__init__()
        self.d_in = d_in
        self.n_latents = n_latents
        # Where the SAE belongs (hook_name, model_name, ...): set by the trainer or the loader, saved in cfg.json.
        self.metadata: dict = {}

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor: ...

    @abstractmethod
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """`dead_mask` [n_latents] marks latents that have not fired for a while; only AuxK-style losses use it."""

    @abstractmethod
    def export_tensors(self) -> dict[str, Tensor]:
        """SAELens-style tensors: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], ..."""

    @abstractmethod
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `export_tensors`."""

    @abstractmethod
    def fold_input_scale(self, scale: float) -> None:
        """Make the SAE trained on `scale * x` act on raw `x`: x_hat comes out raw and latents become latents / scale.

        Possible without touching any matrix because every architecture here is positively homogeneous in its
        biases: ReLU, top-k selection and thresholds commute with dividing everything by `scale`.
        """

    def init_from_data(self, sample: Tensor) -> None:
        """Data-dependent initialisation from a first sample of (scaled) training frames."""

    def before_optimizer_step(self) -> None:
        """Adjust gradients (e.g. keep decoder rows on the unit sphere)."""

    def after_optimizer_step(self) -> None:
        """Re-impose weight constraints the step may have broken."""

    def hyperparameters(self) -> dict:
        """Constructor arguments beyond d_in and n_latents, read back from attributes of the same name."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "d_in", "n_latents")]
        return {name: getattr(self, name) for name in names}

    @property
    def cfg(self) -> dict:
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.n_latents,
            **self.hyperparameters(),
            **self.metadata,
        }

    @classmethod
    def from_cfg(cls, cfg: dict) -> "SparseAutoencoder":
        names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "d_in", "n_latents")]
        return cls(cfg["d_in"], cfg["d_sae"], **{name: cfg[name] for name in names if name in cfg})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
