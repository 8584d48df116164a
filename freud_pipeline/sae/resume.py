"""Everything a training run needs to continue bit-for-bit where it stopped: `trainer_state.pt`.

Weights here are the unfolded (scaled-input) ones the optimiser works on; the folded, shippable SAE sits next to
it as sae_weights.safetensors. Only tensors and plain Python values are stored, so it loads with weights_only=True.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from freud_pipeline.sae.checkpoint import CheckpointError

STATE_FILE = "trainer_state.pt"


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: Path, state: dict) -> Path:
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write must not leave a truncated checkpoint behind
    return path


def load_trainer_state(location: str | Path) -> dict:
    path = Path(location)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} at {location}: resume_from takes a checkpoint directory of a run")
    return torch.load(path, map_location="cpu", weights_only=True)
