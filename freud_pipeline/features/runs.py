"""SAE training runs from MLflow, shaped for the app's runs page (no Dash here).

`list_runs()` reads experiment "freud-sae" (as `sae.train.train_sae` logs it) and gives one flat dict per run:
its params and tags, its latest metrics, and the few headline numbers under fixed names, taken from the final
evaluation when there is one:

    fvu          eval/fvu, else the last training-step fvu
    l0           eval/l0, else l0
    dead_pct     100 * eval/dead_fraction, else dead_pct (latents silent for dead_after_frames)
    ce_recovered any metric named ce_recovered (the topk_sae asset logs splice_eval's as splice/ce_recovered)
    wer          splice/wer_spliced (or another *wer_spliced, or wer), if logged
    delta_wer    splice/delta_wer (spliced WER - original WER on the same held-out clips), with
                 delta_wer_ci_low / delta_wer_ci_high, its bootstrap interval, when logged

`compare_runs(a, b)` lines up two runs' params and metrics and marks the params that differ.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from typing import Any, Iterable

from freud_pipeline.numeric import finite_float

EXPERIMENT = "freud-sae"
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
HEADLINE = ("fvu", "l0", "dead_pct", "ce_recovered", "wer", "delta_wer")
# Params worth a column of their own (all params are in the comparison).
PARAM_COLUMNS = ("architecture", "hook", "model_name", "k", "n_latents_resolved", "expansion_factor", "steps",
                 "batch_size", "lr", "l0_target", "matryoshka_prefixes")
# Params that differ between any two runs without meaning a different model.
_NOISE_PARAMS = {"device_resolved", "start_step"}

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


class RunsUnavailable(RuntimeError):
    """The MLflow store cannot be read."""


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI (env FREUD_MLFLOW_URL, default http://127.0.0.1:5000)."""
    return (os.environ.get("FREUD_MLFLOW_URL") or DEFAULT_MLFLOW_URL).rstrip("/")


def run_url(run: dict, base: str | None = None) -> str:
    base = (base or mlflow_ui_url()).rstrip("/")
    return f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"


def experiment_url(experiment_id: str, base: str | None = None) -> str:
    return f"{(base or mlflow_ui_url()).rstrip('/')}/#/experiments/{experiment_id}"


def model_version_url(name: str, version: str | int, base: str | None = None) -> str:
    from urllib.parse import quote

    return f"{(base or mlflow_ui_url()).rstrip('/')}/#/models/{quote(name)}/versions/{version}"


def tracking_uri_for(data_dir: str | os.PathLike | None = None) -> str:
    """The tracking URI the pipeline logs to: env MLFLOW_TRACKING_URI, else the sqlite store in the data dir."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if data_dir is not None:
        from pathlib import Path

        return f"sqlite:///{Path(data_dir).expanduser().resolve() / 'mlflow.db'}"
    from freud_pipeline.settings import mlflow_tracking_uri

    return mlflow_tracking_uri()


def _client(tracking_uri: str):
    with _clients_lock:
        client = _clients.get(tracking_uri)
        if client is None:
            from mlflow.tracking import MlflowClient

            client = _clients[tracking_uri] = MlflowClient(tracking_uri)
        return client


def _store_missing(tracking_uri: str) -> bool:
    """A sqlite store that does not exist yet: say so rather than let MLflow create an empty database."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    return not Path(unquote(urlparse(tracking_uri).path)).is_file()


def _first(metrics: dict, names: Iterable[str]) -> float | None:
    for name in names:
        if name in metrics and finite_float(metrics[name]) is not None:
            return finite_float(metrics[name])
    return None


def _ending(metrics: dict, suffix: str) -> float | None:
    hits = sorted(k for k in metrics if k == suffix or k.endswith("/" + suffix) or k.endswith("_" + suffix))
    return _first(metrics, hits)


def headline(metrics: dict) -> dict[str, float | None]:
    dead = _first(metrics, ["eval/dead_fraction"])
    wer = _first(metrics, ["eval/wer_spliced", "splice/wer_spliced", "wer_spliced"])
    wer_original = _first(metrics, ["eval/wer_original", "splice/wer_original", "wer_original"])
    delta = _first(metrics, ["splice/delta_wer", "delta_wer"])
    if delta is None and wer is not None and wer_original is not None:
        delta = wer - wer_original
    return {
        "fvu": _first(metrics, ["eval/fvu", "fvu"]),
        "l0": _first(metrics, ["eval/l0", "l0"]),
        "dead_pct": dead * 100 if dead is not None else _first(metrics, ["eval/dead_pct", "dead_pct"]),
        "ce_recovered": _ending(metrics, "ce_recovered"),
        "wer": wer if wer is not None else _ending(metrics, "wer"),
        "delta_wer": delta,
        "delta_wer_ci_low": _first(metrics, ["splice/delta_wer_ci_low", "delta_wer_ci_low"]),
        "delta_wer_ci_high": _first(metrics, ["splice/delta_wer_ci_high", "delta_wer_ci_high"]),
    }


