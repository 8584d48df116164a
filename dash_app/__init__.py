"""FREUD feature browser (Plotly Dash). `create_app(index)` builds it; `python -m dash_app` serves it."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable, Sequence

from dash_app.app import create_app

__all__ = ["create_app", "main"]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None


def _env_port() -> int:
    return _env_int("FREUD_APP_PORT", 8050)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dash_app", description="Serve the FREUD feature browser.")
    parser.add_argument("--host", default=os.environ.get("FREUD_APP_HOST", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1, env FREUD_APP_HOST); "
                             "use 0.0.0.0 only behind a trusted network")
    parser.add_argument("--port", type=int, default=None, help="port (default 8050, env FREUD_APP_PORT)")
    parser.add_argument("--data-dir", default=None,
                        help="FREUD data directory holding lancedb/ (default: env FREUD_DATA_DIR or <repo>/data)")
    parser.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                        help="comma-separated Host names answered besides 127.0.0.1, localhost, ::1 and --host (others "
                             "get 400, against DNS rebinding; default env FREUD_APP_ALLOWED_HOSTS; '*' allows any)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted (MB)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default env FREUD_APP_WORKERS, else 2): more than 1 serves the app "
                             "with gunicorn (threads in each), so searches use every core; 1 uses Flask's threaded "
                             "server")
    parser.add_argument("--threads", type=int, default=4,
                        help="request threads per gunicorn worker (default 4: requests are short, as slow work runs "
                             "on background threads, and fewer requests sharing each worker's GIL gave a lower p95 "
                             "at the same throughput; benchmarks/RESULTS.md)")
    parser.add_argument("--background-threads", type=int, default=None,
                        help="threads per worker process for slow work run as background callbacks (an upload's "
                             "inference, edits; default env FREUD_APP_BACKGROUND_THREADS, else 2); more jobs wait "
                             "in a queue")
    parser.add_argument("--keepalive", type=int, default=None,
                        help="seconds a gunicorn worker keeps an idle connection (default env FREUD_APP_KEEPALIVE, "
                             "else 0): 0 closes it after each response, so the next request goes to whichever "
                             "worker is free (measured: 115 vs 77 searches/s with 20 clients on 2 cores); raise "
                             "it when clients are far away and no proxy keeps connections for them")
    parser.add_argument("--debug", action="store_true", help="Dash debug mode (development only; implies 1 worker)")
    args = parser.parse_args(argv)
    workers = args.workers if args.workers is not None else _env_int("FREUD_APP_WORKERS", 2)
    background_threads = (args.background_threads if args.background_threads is not None
                          else _env_int("FREUD_APP_BACKGROUND_THREADS", 2))
    if workers < 1 or args.threads < 1 or background_threads < 1:
        parser.error("--workers, --threads and --background-threads must be at least 1")
    port = args.port if args.port is not None else _env_port()
    if not 0 < port < 65536:
        parser.error(f"--port must be 1..65535, not {port}")
    if args.data_dir:
        # Everything (index, manifest paths, model cache) follows one data directory.
        os.environ["FREUD_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dash_app.security import allowed_hosts_for

    allowed_hosts = allowed_hosts_for(args.host, args.allowed_hosts)

    def make_app():
        app = create_app(data_dir=args.data_dir, max_upload_mb=args.max_upload_mb,
                         background_threads=background_threads, allowed_hosts=allowed_hosts)
        tune_gc()
        return app

    if workers == 1 or args.debug:
        make_app().run(host=args.host, port=port, debug=args.debug)
    else:
        keepalive = args.keepalive if args.keepalive is not None else _env_int("FREUD_APP_KEEPALIVE", 0)
        serve_with_gunicorn(lambda: make_app().server, host=args.host, port=port, workers=workers,
                            threads=args.threads, keepalive=keepalive)
    return 0


def tune_gc() -> None:
    """Garbage-collector settings for a serving process: a search allocates tens of thousands of short-lived
    dicts and lists (freed by reference counting, not by the collector), which with CPython's defaults set off
    a collection every few hundred allocations, each walking the process's long-lived objects (the app, torch,
    caches). Freezing what exists after start-up and collecting less often keeps the collector to a few percent
    of a search's CPU (benchmarks/app_load.py)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def serve_with_gunicorn(make_server: Callable[[], Any], *, host: str, port: int, workers: int, threads: int,
                        keepalive: int = 0) -> None:
    """Serve the app with gunicorn: `workers` processes, each building its own app after the fork (LanceDB's
    runtime and torch must not be inherited across a fork), `threads` request threads in each. Slow work (an
    edit, an upload's inference) runs on each app's background threads, so requests stay short."""
    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 300)  # heartbeat limit; gthread beats while requests run, so only a hung worker
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("keepalive", keepalive)
            if not keepalive:
                # A worker takes no more connections than it has threads: the rest wait in the listen queue
                # (first come, first served) for whichever worker frees a thread first, instead of piling up in
                # one worker's queue while the other idles (which made the slowest searches several times slower).
                self.cfg.set("worker_connections", threads)
            self.cfg.set("accesslog", None)
            self.cfg.set("limit_request_line", 8190)
            self.cfg.set("control_socket_disable", True)  # no socket under ~/.gunicorn: several apps may run

        def load(self):
            return make_server()

    _Server().run()
