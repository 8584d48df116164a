"""Packaging: the environment `make test` builds is consistent (`pip check`), and a built wheel works on its own,
from any directory, outside this checkout: `freud hooks`, `freud transcribe` and `freud demo --no-serve --small`
(the whole default pipeline on a corpus subset, the demo SAE included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    from conftest import ASTERISK
except ImportError:  # tests collected as a package
    from tests.conftest import ASTERISK

REPO = Path(__file__).resolve().parents[1]


def test_pip_check_is_clean():
    # Every installed distribution's declared requirements are met (dagster-celery pins the dagster release).
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv outside the checkout holding only the wheel built from it. Its dependencies come from the
    test venv's site-packages through a plain path entry (no .pth processing there, so the checkout's editable
    install stays invisible): honest about FREUD's own files, and no download."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # build from a copy: no build/ or egg-info left in the checkout
    for package in ("freud_pipeline", "dash_app"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, capture_output=True)
    wheel, = dist.glob("freud_pipeline-*.whl")
    venv = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site, = (venv / "lib").glob("python3.*/site-packages")
    (site / "freud-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return venv


@pytest.fixture
def elsewhere(tmp_path) -> tuple[Path, dict]:
    """A working directory outside the checkout and the environment of a user there."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DAGSTER_HOME", "MLFLOW_TRACKING_URI",
                                                            "FREUD_LANCEDB_URI")}
    env["FREUD_DATA_DIR"] = str(tmp_path / "data")  # FREUD_MODEL_DIR stays: the shared converted tiny.en
    (tmp_path / "cwd").mkdir()
    return tmp_path / "cwd", env


def _run(venv: Path, args: list[str], cwd: Path, env: dict, timeout: float = 300) -> str:
    result = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


def test_wheel_imports_from_itself_with_its_package_data(wheel_venv, elsewhere):
    cwd, env = elsewhere
    out = _run(wheel_venv, ["python", "-c", "import json, freud_pipeline, dash_app\n"
                            "from freud_pipeline import settings\n"
                            "from freud_pipeline.audio.datasets.festival import SENTENCES_FILE\n"
                            "print(json.dumps([freud_pipeline.__file__, dash_app.__file__, str(settings.data_dir()),"
                            " settings.checkout_root(), SENTENCES_FILE.is_file(), settings.dagster_instance_template()]))"],
               cwd, env)
    package, app, data, checkout, sentences, template = json.loads(out)
    assert Path(package).is_relative_to(wheel_venv) and Path(app).is_relative_to(wheel_venv)
    assert data == env["FREUD_DATA_DIR"] and checkout is None
    assert sentences and "default_limit: 1" in template
    assert (Path(app).parent / "assets" / "style.css").is_file()


def test_wheel_default_data_dir_is_per_user_outside_a_checkout(wheel_venv, elsewhere, tmp_path):
    cwd, env = elsewhere
    env = {k: v for k, v in env.items() if k != "FREUD_DATA_DIR"} | {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    out = _run(wheel_venv, ["python", "-c", "from freud_pipeline import settings; print(settings.data_dir())"],
               cwd, env)
    assert out.strip() == str(tmp_path / "xdg" / "freud")


@pytest.mark.slow
def test_wheel_cli_hooks_and_transcribe_from_any_directory(wheel_venv, elsewhere):
    cwd, env = elsewhere
    assert "encoder.blocks.2" in _run(wheel_venv, ["freud", "hooks"], cwd, env)
    wav = cwd / "prompt.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "g722", "-i", str(ASTERISK / "agent-alreadyon.g722"), "-ar",
                    "16000", "-ac", "1", str(wav)], check=True)
    text = _run(wheel_venv, ["freud", "transcribe", str(wav)], cwd, env).lower()
    assert "agent" in text and "logged" in text, text


@pytest.mark.slow
def test_wheel_runs_the_small_demo_from_any_directory(wheel_venv, elsewhere):
    """`freud demo --no-serve --small` from the wheel: the Festival sentence list, the Dagster instance template
    and the data directory all come from the installed package and FREUD_DATA_DIR, nothing from the checkout or
    the cwd; the feature sets it builds are then readable by `freud sets`."""
    cwd, env = elsewhere
    out = _run(wheel_venv, ["freud", "demo", "--no-serve", "--small"], cwd, env, timeout=900)
    assert "Pipeline materialised" in out, out[-3000:]
    data = Path(env["FREUD_DATA_DIR"])
    assert "default_limit: 1" in (data / "dagster_home" / "dagster.yaml").read_text()  # the shipped template
    assert list((data / "activations" / "tiny.en" / "default_corpus" / "train").glob("shard-*.arrow"))
    sets = json.loads(_run(wheel_venv, ["freud", "sets", "--json"], cwd, env))
    kinds = {s["kind"] for s in (sets if isinstance(sets, list) else sets.get("sets", []))}
    assert {"neuron", "sae"} <= kinds, sets
    assert not any(cwd.iterdir())  # nothing written where the user happened to stand
