"""Dash background callbacks on a small thread pool in the serving process, results in a shared diskcache.

Dash's own DiskcacheManager forks a process per job. The app's processes hold LanceDB (tokio threads) and torch
state, which must not be inherited across a fork, so `ThreadedDiskcacheManager` runs each job on a bounded
thread pool of the process that received the request instead. Results, progress and each job's state live in a
diskcache under `<data dir>/cache/background`, so a poll that lands on another gunicorn worker finds them, and
all workers read back one request-signing secret from it.

Jobs are identified as "<pid>-<uuid hex>". A thread cannot be killed: `terminate_job` sets a cancel flag that
the job sees at its next progress report (it raises `JobCancelled` there), and a cancelled queued job never
starts. A job whose process has gone is not running. Besides the latest progress report (what the browser polls,
so it may never see a short stage), each job keeps the whole sequence of its reports (`stages`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from dash import DiskcacheManager, html
from dash.background_callback.managers import BaseBackgroundCallbackManager
from dash.background_callback.managers.diskcache_manager import _make_job_fn

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2
THREADS_ENV = "FREUD_APP_BACKGROUND_THREADS"
JOB_EXPIRE_S = 3600  # an uncollected result, progress or job record goes after an hour
QUEUED, RUNNING, DONE = "queued", "running", "done"


class JobCancelled(BaseException):
    """Raised at a cancelled job's progress report. A BaseException (like asyncio.CancelledError) so that the
    callbacks' `except Exception` handlers, which turn failures into messages, let it through."""


