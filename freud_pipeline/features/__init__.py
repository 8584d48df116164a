"""Feature mining, labels, the LanceDB feature index and its query API (tables: docs/ARCHITECTURE.md)."""

from freud_pipeline.features.query import FeatureIndex, UnknownClipError

__all__ = ["FeatureIndex", "UnknownClipError"]
