"""FREUD feature browser (Plotly Dash). `create_app(index)` builds it; `python -m dash_app` serves it."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

from dash_app.app import create_app

__all__ = ["create_app", "main"]


def _env_port() -> int:
    raw = os.environ.get("FREUD_APP_PORT", "8050")
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"FREUD_APP_PORT must be a port number, not {raw!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dash_app", description="Serve the FREUD feature browser.")
    parser.add_argument("--host", default=os.environ.get("FREUD_APP_HOST", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1, env FREUD_APP_HOST); "
                             "use 0.0.0.0 only behind a trusted network")
    parser.add_argument("--port", type=int, default=None, help="port (default 8050, env FREUD_APP_PORT)")
    parser.add_argument("--data-dir", default=None,
                        help="FREUD data directory holding lancedb/ (default: env FREUD_DATA_DIR or <repo>/data)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted (MB)")
    parser.add_argument("--debug", action="store_true", help="Dash debug mode (development only)")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else _env_port()
    if not 0 < port < 65536:
        parser.error(f"--port must be 1..65535, not {port}")
    if args.data_dir:
        # Everything (index, manifest paths, model cache) follows one data directory.
        os.environ["FREUD_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(data_dir=args.data_dir, max_upload_mb=args.max_upload_mb)
    app.run(host=args.host, port=port, debug=args.debug)
    return 0
