"""HTTP hardening of the app's Flask server: a Host allow-list, security headers, and 4xx (never 500) for
malformed requests to Dash's own endpoints.

- Host allow-list (against DNS rebinding): a request whose Host header names no allowed host gets 400. Allowed:
  the loopback names, the host the server is bound to (for a wildcard bind, this machine's names), any names
  given with `--allowed-hosts` / env FREUD_APP_ALLOWED_HOSTS (comma-separated; `*` turns the check off), and
  any IP address literal: a rebinding page's requests carry its own domain name as Host, never an address.
- Headers on every response: a Content-Security-Policy (scripts only from this origin plus the page's own inline
  scripts by hash; inline styles, which Dash and plotly need; data:/blob: images and audio, which uploads and
  figures use; no framing), X-Frame-Options DENY, X-Content-Type-Options nosniff, Referrer-Policy same-origin.
- `/_dash-component-suites/<anything unknown>` is 404, and a callback request whose envelope does not match a
  registered callback (not a JSON object, unknown output, wrong input count) is 400. What a callback does with
  the values it receives is the callback's own business (each validates its inputs).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import socket
from typing import Iterable, Sequence

import dash
from dash.exceptions import DependencyException
from flask import Response, request

ALLOWED_HOSTS_ENV = "FREUD_APP_ALLOWED_HOSTS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)
_CALLBACK_PATH = "/_dash-update-component"
_POLICY = (
    "default-src 'self'",
    "style-src 'self' 'unsafe-inline'",  # Dash components and plotly set inline styles
    "img-src 'self' data: blob:",  # figures embed PNG data URIs; spectrograms are same-origin URLs
    "media-src 'self' data: blob:",  # an upload's player plays a data: WAV; recordings are blobs
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)
HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


def _names(text: str | Iterable[str] | None) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text or [])
    return [item.strip().lower().rstrip(".").strip("[]") for item in items if item and item.strip()]


def allowed_hosts_for(bound_host: str | None = None, extra: str | Sequence[str] | None = None) -> list[str]:
    """The Host names the app answers: loopback, the bound host (this machine's names for a wildcard bind) and
    `extra` (None: env FREUD_APP_ALLOWED_HOSTS); a `*` among them allows any host."""
    names = list(LOOPBACK)
    if bound_host is not None and bound_host.strip("[]") in _WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
    elif bound_host:
        names.append(bound_host)
    names += _names(os.environ.get(ALLOWED_HOSTS_ENV) if extra is None else extra)
    return list(dict.fromkeys(_names(names)))


def host_name(host_header: str) -> str:
    """The name part of a Host header: "[::1]:8050" -> "::1", "Example.org.:80" -> "example.org"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(host_header: str, allowed: frozenset[str] | set[str]) -> bool:
    name = host_name(host_header)
    if "*" in allowed or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def content_security_policy(html: str | None = None, dev: bool = False) -> str:
    """The policy for a response; `html`: the page, whose inline scripts are allowed by their sha256."""
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
              for s in _INLINE_SCRIPT.findall(html or "")]
    script = ["'self'", *dict.fromkeys(hashes)] + (["'unsafe-eval'"] if dev else [])  # dev bundles use eval
    return "; ".join([_POLICY[0], "script-src " + " ".join(script), *_POLICY[1:]])


def _malformed_callback(app: dash.Dash, body) -> str | None:
    """Why a callback request's envelope cannot be dispatched, or None when it matches a registered callback."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    callback = app.callback_map.get(body.get("output")) if isinstance(body.get("output"), str) else None
    if callback is None:
        return "no callback has that output"
    for key in ("inputs", "state"):
        items = body.get(key, [])
        if not isinstance(items, list) or len(items) != len(callback.get(key, [])):
            return f"'{key}' does not match the callback"
        for item in items:
            group = item if isinstance(item, list) else [item]
            if not all(isinstance(i, dict) and "id" in i and isinstance(i.get("property"), str) for i in group):
                return f"an entry of '{key}' is not an {{id, property, value}} object"
    if not isinstance(body.get("outputs", {}), (dict, list)):
        return "'outputs' is not an object or a list"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        return "'changedPropIds' is not a list of strings"
    return None


def install(app: dash.Dash, allowed_hosts: Sequence[str]) -> None:
    """Apply the module's rules to `app.server` (call once, after the callbacks are registered)."""
    server = app.server
    allowed = frozenset(_names(allowed_hosts))
    server.config["FREUD_ALLOWED_HOSTS"] = sorted(allowed)

    @server.before_request
    def _check_request():
        if not host_allowed(request.host, allowed):
            return Response(f"Host {request.host!r} is not allowed here; add it with --allowed-hosts or "
                            f"{ALLOWED_HOSTS_ENV}.\n", status=400, mimetype="text/plain")
        if request.path == _CALLBACK_PATH and request.method == "POST":
            problem = _malformed_callback(app, request.get_json(silent=True))
            if problem is not None:
                return Response(f"Malformed callback request: {problem}.\n", status=400, mimetype="text/plain")
        return None

    @server.after_request
    def _headers(response):
        html = response.get_data(as_text=True) if response.mimetype == "text/html" and not response.is_streamed \
            else None
        dev = bool(getattr(getattr(app, "_dev_tools", None), "serve_dev_bundles", False))
        response.headers.setdefault("Content-Security-Policy", content_security_policy(html, dev))
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @server.errorhandler(DependencyException)
    def _unknown_component_file(_exc):  # /_dash-component-suites/<path outside the registered files>
        return Response("Not found.\n", status=404, mimetype="text/plain")