def _time(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _row(run) -> dict:
    params = dict(run.data.params)
    metrics = {k: float(v) for k, v in run.data.metrics.items()}
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    info = run.info
    duration = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    row = {
        "run_id": info.run_id,
        "run_name": info.run_name or run.data.tags.get("mlflow.runName") or info.run_id[:8],
        "experiment_id": info.experiment_id,
        "status": info.status,
        "start_time": _time(info.start_time),
        "start_ms": info.start_time,
        "duration_s": duration,
        "params": params,
        "metrics": metrics,
        "tags": tags,
        **headline(metrics),
    }
    for name in PARAM_COLUMNS:
        row[name] = params.get(name, tags.get(name))
    row["model_name"] = row["model_name"] or tags.get("model") or tags.get("whisper_model")
    row["n_latents"] = params.get("n_latents_resolved") or params.get("n_latents")
    if row["architecture"] == "jumprelu":
        row["k"] = None  # logged with every config, but a JumpReLU SAE has no k: its L0 comes from thresholds
    return row


def list_runs(tracking_uri: str | None = None, experiment: str = EXPERIMENT, max_results: int = 1000) -> list[dict]:
    """The experiment's runs, newest first ([] when the store or the experiment does not exist yet)."""
    tracking_uri = tracking_uri or tracking_uri_for()
    if _store_missing(tracking_uri):
        return []
    try:
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], max_results=max_results,
                                  order_by=["attributes.start_time DESC"])
    except Exception as exc:  # noqa: BLE001 - any store error means "cannot show runs" to the user
        raise RunsUnavailable(f"the MLflow store {tracking_uri} cannot be read: {exc}") from exc
    return [_row(run) for run in runs]


def experiment_id(tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> str | None:
    tracking_uri = tracking_uri or tracking_uri_for()
    if _store_missing(tracking_uri):
        return None
    try:
        found = _client(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001
        return None
    return found.experiment_id if found is not None else None


def _same(a: Any, b: Any) -> bool:
    na, nb = finite_float(a), finite_float(b)
    if na is not None and nb is not None:
        return na == nb
    return a == b


def compare_runs(a: dict, b: dict) -> dict:
    """{"params": [{name, a, b, differs}], "metrics": [{name, a, b, differs, headline}], "differing": [param
    names]}. Params that differ come first; the headline metrics (HEADLINE, headline=True) lead the metric rows,
    then every logged metric under its own name."""
    names = sorted(set(a["params"]) | set(b["params"]))
    params = [{"name": n, "a": a["params"].get(n), "b": b["params"].get(n),
               "differs": not _same(a["params"].get(n), b["params"].get(n))} for n in names]
    params.sort(key=lambda r: (not r["differs"] or r["name"] in _NOISE_PARAMS, r["name"]))
    metric_rows = [{"name": h, "a": a.get(h), "b": b.get(h), "differs": not _same(a.get(h), b.get(h)),
                    "headline": True} for h in HEADLINE if a.get(h) is not None or b.get(h) is not None]
    rest = sorted(set(a["metrics"]) | set(b["metrics"]))
    metric_rows += [{"name": n, "a": a["metrics"].get(n), "b": b["metrics"].get(n),
                     "differs": not _same(a["metrics"].get(n), b["metrics"].get(n)), "headline": False}
                    for n in rest]
    return {"params": params, "metrics": metric_rows,
            "differing": [r["name"] for r in params if r["differs"] and r["name"] not in _NOISE_PARAMS]}


def feature_sets_by_run(sets: Iterable[dict]) -> dict[str, list[dict]]:
    """sae_run_id -> the feature sets built from that run (rows of FeatureIndex.sets())."""
    out: dict[str, list[dict]] = {}
    for s in sets:
        if s.get("sae_run_id"):
            out.setdefault(str(s["sae_run_id"]), []).append(s)
    return out


__all__ = ["EXPERIMENT", "RunsUnavailable", "compare_runs", "experiment_id", "experiment_url",
           "feature_sets_by_run", "headline", "list_runs", "mlflow_ui_url", "model_version_url", "run_url",
           "tracking_uri_for"]
