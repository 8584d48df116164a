"""Partitions: dataset splits. A backfill of many partitions is many independent, retryable runs."""

import dagster as dg

from freud_pipeline.audio.datasets.librispeech import SPLITS as LIBRISPEECH_SPLITS

SPLITS = ("train", "dev", "test")
split_partitions = dg.StaticPartitionsDefinition(list(SPLITS))
librispeech_partitions = dg.StaticPartitionsDefinition(list(LIBRISPEECH_SPLITS))
audioset_partitions = dg.StaticPartitionsDefinition(["balanced_train", "eval"])
