"""WSGI entry point: `gunicorn dash_app.wsgi:server` (the data directory comes from env FREUD_DATA_DIR). It answers
only the loopback Host names and those in env FREUD_APP_ALLOWED_HOSTS (comma-separated): set it to the names
clients use when gunicorn binds anything but loopback."""

from __future__ import annotations

import os

from dash_app.app import create_app

app = create_app(data_dir=os.environ.get("FREUD_DATA_DIR") or None)
server = app.server
