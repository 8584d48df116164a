"""Shared fixtures: one real tiny.en (the offline bundle) per session and a per-session data directory."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TEST_OUTPUT = Path(__file__).resolve().parents[1] / "test-output"


@pytest.fixture(scope="session", autouse=True)
def session_data_dir(tmp_path_factory) -> Path:
    """Everything the tests write goes to a temporary data directory, except the converted model cache,
    which is shared so the offline bundle is converted once per machine."""
    data = tmp_path_factory.mktemp("freud-data")
    repo_models = Path(__file__).resolve().parents[1] / "data" / "models"
    repo_models.mkdir(parents=True, exist_ok=True)
    os.environ["FREUD_DATA_DIR"] = str(data)
    os.environ["FREUD_MODEL_DIR"] = str(repo_models)
    os.environ["FREUD_OFFLINE"] = "1"  # never try the network in tests
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    return data


@pytest.fixture(scope="session")
def tiny_en():
    from freud_pipeline.whisper.models import load_model

    return load_model("tiny.en", device="cpu")


def asterisk_audio(name: str) -> np.ndarray:
    """A real recorded Asterisk prompt as 16 kHz float32."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "g722", "-i", str(ASTERISK / f"{name}.g722"), "-ar", "16000", "-ac", "1",
         "-f", "f32le", "-"], check=True, capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.float32).copy()


def require_extra(present: bool, what: str, *, module_level: bool = False) -> None:
    """Skip a test whose system or extra package is missing, unless the tests run as `make test` does (it runs
    scripts/install.sh first, which installs all of them, and sets FREUD_REQUIRE_EXTRAS=1): then a missing one
    fails the test instead of hiding it."""
    if present:
        return
    if os.environ.get("FREUD_REQUIRE_EXTRAS") == "1":
        pytest.fail(f"{what} is missing although scripts/install.sh ran (FREUD_REQUIRE_EXTRAS=1)", pytrace=False)
    pytest.skip(what + " is missing: run scripts/install.sh", allow_module_level=module_level)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under `make test` (FREUD_REQUIRE_EXTRAS=1) a skip from anywhere (a stray pytest.skip or skipif) fails the
    test: every environment guard goes through `require_extra`, and nothing is hidden."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("FREUD_REQUIRE_EXTRAS") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under make test (FREUD_REQUIRE_EXTRAS=1), which allows no skips: {reason}"


def requires(present: bool, what: str):
    """`require_extra` as a test decorator: checked when the test runs (fixtures still injected by name)."""

    def decorate(test):
        @functools.wraps(test)
        def guarded(*args, **kwargs):
            require_extra(present, what)
            return test(*args, **kwargs)

        return guarded

    return decorate
