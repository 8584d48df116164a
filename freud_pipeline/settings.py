"""Where FREUD keeps its data. One environment variable moves everything: FREUD_DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Root of all generated data (datasets, shards, checkpoints, MLflow store, LanceDB, model cache)."""
    path = Path(os.environ.get("FREUD_DATA_DIR", REPO_ROOT / "data")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_dir() -> Path:
    """Whisper checkpoints: openai-whisper's download cache and converted offline bundles."""
    path = Path(os.environ.get("FREUD_MODEL_DIR", data_dir() / "models")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{data_dir() / 'mlflow.db'}")


def lancedb_uri() -> str:
    return os.environ.get("FREUD_LANCEDB_URI", str(data_dir() / "lancedb"))
