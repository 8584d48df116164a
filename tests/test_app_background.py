"""dash_app.background.ThreadedDiskcacheManager: Dash background callbacks on a thread pool, state in diskcache.

Jobs here are plain functions run through the manager exactly as Dash runs a background callback
(make_job_fn + call_job_fn, then get_progress / get_result / job_running as the polls do). Two manager instances
on one cache directory stand for two gunicorn workers; a real second Python process stands for a worker that dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dash_app.background import DONE, ThreadedDiskcacheManager

REPO = Path(__file__).resolve().parents[1]


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _start(manager: ThreadedDiskcacheManager, fn, *args, progress: bool = True) -> tuple[str, str]:
    """Start fn as Dash starts a background callback: (cache key, job id)."""
    key = manager.build_cache_key(fn, list(args), [], None)
    job = manager.call_job_fn(key, manager.make_job_fn(fn, progress), list(args), {})
    return key, job


def _collect(manager: ThreadedDiskcacheManager, key: str, job: str, timeout: float = 30.0):
    """Poll as the browser does until the result comes or the job is over without one (UNDEFINED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = manager.get_result(key, job)
        if result is not manager.UNDEFINED:
            return result
        if not manager.job_running(job):
            return manager.UNDEFINED
        time.sleep(0.02)
    raise AssertionError("the job neither finished nor stopped")


@pytest.fixture
def managers(tmp_path):
    made = []

    def make(**kwargs):
        manager = ThreadedDiskcacheManager(tmp_path / "background", **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown(wait=True)


def test_result_and_progress_reach_another_worker(managers):
    worker_a, worker_b = managers(), managers()  # two processes' managers on one shared cache directory
    go = threading.Event()

    def work(set_progress, n):
        set_progress("Decoding audio…")
        go.wait(30)
        return {"square": n * n}

    key, job = _start(worker_a, work, 7)
    assert job.startswith(f"{os.getpid()}-") and len(job.split("-")[1]) == 32
    assert _wait(lambda: worker_b.get_progress(key), what="progress") == ["Decoding audio…"]
    assert worker_b.job_running(job) and worker_b.get_result(key, job) is worker_b.UNDEFINED
    go.set()
    assert _collect(worker_b, key, job) == {"square": 49}
    # collected once: the key is gone and the job is over for both workers
    assert worker_a.get_result(key, job) is worker_a.UNDEFINED
    assert not worker_a.job_running(job) and not worker_b.job_running(job)
    assert worker_a.job_state(job) == DONE


def test_identical_requests_get_their_own_results(managers):
    manager = managers()

    def work(set_progress, n):
        set_progress("working")
        return n + 1

    (key1, job1), (key2, job2) = _start(manager, work, 1), _start(manager, work, 1)
    assert key1 != key2 and job1 != job2
    assert _collect(manager, key1, job1) == 2 and _collect(manager, key2, job2) == 2


def test_callback_errors_come_back_as_dash_reports_them(managers):
    manager = managers()

    def broken(set_progress):
        raise ValueError("no such feature")

    key, job = _start(manager, broken)
    result = _collect(manager, key, job)
    assert result["background_callback_error"]["msg"] == "no such feature"


def test_a_cancelled_queued_job_never_starts(managers):
    manager = managers(max_workers=1)
    release, started = threading.Event(), []

    def blocker(set_progress):
        set_progress("holding the only thread")
        release.wait(30)
        return "first"

    def queued(set_progress):
        started.append(True)
        return "second"

    key1, job1 = _start(manager, blocker)
    _wait(lambda: manager.get_progress(key1), what="the first job to start")
    key2, job2 = _start(manager, queued)
    assert manager.job_running(job2)  # queued counts as running: the browser keeps waiting
    manager.terminate_job(job2)
    assert not manager.job_running(job2)
    release.set()
    assert _collect(manager, key1, job1) == "first"
    _wait(lambda: manager.job_state(job2) == DONE, what="the cancelled job to be dropped")
    assert started == [] and manager.get_result(key2, job2) is manager.UNDEFINED


def test_a_running_job_stops_at_its_next_progress_report(managers):
    manager = managers()
    stages = []

    def long_work(set_progress):
        for i in range(1000):
            set_progress(f"stage {i}")
            stages.append(i)
            time.sleep(0.01)
        return "finished"

    key, job = _start(manager, long_work)
    _wait(lambda: len(stages) > 3, what="a few stages")
    manager.terminate_job(job)
    assert not manager.job_running(job)
    _wait(lambda: manager.job_state(job) == DONE, what="the job to stop")
    assert len(stages) < 1000 and manager.get_result(key, job) is manager.UNDEFINED
    # its recorded reports are exactly those it made before the one at which it stopped
    assert manager.stages(job) == [[f"stage {i}"] for i in stages]


def test_every_progress_report_is_kept_in_order_for_another_worker(managers):
    """The browser polls the latest report only (a short stage can fall between two polls); the job's whole
    sequence of reports is kept, and another worker reads the same one."""
    worker_a, worker_b = managers(), managers()

    def quick(set_progress):
        for text in ("Decoding audio…", "Running Whisper's encoder: original…", "Ranking the features…"):
            set_progress(text)  # faster than any poll
        set_progress(["two", "outputs"])
        return "done"

    key, job = _start(worker_a, quick)
    other_key, other_job = _start(worker_a, quick)
    assert _collect(worker_b, key, job) == "done" and _collect(worker_b, other_key, other_job) == "done"
    expected = [["Decoding audio…"], ["Running Whisper's encoder: original…"], ["Ranking the features…"],
                ["two", "outputs"]]
    assert worker_b.stages(job) == expected and worker_a.stages(other_job) == expected
    assert worker_b.jobs() == [job, other_job] and worker_b.stages("no-such-job") == []


def test_a_job_of_a_dead_worker_is_not_running(managers, tmp_path):
    """A real second process starts a slow job on the shared cache and is killed: its job is over."""
    script = textwrap.dedent(f"""
        import sys, time
        from dash_app.background import ThreadedDiskcacheManager
        manager = ThreadedDiskcacheManager({str(tmp_path / 'background')!r})
        def slow(set_progress):
            while True:
                set_progress("working")
                time.sleep(0.05)
        job = manager.call_job_fn("k-dead", manager.make_job_fn(slow, True), [], {{}})
        print(job, flush=True)
        time.sleep(120)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        job = worker.stdout.readline().strip()
        assert job.startswith(f"{worker.pid}-")
        manager = managers()
        _wait(lambda: manager.get_progress("k-dead"), what="the other process's job to report")
        assert manager.job_running(job) and not manager.terminate_unhealthy_job(job)
    finally:
        worker.kill()
        worker.wait(30)
    assert not manager.job_running(job)
    assert manager.terminate_unhealthy_job(job) and manager.job_state(job) == DONE


def test_a_sealed_manager_keeps_its_own_functions(managers):
    from dash.background_callback.managers import BaseBackgroundCallbackManager

    manager = managers()
    assert manager.func_registry == {}  # none of the functions other apps registered in this process

    def mine(set_progress):
        return 1

    def later(set_progress):
        return 2

    key = BaseBackgroundCallbackManager.register_func(mine, True, "test-mine")
    manager.seal()
    later_key = BaseBackgroundCallbackManager.register_func(later, True, "test-later")
    assert key in manager.func_registry and later_key not in manager.func_registry


def test_app_manager_cache_dir(tmp_path, monkeypatch):
    from dash_app import create_app

    app = create_app(data_dir=tmp_path, background_threads=3)
    assert app.freud_background.cache_dir == tmp_path.resolve() / "cache" / "background"
    assert app.freud_background.max_workers == 3
    # an index handed in without a data directory (tests): a temporary directory of its own
    stub = create_app(index=object())
    assert stub.freud_background.cache_dir.is_dir() and tmp_path not in stub.freud_background.cache_dir.parents
    with pytest.raises(ValueError, match="at least 1"):
        create_app(data_dir=tmp_path, background_threads=0)


def test_main_passes_background_threads(monkeypatch):
    import dash

    import dash_app

    built = []

    def create_app(**kwargs):  # the real factory, remembering what it built
        built.append(real(**kwargs))
        return built[-1]

    real = dash_app.create_app
    monkeypatch.setattr(dash_app, "create_app", create_app)
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: None)
    monkeypatch.delenv("FREUD_APP_BACKGROUND_THREADS", raising=False)
    assert dash_app.main(["--workers", "1"]) == 0
    assert built[-1].freud_background.max_workers == 2
    assert dash_app.main(["--workers", "1", "--background-threads", "3"]) == 0
    assert built[-1].freud_background.max_workers == 3
    monkeypatch.setenv("FREUD_APP_BACKGROUND_THREADS", "4")
    assert dash_app.main(["--workers", "1"]) == 0
    assert built[-1].freud_background.max_workers == 4
    with pytest.raises(SystemExit):
        dash_app.main(["--workers", "1", "--background-threads", "0"])
