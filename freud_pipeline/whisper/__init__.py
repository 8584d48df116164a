"""Whisper models: resolution (names, paths, offline bundle), hook points, encoder-only capture, splicing."""

from freud_pipeline.whisper.models import available_models, load_model, resolve_model

__all__ = ["available_models", "load_model", "resolve_model"]
