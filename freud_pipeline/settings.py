"""Where FREUD keeps its data. One environment variable moves everything: FREUD_DATA_DIR.

Without it: `data/` of the checkout when FREUD runs from one (make demo), else a per-user directory
($XDG_DATA_HOME/freud, by default ~/.local/share/freud) when FREUD is installed from a wheel."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def checkout_root() -> Path | None:
    """The source checkout FREUD runs from, or None when it is installed (a wheel in site-packages)."""
    return PACKAGE_PARENT if (PACKAGE_PARENT / "pyproject.toml").is_file() else None


def default_data_dir() -> Path:
    root = checkout_root()
    if root is not None:
        return root / "data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "freud"


def data_dir() -> Path:
    """Root of all generated data (datasets, shards, checkpoints, MLflow store, LanceDB, model cache)."""
    path = Path(os.environ.get("FREUD_DATA_DIR") or default_data_dir()).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


DAGSTER_POSTGRES_SETTING = "FREUD_DAGSTER_POSTGRES_URL"


def dagster_instance_template() -> str:
    """FREUD's Dagster instance settings (pool limits, run monitoring), shipped inside the package; with
    FREUD_DAGSTER_POSTGRES_URL set, also its storage (runs, event logs, schedules, sensor cursors) in that PostgreSQL
    database (dagster-postgres). The file names the variable, not its value: a password never lands on disk."""
    text = resources.files("freud_pipeline.defs").joinpath("dagster.yaml").read_text(encoding="utf-8")
    if os.environ.get(DAGSTER_POSTGRES_SETTING, "").strip():
        text += f"\nstorage:\n  postgres:\n    postgres_url:\n      env: {DAGSTER_POSTGRES_SETTING}\n"
    return text


def model_cache_dir() -> Path:
    """Whisper checkpoints: openai-whisper's download cache and converted offline bundles."""
    path = Path(os.environ.get("FREUD_MODEL_DIR", data_dir() / "models")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{data_dir() / 'mlflow.db'}")


def lancedb_uri() -> str:
    return os.environ.get("FREUD_LANCEDB_URI", str(data_dir() / "lancedb"))
