"""The FREUD feature browser: a multi-page Dash app over a FeatureIndex.

Pages (dcc.Location routing, top nav): `/search` (feature search; the URL holds its state), `/upload`
(upload or record a clip and see its top features), `/edit` (scale SAE features inside Whisper and compare
transcripts) and `/runs` (SAE training runs from MLflow, side-by-side comparison). `/audio/<clip_id>` serves a
manifest clip's audio as WAV and `/spectrogram/<clip_id>.png` its log-mel image, looked up by id only (404 for
unknown ids); no file path ever appears in a URL. Every response carries security headers and only allowed Host
names are answered (dash_app.security).
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import dash
from dash import Input, Output, State, dcc, html
from flask import abort, request, send_file

from dash_app import security
from dash_app.background import manager_for
from dash_app.data import ClipNotFound, IndexAccess, IndexUnavailable
from dash_app.pages import edit, runs, search, upload
from freud_pipeline.errors import AudioError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
NAV = (("/search", "Feature search"), ("/upload", "Upload audio"), ("/edit", "Edit features"), ("/runs", "SAE runs"))
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _nav() -> html.Nav:
    return html.Nav(
        [
            dcc.Link([html.Span("FREUD", className="brand-name"),
                      html.Span(" feature browser", className="brand-sub")], href="/", className="brand"),
            html.Div([dcc.Link(text, href=href, className="nav-link", id=f"nav-{href.strip('/')}")
                      for href, text in NAV], className="nav-links"),
        ],
        className="topnav",
    )


def _not_found(pathname: str) -> html.Div:
    return html.Div(
        [html.H2("Page not found"),
         html.P([f"No page at {pathname}. Go to ", dcc.Link("feature search", href="/search"), " or ",
                 dcc.Link("upload audio", href="/upload"), "."])],
        id="not-found-page",
    )


def create_app(index: Any | None = None, *, data_dir: str | Path | None = None, max_upload_mb: float = 50,
               max_upload_seconds: float = 60.0, title: str = "FREUD", mlflow_uri: str | None = None,
               background_threads: int | None = None, allowed_hosts: Sequence[str] | None = None) -> dash.Dash:
    """Build the app. `index` is a FeatureIndex (or anything with its query API); None opens the one under
    `data_dir` (or the configured FREUD data directory) lazily, so the app starts before the pipeline has run.
    `mlflow_uri`: the MLflow store of the runs page (default: env MLFLOW_TRACKING_URI, else data_dir's mlflow.db).

    Slow work (decoding and inference on an upload, edits) runs as Dash background callbacks on a pool of
    `background_threads` threads in this process (default env FREUD_APP_BACKGROUND_THREADS, else 2;
    dash_app.background): the request that starts one returns at once and the browser polls for progress and
    the result, so request threads stay free for searches. Results are kept in `<data dir>/cache/background`,
    shared by all worker processes.

    `allowed_hosts`: the Host names answered, others get 400 (default `security.allowed_hosts_for()`: loopback
    names plus env FREUD_APP_ALLOWED_HOSTS; `python -m dash_app` adds the host it binds)."""
    access = IndexAccess(index, data_dir)
    _fast_json()
    background = manager_for(access.cache_dir("background"), threads=background_threads)

    def mlflow_uri_of() -> str:
        from freud_pipeline.features.runs import tracking_uri_for

        return mlflow_uri or tracking_uri_for(data_dir)

    app = dash.Dash(
        __name__,
        title=title,
        assets_folder=str(ASSETS),
        suppress_callback_exceptions=True,
        update_title=None,
        background_callback_manager=background,
    )
    # Bound the request body: uploads travel base64-encoded (4/3) inside a JSON callback request.
    app.server.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024 * 4 / 3) + 4 * 1024 * 1024
    app.freud_access = access  # for tests and extensions
    app.freud_background = background

    app.layout = html.Div(
        [
            dcc.Location(id="url", refresh=False),
            _nav(),
            html.Main(id="page-content", className="page"),
            dcc.Interval(id="playhead-interval", interval=100),
            dcc.Store(id="playhead-sink"),
        ],
        className="app",
    )

    @app.callback(Output("page-content", "children"), Input("url", "pathname"), State("url", "search"))
    def route(pathname, search_string):
        path = (pathname or "/").rstrip("/") or "/"
        if path in ("/", search.PATH):
            return search.layout(access, search_string)
        if path == upload.PATH:
            return upload.layout(access, max_upload_mb, max_upload_seconds, search_string)
        if path == edit.PATH:
            return edit.layout(access, max_upload_mb, max_upload_seconds, search_string)
        if path == runs.PATH:
            return runs.layout(access, mlflow_uri_of)
        return _not_found(pathname)

    @app.callback(
        *[Output(f"nav-{href.strip('/')}", "className") for href, _ in NAV],
        Input("url", "pathname"),
    )
    def highlight_nav(pathname):
        path = (pathname or "/").rstrip("/") or "/"
        path = "/search" if path == "/" else path
        return tuple("nav-link active" if path == href else "nav-link" for href, _ in NAV)

    search.register(app, access)
    upload.register(app, access, max_upload_mb=max_upload_mb, max_upload_seconds=max_upload_seconds)
    edit.register(app, access, max_upload_mb=max_upload_mb, max_upload_seconds=max_upload_seconds)
    runs.register(app, access, mlflow_uri_of)
    background.seal()  # this app's background functions only (see ThreadedDiskcacheManager.seal)

    # Playheads: read each player's currentTime and move its figure's line (no server round trip).
    app.clientside_callback(
        "function(n) { return window.freud ? window.freud.playheads(n) : window.dash_clientside.no_update; }",
        Output("playhead-sink", "data"),
        Input("playhead-interval", "n_intervals"),
    )

    _register_audio_route(app, access)
    security.install(app, security.allowed_hosts_for() if allowed_hosts is None else allowed_hosts)
    _finish_dash_setup(app)
    return app


def _finish_dash_setup(app: dash.Dash) -> None:
    """Run Dash's once-per-process setup now, before any request. Dash runs it in a before-request hook that
    marks it done before it has registered the component-suite scripts it may serve; in a threaded worker whose
    first requests are several script fetches at once (a page that the other gunicorn worker served), all but
    one were answered 404 and the page never drew. Pinned dash==4.4.1 (tests/test_app_units.py checks the race)."""
    with app.server.app_context():
        app._setup_server()


def _fast_json() -> None:
    """Serialise callback responses with orjson: Dash goes through plotly's JSON encoder, whose default engine
    encodes a search page's figures three times over (encode, decode, encode)."""
    import plotly.io as pio

    try:
        import orjson  # noqa: F401
    except ImportError:  # a dependency, but the app still works without it
        return
    pio.json.config.default_engine = "orjson"


def _unplayable(app: dash.Dash, clip_id: str, exc: AudioError):
    """422 with the reason, for a clip whose file exists but cannot be decoded (not a 500: the rest works)."""
    log.warning("clip %s cannot be decoded: %s", clip_id, exc)
    response = app.server.response_class(f"clip {clip_id!r} cannot be decoded: {exc}\n", status=422,
                                         mimetype="text/plain")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _register_audio_route(app: dash.Dash, access: IndexAccess) -> None:
    @app.server.route("/audio/<path:clip_id>")
    def clip_audio(clip_id: str):
        """A manifest clip's audio as 16-bit WAV, by id only; ?download=1 makes it an attachment."""
        try:
            data = access.clip_wav(clip_id)
        except (ClipNotFound, IndexUnavailable, FileNotFoundError):
            abort(404)
        except AudioError as exc:
            return _unplayable(app, clip_id, exc)
        download = request.args.get("download") in ("1", "true", "yes")
        name = (_SAFE_NAME.sub("_", clip_id).strip("._") or "clip") + ".wav"
        response = send_file(io.BytesIO(data), mimetype="audio/wav", as_attachment=download, download_name=name,
                             conditional=True, max_age=3600)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.server.route("/spectrogram/<path:name>")
    def clip_spectrogram(name: str):
        """A manifest clip's log-mel PNG (what search results draw under the trace), by id only. With the
        current ?v= (the image's hash, as search pages link it) the browser may keep it for good."""
        clip_id = name[: -len(".png")] if name.endswith(".png") else name
        try:
            spectrogram = access.clip_spectrogram(clip_id)
        except (ClipNotFound, IndexUnavailable, FileNotFoundError):
            abort(404)
        except AudioError as exc:
            return _unplayable(app, clip_id, exc)
        response = app.server.response_class(spectrogram.png_top_down, mimetype="image/png")
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.args.get("v") == spectrogram.version:
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        else:  # an old or missing version: serve the current image, but let the browser ask again
            response.headers["Cache-Control"] = "no-cache"
        response.set_etag(spectrogram.version)
        return response.make_conditional(request)
