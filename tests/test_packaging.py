"""Packaging: the environment `make test` builds is consistent (`pip check`), and a built wheel works on its own,
from any directory, outside this checkout."""

from __future__ import annotations

import subprocess
import sys


def test_pip_check_is_clean():
    # Every installed distribution's declared requirements are met (dagster-celery pins the dagster release).
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
