"""Whisper activation shards: Arrow IPC files of real frames only, written atomically, read memory-mapped."""

from freud_pipeline.activations.reader import ActivationReader
from freud_pipeline.activations.schema import ShardSpec

__all__ = ["ActivationReader", "ShardSpec"]
