"""Which latents are dead: frames elapsed since each latent last fired, counted during training."""

from __future__ import annotations

import torch
from torch import Tensor


class FiringTracker:
    def __init__(self, n_latents: int, dead_after_frames: int, device: torch.device | str = "cpu"):
        self.dead_after_frames = dead_after_frames
        self.frames_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, latents: Tensor) -> None:
        self.update_fired(latents.shape[0], (latents != 0).any(0))

    @torch.no_grad()
    def update_fired(self, n_frames: int, fired: Tensor) -> None:
        """`fired` [n_latents]: which latents were non-zero on at least one of the batch's `n_frames` frames."""
        self.frames_since_fired += n_frames
        self.frames_since_fired.masked_fill_(fired.to(self.frames_since_fired.device, torch.bool), 0)

    def dead_mask(self) -> Tensor:
        return self.frames_since_fired >= self.dead_after_frames

    def dead_fraction(self) -> float:
        return float(self.dead_mask().double().mean())

    def state_dict(self) -> dict:
        return {"frames_since_fired": self.frames_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.frames_since_fired.copy_(state["frames_since_fired"])
