"""Sparse autoencoders on Whisper activations: architectures, training, checkpoints, metrics, splicing.

`splice` (Whisper-dependent) is imported from its module: `from freud_pipeline.sae.splice import splice_eval`.
`train_sae` and `TrainResult` load on first use: they pull in MLflow (seconds), which loading a checkpoint,
e.g. in the app, does not need.
"""

import importlib

from freud_pipeline.sae.architectures import ARCHITECTURES, architecture_class
from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder
from freud_pipeline.sae.batchtopk import BatchTopKSAE
from freud_pipeline.sae.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_original_freud_checkpoint,
    save_checkpoint,
)
from freud_pipeline.sae.config import TrainConfig, demo_config
from freud_pipeline.sae.l1 import L1SAE
from freud_pipeline.sae.metrics import EvalReport, evaluate_sae
from freud_pipeline.sae.sources import FrameSource, TensorFrameSource
from freud_pipeline.sae.topk import TopKSAE

_LAZY = {"TrainResult": "freud_pipeline.sae.train", "train_sae": "freud_pipeline.sae.train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES", "BatchTopKSAE", "CheckpointError", "EvalReport", "ForwardOutput", "FrameSource", "L1SAE",
    "SparseAutoencoder", "TensorFrameSource", "TopKSAE", "TrainConfig", "TrainResult", "architecture_class",
    "demo_config", "evaluate_sae", "load_checkpoint", "load_original_freud_checkpoint", "save_checkpoint", "train_sae",
]  # fmt: skip
