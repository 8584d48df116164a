"""Feature mining, labels, the LanceDB feature index and its query API (see docs/CONTRACTS.md)."""

from freud_pipeline.features.query import FeatureIndex, UnknownClipError

__all__ = ["FeatureIndex", "UnknownClipError"]