def threads_from_env() -> int:
    """Background threads per app process: env FREUD_APP_BACKGROUND_THREADS, else 2."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a whole number, not {raw!r}") from None


def manager_for(cache_dir: str | Path, *, threads: int | None = None) -> "ThreadedDiskcacheManager":
    """The app's manager, its cache in `cache_dir` (the app's `IndexAccess.cache_dir("background")`: under the
    data directory, shared by the worker processes). `threads`: None reads `threads_from_env()`."""
    return ThreadedDiskcacheManager(cache_dir, max_workers=threads_from_env() if threads is None else threads)


class ThreadedDiskcacheManager(DiskcacheManager):
    """A DiskcacheManager whose jobs run on a thread pool of this process (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, *, max_workers: int = DEFAULT_THREADS,
                 expire_s: float = JOB_EXPIRE_S, cache_by: list[Callable[[], Any]] | None = None):
        import diskcache

        if max_workers < 1:
            raise ValueError(f"background threads must be at least 1, not {max_workers}")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # No eviction by size: the shared signing secret must stay; everything transient expires instead.
        self.handle = diskcache.Cache(str(self.cache_dir), eviction_policy="none")
        self.expire = None  # DiskcacheManager's: the lifetime of cached results (cache_by), untouched here
        self.expire_s = expire_s
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._sealed = False
        # DiskcacheManager.__init__ insists on `multiprocess`, which only its forking needs: skip to the base.
        BaseBackgroundCallbackManager.__init__(self, cache_by)
        # The base class hands every manager every background function ever registered in this process (other
        # apps' closures under the same keys): start empty and take this app's only, until `seal`.
        self.func_registry = {}

    # -- registration ---------------------------------------------------------------------------------------
    def register(self, key, fn, progress):
        if not self._sealed:
            super().register(key, fn, progress)

    def seal(self) -> None:
        """Take no more functions: apps built later in this process register theirs under the same keys."""
        self._sealed = True

    def make_job_fn(self, fn, progress, key=None):
        def job_fn(job: str, result_key: str, progress_key: str, args, context):
            # Dash's own job body (arguments, callback context, errors, result), writing through _JobStore.
            _make_job_fn(fn, _JobStore(self, job, progress_key), progress)(result_key, progress_key, args, context)

        return job_fn

    def build_cache_key(self, fn, args, cache_args_to_ignore, triggered):
        # Without cache_by nothing is reused, and a key derived from the arguments would let two identical
        # concurrent requests share (and one of them delete) a result: give each job its own key.
        if self.cache_by is None:
            return uuid.uuid4().hex
        return super().build_cache_key(fn, args, cache_args_to_ignore, triggered)

    # -- jobs -----------------------------------------------------------------------------------------------
    def call_job_fn(self, key, job_fn, args, context):
        import psutil

        if job_fn is None:
            raise RuntimeError("this background callback was registered after its app was built (create_app seals "
                               "the app's background manager); register it inside create_app")
        pid = os.getpid()
        job = f"{pid}-{uuid.uuid4().hex}"
        record = {"pid": pid, "created": psutil.Process(pid).create_time(), "key": key, "submitted": time.time()}
        self.handle.set(_record_key(job), record, expire=self.expire_s)
        self._set_state(job, QUEUED)
        self._executor().submit(self._run, job, key, job_fn, args, context)
        return job

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # a pool does not survive a fork
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="freud-background")
            self._pool_pid = os.getpid()
        return self._pool

    def _run(self, job: str, key: str, job_fn, args, context) -> None:
        try:
            if self.cancelled(job):
                return  # cancelled while queued: never starts
            self._set_state(job, RUNNING)
            job_fn(job, key, self._make_progress_key(key), args, context)
        except JobCancelled:
            log.info("background job %s cancelled", job)
        except BaseException:  # noqa: BLE001 - Dash's job body stores callback errors; this is anything else
            log.exception("background job %s failed", job)
        finally:
            self._set_state(job, DONE)

    def _set_state(self, job: str, state: str) -> None:
        self.handle.set(_state_key(job), state, expire=self.expire_s)

    def cancelled(self, job: str) -> bool:
        return bool(self.handle.get(_cancel_key(job)))

    def job_state(self, job: str) -> str | None:
        return self.handle.get(_state_key(str(job)))

    def stages(self, job: str) -> list:
        """Every progress report of the job, in the order it made them (each as Dash stores it: a list of the
        progress outputs' values). A cancelled job's list ends before the report at which it stopped."""
        return self.handle.get(_stages_key(str(job))) or []

    def jobs(self) -> list[str]:
        """The jobs the cache still holds a record of (any process's), oldest first."""
        records = [(key[len(_record_key("")):], self.handle.get(key)) for key in self.handle.iterkeys()
                   if isinstance(key, str) and _is_record_key(key)]
        return [job for job, record in sorted(records, key=lambda r: (r[1] or {}).get("submitted", 0.0))]

    def _add_stage(self, job: str, value) -> None:
        key = _stages_key(job)  # one writer per job (its thread): read, append, write
        self.handle.set(key, [*(self.handle.get(key) or []), value], expire=self.expire_s)

    def terminate_job(self, job):
        if job is None:
            return
        job = str(job)
        if self.job_state(job) in (None, DONE):
            return  # Dash also calls this after collecting a result: nothing to stop
        self.handle.set(_cancel_key(job), True, expire=self.expire_s)

    def terminate_unhealthy_job(self, job):
        """A job left queued or running by a process that has gone: mark it done. True if it was one."""
        job = str(job)
        if self.job_state(job) in (QUEUED, RUNNING) and not self._owner_alive(job):
            self._set_state(job, DONE)
            return True
        return False

    def job_running(self, job):
        job = str(job)
        state = self.job_state(job)
        if state == DONE:
            # Finished but not yet collected: still "running" to Dash, so a poll that missed the result by a
            # moment polls again instead of giving up with no update.
            record = self.handle.get(_record_key(job))
            return bool(record) and self.handle.get(record["key"]) is not None
        # A cancelled job is over for the browser at once (it stops polling); its thread stops at its next stage.
        return state in (QUEUED, RUNNING) and not self.cancelled(job) and self._owner_alive(job)

    def _owner_alive(self, job: str) -> bool:
        import psutil

        record = self.handle.get(_record_key(job))
        if not record:
            return False
        try:
            # the same process, not a later one that reuses its pid
            return abs(psutil.Process(int(record["pid"])).create_time() - float(record["created"])) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False

    def shutdown(self, wait: bool = False) -> None:
        """Stop taking jobs; queued ones are dropped, running ones finish (wait=True waits for them)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


class _JobStore:
    """What Dash's job body writes through: the result, progress and set_props of one job, with an expiry.
    A cancelled job raises JobCancelled at its next progress report and writes nothing more."""

    def __init__(self, manager: ThreadedDiskcacheManager, job: str, progress_key: str):
        self.manager, self.job, self.progress_key = manager, job, progress_key

    def set(self, key, value):
        if self.manager.cancelled(self.job):
            if key == self.progress_key:
                raise JobCancelled(self.job)
            return  # a result nobody waits for any more
        if key == self.progress_key:
            self.manager._add_stage(self.job, value)
        self.manager.handle.set(key, value, expire=self.manager.expire_s)


def _record_key(job: str) -> str:
    return f"freud-job-{job}"


def _state_key(job: str) -> str:
    return f"freud-job-{job}-state"


def _cancel_key(job: str) -> str:
    return f"freud-job-{job}-cancel"


def _stages_key(job: str) -> str:
    return f"freud-job-{job}-stages"


def _is_record_key(key: str) -> bool:
    return key.startswith(_record_key("")) and not key.endswith(("-state", "-cancel", "-stages"))


# -- the indicator ----------------------------------------------------------------------------------------------

HIDDEN = {"display": "none"}
SHOWN = {"display": "flex"}
STARTING = "Starting…"
POLL_MS = 300  # how often the browser asks for progress and the result


def progress_indicator(id_: str) -> html.Div:
    """A spinner and a stage text, hidden until its background callback runs (see `background_args`)."""
    return html.Div([html.Span(className="progress-spinner"), html.Span(STARTING, id=f"{id_}-text")],
                    id=id_, className="progress", role="status", style=HIDDEN)


def background_args(indicator: str, *running, cancel=None) -> dict:
    """Keyword arguments of a background callback whose progress reports (set_progress("stage…")) show in
    `progress_indicator(indicator)`, which is shown while it runs; `running`: more (Output, on, off) triples."""
    from dash import Output

    args = {"background": True, "interval": POLL_MS,
            "progress": [Output(f"{indicator}-text", "children")], "progress_default": [STARTING],
            "running": [(Output(indicator, "style"), SHOWN, HIDDEN), *running]}
    if cancel:
        args["cancel"] = list(cancel)
    return args


def forward_on_load(app, initial_store: str, target_store: str) -> None:
    """Copy the request a page's URL carried (`initial_store`, set by its layout) into the store a background
    callback listens to. Background callbacks do not run on page load: their `running` outputs would disable
    the page's controls during the first poll, so a plain callback starts them instead."""
    from dash import Input, Output, no_update

    @app.callback(
        Output(target_store, "data", allow_duplicate=True),
        Input(initial_store, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def forward(wanted):
        return wanted or no_update
