"""Which torch device to run on: the one rule for every part of FREUD that takes a `device` option."""

from __future__ import annotations

import torch

from freud_pipeline.errors import DeviceUnavailableError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:1", a torch.device -> that device, with a
    `DeviceUnavailableError` when it names CUDA on a machine without it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(f"unknown device {str(device)!r}; use 'auto', 'cpu' or 'cuda'") from exc
