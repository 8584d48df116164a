"""Sparse autoencoders on Whisper activations: architectures, training, checkpoints, metrics, splicing.

`splice` (Whisper-dependent) is imported from its module: `from freud_pipeline.sae.splice import splice_eval`.
`train_sae`, `TrainResult`, `run_sae` (one whole SAE run: train, evaluate, gate, register, promote, report) and
`SaeRunConfig` load on first use: they pull in MLflow (seconds), which loading a checkpoint, e.g. in the app, does
not need.
"""

import importlib

from freud_pipeline.sae.architectures import ARCHITECTURES, architecture_class
from freud_pipeline.sae.base import ForwardOutput, SparseAutoencoder
from freud_pipeline.sae.batchtopk import BatchTopKSAE
from freud_pipeline.sae.checkpoint import (
    CheckpointDigestError,
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    load_original_freud_checkpoint,
    load_verified,
    save_checkpoint,
)
from freud_pipeline.sae.config import TrainConfig, demo_config
from freud_pipeline.sae.jumprelu import JumpReLUSAE
from freud_pipeline.sae.l1 import L1SAE
from freud_pipeline.sae.matryoshka import MatryoshkaBatchTopKSAE
from freud_pipeline.sae.metrics import EvalReport, evaluate_sae
from freud_pipeline.sae.sources import FrameSource, TensorFrameSource
from freud_pipeline.sae.topk import TopKSAE

_LAZY = {"TrainResult": "freud_pipeline.sae.train", "train_sae": "freud_pipeline.sae.train",
         "SaeRunConfig": "freud_pipeline.sae.run", "run_sae": "freud_pipeline.sae.run"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES", "BatchTopKSAE", "CheckpointDigestError", "CheckpointError", "EvalReport", "ForwardOutput",
    "FrameSource", "JumpReLUSAE", "L1SAE", "MatryoshkaBatchTopKSAE", "SaeRunConfig", "SparseAutoencoder",
    "TensorFrameSource", "TopKSAE", "TrainConfig", "TrainResult", "architecture_class", "checkpoint_sha256",
    "demo_config", "evaluate_sae", "load_checkpoint", "load_original_freud_checkpoint", "load_verified", "run_sae",
    "save_checkpoint", "train_sae",
]  # fmt: skip
