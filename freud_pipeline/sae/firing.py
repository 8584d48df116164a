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
        self.frames_since_fired += latents.shape[0]
        self.frames_since_fired[(latents != 0).any(0)] = 0

    def dead_mask(self) -> Tensor:
        return self.frames_since_fired >= self.dead_after_frames

    def dead_fraction(self) -> float:
        return float(self.dead_mask().double().mean())

    def state_dict(self) -> dict:
        return {"frames_since_fired": self.frames_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.frames_since_fired.copy_(state["frames_since_fired"])
