"""WSGI entry point: `gunicorn dash_app.wsgi:server` (the data directory comes from env FREUD_DATA_DIR)."""

from __future__ import annotations

import os

from dash_app.app import create_app

app = create_app(data_dir=os.environ.get("FREUD_DATA_DIR") or None)
server = app.server
