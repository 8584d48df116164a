"""Start and stop the three UIs (Dagster, MLflow, Dash) as background services bound to loopback by default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from freud_pipeline import objectstore, settings


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Service:
    name: str
    command: list[str]
    url: str
    health: str  # URL that answers 200 once the service is up


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or settings.data_dir() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    instance_yaml = home / "dagster.yaml"
    if not instance_yaml.exists():  # pool limits etc. (freud_pipeline/defs/dagster.yaml); an operator's file is kept
        instance_yaml.write_text(settings.dagster_instance_template(), encoding="utf-8")
    elif os.environ.get(settings.DAGSTER_POSTGRES_SETTING) and "storage:" not in instance_yaml.read_text():
        print(f"warning: {settings.DAGSTER_POSTGRES_SETTING} is set but {instance_yaml} (written before) keeps "
              f"SQLite storage: add its postgres block (freud_pipeline/defs/dagster.yaml) or delete the file",
              file=sys.stderr)
    os.environ["DAGSTER_HOME"] = str(home)  # Dagster requires an absolute path; children inherit it
    return home


def services(host: str, dagster_port: int, mlflow_port: int, app_port: int) -> list[Service]:
    bin_dir = Path(sys.executable).parent
    data = settings.data_dir()
    bucket_root = objectstore.mlflow_artifact_root()
    # One machine: the server stores (and proxies) artifacts under the data directory. A cluster: experiments
    # created in the UI get the bucket, and clients (the pipeline's workers) write there directly.
    artifacts = (["--default-artifact-root", bucket_root, "--no-serve-artifacts"] if bucket_root
                 else ["--default-artifact-root", (data / "mlartifacts").as_uri()])
    return [
        Service(
            "dagster",
            [str(bin_dir / "dagster"), "dev", "-h", host, "-p", str(dagster_port),
             "-m", "freud_pipeline.defs.definitions"],  # the installed package: works from a wheel too
            f"http://{host}:{dagster_port}", f"http://{host}:{dagster_port}/server_info",
        ),
        Service(
            "mlflow",
            [str(bin_dir / "mlflow"), "server", "--backend-store-uri", settings.mlflow_tracking_uri(),
             *artifacts, "--host", host, "--port", str(mlflow_port),
             "--workers", "1"],  # one worker: the UI needs no more, and each costs a Python start
            f"http://{host}:{mlflow_port}", f"http://{host}:{mlflow_port}/health",
        ),
        Service(
            "app",
            [sys.executable, "-m", "dash_app", "--host", host, "--port", str(app_port), "--data-dir", str(data)],
            f"http://{host}:{app_port}", f"http://{host}:{app_port}/",
        ),
    ]


def _state_file() -> Path:
    return settings.data_dir() / "logs" / "services.json"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def start_services(host="127.0.0.1", dagster_port=3000, mlflow_port=5000, app_port=8050, wait_s=300.0) -> list[Service]:
    """Start each UI in its own process group (so it survives this command), then wait until all answer."""
    if host not in LOOPBACK_HOSTS:
        print(f"warning: the Dagster UI answers any Host header; bound to {host} it is open to the network and to "
              f"DNS rebinding (docs/OPERATING.md, Security)", file=sys.stderr)
    stop_services(quiet=True)
    dagster_home()
    logs = settings.data_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started, state = services(host, dagster_port, mlflow_port, app_port), {}
    for service in started:
        log = open(logs / f"{service.name}.log", "ab")
        proc = subprocess.Popen(
            service.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=settings.checkout_root() or settings.data_dir(), start_new_session=True,
        )
        state[service.name] = {"pid": proc.pid, "url": service.url}
    _state_file().write_text(json.dumps(state, indent=1))
    deadline = time.time() + wait_s
    pending = list(started)
    while pending and time.time() < deadline:
        pending = [s for s in pending if not _answers(s.health)]
        time.sleep(1.0)
    if pending:
        names = ", ".join(f"{s.name} (log: {logs / (s.name + '.log')})" for s in pending)
        raise RuntimeError(f"these services did not answer within {wait_s:.0f} s: {names}")
    return started


def stop_services(quiet: bool = False) -> None:
    state_file = _state_file()
    if not state_file.exists():
        return
    for name, info in json.loads(state_file.read_text()).items():
        try:
            # SIGINT is what `dagster dev` listens to; the others stop on it too.
            os.killpg(info["pid"], signal.SIGINT)
            if not quiet:
                print(f"stopped {name} (pid {info['pid']})")
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    for info in json.loads(state_file.read_text()).values():
        while time.time() < deadline:
            try:
                os.killpg(info["pid"], 0)
                time.sleep(0.3)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    state_file.unlink()
