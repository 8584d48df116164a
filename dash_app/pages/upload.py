"""Upload or record a clip: its spectrogram and its top features (bars); a bar click overlays that feature."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, quote

from dash import Input, Output, Patch, State, ctx, dcc, html, no_update

from dash_app.background import background_args, forward_on_load, progress_indicator
from dash_app.components import empty_index_notice, field_error, fmt, no_sae_notice, provenance_line
from dash_app.data import (
    DEFAULT_TOP_FEATURES,
    SAMPLE_RATE,
    ClipNotFound,
    IndexAccess,
    IndexUnavailable,
    audio_url,
    clip_log_mel,
    decode_upload,
    default_set,
    edit_href,
    search_href,
    set_label,
    set_options,
    wav_data_uri,
)
from dash_app.figures import (
    LINE,
    PEAK,
    SHADING,
    clip_figure,
    clip_graph_style,
    padded_range,
    top_features_figure,
    trace_parts,
)
from freud_pipeline.frames import FRAME_SECONDS

log = logging.getLogger(__name__)

PATH = "/upload"
MAX_TOP_FEATURES = 200
ARTEFACT_ALLOWANCE = 16  # features read beyond "Top features", so that left-out artefacts leave the bars full
FIGURE_HEIGHT = 260  # px, of the clip's spectrogram with its activation trace
HIDDEN = {"display": "none"}
SHOWN = {"display": "block"}


def clip_request(search: str | None) -> dict | None:
    """/upload?clip=<clip_id>[&set=...]: analyse a clip of the dataset instead of an upload."""
    params = parse_qs((search or "").lstrip("?"))
    clip_id = (params.get("clip") or [None])[-1]
    return {"clip_id": clip_id} if clip_id else None


def clip_href(clip_id: str, set_id: str | None = None) -> str:
    return f"{PATH}?clip={quote(str(clip_id), safe='')}" + (f"&set={quote(str(set_id), safe='')}" if set_id else "")


def layout(access: IndexAccess, max_upload_mb: float, max_upload_seconds: float, search: str | None = None) -> html.Div:
    sets, message = access.status()
    if message:
        return html.Div([html.H2("Upload audio"), empty_index_notice(message)], id="upload-page-empty")
    wanted = (parse_qs((search or "").lstrip("?")).get("set") or [None])[-1]
    chosen = next((s for s in sets if str(s["set_id"]) == wanted), None) or default_set(sets)
    notes = [] if any(s.get("kind") == "sae" for s in sets) else [no_sae_notice()]
    limit_bytes = int(max_upload_mb * 1024 * 1024)
    return html.Div(
        [
            html.H2("Upload audio"),
            *notes,
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("Audio file or recording"),
                            html.Div(
                                [
                                    html.Div(
                                        dcc.Upload(
                                            id="upload-audio",
                                            children=html.Div(["Drop an audio file here or ", html.A("choose one")]),
                                            multiple=False,
                                            max_size=limit_bytes,
                                            className="upload-zone",
                                            className_reject="upload-zone upload-reject",
                                        ),
                                        id="upload-wrap",
                                        **{"data-max-bytes": str(limit_bytes), "data-max-mb": f"{max_upload_mb:g}"},
                                    ),
                                    html.Button("● Record", id="record-button", n_clicks=0, className="secondary record"),
                                ],
                                className="upload-row",
                            ),
                            html.Div(
                                f"Any format ffmpeg reads (WAV, FLAC, MP3, OGG, WebM, M4A ...), up to "
                                f"{max_upload_mb:g} MB and {max_upload_seconds:g} s.",
                                className="hint",
                            ),
                            html.Div(id="record-status", className="hint"),
                            field_error("upload-error"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("Feature set", htmlFor="upload-set"),
                            dcc.Dropdown(id="upload-set", options=set_options(sets), value=str(chosen["set_id"]),
                                         clearable=False, className="set-dropdown"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("Top features", htmlFor="upload-topn"),
                            dcc.Input(id="upload-topn", type="text", inputMode="numeric",
                                      value=str(DEFAULT_TOP_FEATURES), debounce=True, autoComplete="off"),
                            field_error("upload-topn-error"),
                        ],
                        className="control control-narrow",
                    ),
                ],
                className="controls",
            ),
            html.Details(
                [
                    html.Summary("…or analyse a clip of the dataset (find it by its words)"),
                    html.Div(
                        [
                            dcc.Input(id="clip-query", type="text", placeholder="words of the transcript",
                                      autoComplete="off"),
                            html.Button("Find clips", id="clip-go", n_clicks=0, className="secondary"),
                            html.Div(id="clip-results", className="label-results"),
                        ],
                        className="label-row",
                    ),
                ],
                className="by-label",
            ),
            dcc.Store(id="upload-clip"),
            dcc.Store(id="upload-clip-initial", data=clip_request(search)),
            dcc.Store(id="record-data"),
            dcc.Store(id="upload-features"),
            dcc.Store(id="upload-source"),
            progress_indicator("upload-progress"),
            html.Div(
                html.Div(
                    [
                        html.Div(id="upload-summary", className="muted"),
                        dcc.Graph(id="upload-graph", config={"displayModeBar": False, "responsive": True},
                                  className="clip-graph", style=clip_graph_style(FIGURE_HEIGHT)),
                        html.Div(
                            [
                                html.Audio(id="upload-player", controls=True, className="freud-audio",
                                           **{"data-graph": "upload-graph", "data-readout": "upload-readout"}),
                                html.Span(id="upload-readout", className="readout"),
                            ],
                            className="player-row",
                        ),
                        html.Div(id="upload-feature-link", className="card-line"),
                        dcc.Graph(id="upload-bars", config={"displayModeBar": False}),
                    ],
                    id="upload-result",
                    style=HIDDEN,
                    className="card",
                ),
                id="upload-result-wrap",
            ),
        ],
        id="upload-page",
    )


def parse_top_n(value) -> int | None:
    """The "Top features" field as a whole number from 1 to MAX_TOP_FEATURES; None for anything else (words,
    fractions, inf, nan, 1e400, out of range, or a crafted value that is not a string or a number)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() and 1 <= number <= MAX_TOP_FEATURES else None


def split_artefacts(ranked: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(the n strongest features that are not artefacts, the artefacts ranked above the last of them).

    Artefact features (labelled e.g. "clip onset") are left out of the bars: one tops almost every clip and says
    nothing about it. They are named in the summary line instead, so nothing is hidden silently."""
    shown = [f for f in ranked if not f.get("artefact")][:n]
    floor = shown[-1]["value"] if len(shown) == n else -float("inf")
    return shown, [f for f in ranked if f.get("artefact") and f["value"] >= floor]


def _edit_link(set_id: str, index: int, clip: dict | None) -> list:
    """A link that opens this clip on /edit with the feature ablated (SAE sets only: neurons are not editable)."""
    if not clip:
        return []
    href = edit_href(clip.get("clip_id"), set_id, f"{index}:0", upload=clip.get("token"))
    return [" · ", dcc.Link("ablate it on the edit page →", href=href, id="upload-edit-link")]


def _feature_link(set_id: str, feature: dict, clip: dict | None = None) -> list:
    """`clip`: {"clip_id": ...} or {"token": ...} for the edit link, None when the set is not an SAE set."""
    index = int(feature["index"])
    label = feature.get("label")
    kind = feature.get("label_kind")
    lift, held = feature.get("label_lift"), feature.get("label_heldout_precision")
    quality = "".join([f", lift {lift:.1f}" if isinstance(lift, (int, float)) else "",
                       f", held-out precision {held:.2f}" if isinstance(held, (int, float)) else ""])
    return [
        html.Span("showing feature ", className="muted"),
        html.Strong(str(index)),
        html.Span(f" ({kind + ' ' if kind in ('class', 'artefact') else ''}{label}{quality})" if label
                  else (" (unlabelled)" if feature.get("label_reason") else "")),
        html.Span(f" · max {fmt(float(feature.get('value') or 0.0))} at {float(feature.get('peak_time_s') or 0):.2f} s",
                  className="muted"),
        " · ",
        dcc.Link("open in feature search →", href=search_href(set_id, index), id="upload-search-link"),
        *_edit_link(set_id, index, clip),
    ]


def _patch_overlay(patch: Patch, feature: dict, n_mels: int) -> None:
    parts = trace_parts(feature.get("trace") or [], n_mels, f"feature {int(feature['index'])}")
    values = parts["values"].tolist()  # plain lists: a Patch's operations are not serialised like a figure
    patch["data"][SHADING]["z"] = [values]
    patch["data"][SHADING]["x0"] = parts["x0"]
    patch["data"][SHADING]["zmin"] = -parts["scale"]
    patch["data"][SHADING]["zmax"] = parts["scale"]
    patch["data"][LINE]["x0"] = parts["x0"]
    patch["data"][LINE]["y"] = values
    patch["data"][LINE]["name"] = parts["name"]
    peak_t, peak_v = feature.get("peak_time_s"), feature.get("value")
    patch["data"][PEAK]["x"] = [peak_t] if peak_t is not None else []
    patch["data"][PEAK]["y"] = [_value_at(feature.get("trace") or [], peak_t, peak_v)] if peak_t is not None else []
    y2_range = padded_range(parts["values"])
    if y2_range is not None:
        patch["layout"]["yaxis2"]["range"] = y2_range
    patch["layout"]["yaxis2"]["title"]["text"] = parts["name"]


def _value_at(trace, t, fallback):
    if t is None or not len(trace):
        return fallback
    return float(trace[min(len(trace) - 1, max(0, int(float(t) / FRAME_SECONDS)))])


def register(app, access: IndexAccess, *, max_upload_mb: float, max_upload_seconds: float) -> None:
    limit_bytes = int(max_upload_mb * 1024 * 1024)

    @app.callback(
        Output("upload-error", "children"),
        Output("upload-topn-error", "children"),
        Output("upload-result", "style"),
        Output("upload-summary", "children"),
        Output("upload-graph", "figure"),
        Output("upload-player", "src"),
        Output("upload-bars", "figure"),
        Output("upload-features", "data"),
        Output("upload-source", "data"),
        Output("upload-feature-link", "children"),
        Input("upload-audio", "contents"),
        Input("record-data", "data"),
        Input("upload-clip", "data"),
        Input("upload-set", "value"),
        Input("upload-topn", "value"),
        State("upload-audio", "filename"),
        State("upload-source", "data"),
        # Not on page load (that would disable the record button for a poll or two): a ?clip= in the URL comes in
        # through upload-clip (clip_on_load). A new upload, recording or setting starts this callback again, and
        # Dash cancels the running job then.
        prevent_initial_call=True,
        **background_args("upload-progress", (Output("record-button", "disabled"), True, False),
                          (Output("upload-result-wrap", "className"), "busy", "")),
    )
    def analyse(set_progress, contents, recorded, clip_request, set_id, topn, filename, source):
        from freud_pipeline.audio.decode import load_audio
        from freud_pipeline.errors import AudioError

        nothing = (no_update,) * 8
        trigger = ctx.triggered_id
        # A crafted request can send any JSON for any of these: anything of the wrong type counts as absent.
        filename = filename if isinstance(filename, str) else None
        recorded = recorded if isinstance(recorded, dict) else None
        clip_request = clip_request if isinstance(clip_request, dict) else None
        if trigger == "upload-audio":
            source = "upload"
        elif trigger == "record-data":
            source = "record"
        elif trigger == "upload-clip" or (trigger is None and clip_request):
            source = "clip" if clip_request else source
        n = parse_top_n(topn)
        if n is None:
            return "", f"Top features must be a whole number from 1 to {MAX_TOP_FEATURES}, not {topn!r}.", *nothing
        hide = (HIDDEN, None, no_update, None, no_update, None, source, None)
        if trigger == "upload-clip" and not clip_request:
            return "", "", HIDDEN, None, no_update, None, no_update, None, None, None  # back to a bare /upload
        if source == "clip" and clip_request:
            clip_id = str(clip_request.get("clip_id"))
            set_progress(f"Reading the audio of {clip_id}…")
            try:
                audio = access.clip_audio(clip_id).audio
            except (ClipNotFound, IndexUnavailable, FileNotFoundError):
                return f"No clip {clip_id!r} in the dataset manifest.", "", *hide
            filename, src = clip_id, audio_url(clip_id)
        else:
            if source == "record" and recorded:
                contents, filename = recorded.get("contents"), recorded.get("filename") or "recording.webm"
            if not contents:
                return "", "", *nothing  # nothing uploaded yet: only the controls changed
            try:
                data = decode_upload(contents)
            except (ValueError, TypeError):
                return f"{filename or 'The upload'} could not be read (not base64 file data).", "", *hide
            if len(data) > limit_bytes:
                return (f"{filename or 'The file'} is {len(data) / 1048576:.1f} MB; the limit is {max_upload_mb:g} MB.",
                        "", *hide)
            set_progress("Decoding audio…")
            try:
                audio = load_audio(data, max_seconds=max_upload_seconds)
            except AudioError as exc:
                message = str(exc).replace(f"{len(data)} bytes of input", filename or "the upload")
                return message.replace("pipe:0: ", ""), "", *hide
            src = None
        sets, message = access.status()
        info = next((s for s in sets if str(s["set_id"]) == str(set_id)), None)
        if message or info is None:
            return message or f"Unknown feature set {set_id!r}.", "", *hide
        try:
            ranked = access.index.clip_features(audio, str(set_id), n + ARTEFACT_ALLOWANCE, progress=set_progress)
            features, artefacts = split_artefacts([dict(f) for f in ranked], n)
        except Exception as exc:  # noqa: BLE001 - show the reason next to the control
            log.exception("clip_features failed")
            return f"The features of this clip could not be computed: {exc}", "", *hide
        for f in features:
            f["index"] = int(f["index"])
            f["trace"] = [float(v) for v in (f.get("trace") or [])]
        set_progress("Drawing the spectrogram…")
        mel = clip_log_mel(audio, access.n_mels)
        top = features[0] if features else None
        figure = clip_figure(mel, top["trace"] if top else [], peak_time_s=top.get("peak_time_s") if top else None,
                             peak_value=_value_at(top["trace"], top.get("peak_time_s"), top.get("value")) if top else None,
                             trace_name=f"feature {top['index']}" if top else "activation", height=FIGURE_HEIGHT)
        bars = top_features_figure(features, set_label=set_label(info), selected=top["index"] if top else None)
        src = src or wav_data_uri(audio)
        summary = f"{filename or 'clip'} · {len(audio) / SAMPLE_RATE:.2f} s · {len(features)} features of {set_label(info)}"
        if artefacts:
            summary += " · left out, artefacts: " + ", ".join(f"{f['index']} ({f['label']})" for f in artefacts)
        edit_clip = None
        if info.get("kind") == "sae":  # hand the clip to the edit page: by id, or the decoded upload by token
            edit_clip = {"clip_id": filename} if source == "clip" else {"token": access.uploads.put(audio)}
        link = _feature_link(str(set_id), top, edit_clip) if top else "No feature is active on this clip."
        stored = {"set_id": str(set_id), "features": features, "edit_clip": edit_clip}
        return "", "", SHOWN, summary, figure, src, bars, stored, source, link

    @app.callback(
        Output("upload-graph", "figure", allow_duplicate=True),
        Output("upload-bars", "figure", allow_duplicate=True),
        Output("upload-feature-link", "children", allow_duplicate=True),
        Input("upload-bars", "clickData"),
        State("upload-features", "data"),
        prevent_initial_call=True,
    )
    def overlay(click, stored):
        if not click or not stored:
            return no_update, no_update, no_update
        point = click["points"][0]
        index = int(point.get("customdata", [point.get("x")])[0])
        feature = next((f for f in stored["features"] if int(f["index"]) == index), None)
        if feature is None:
            return no_update, no_update, no_update
        graph = Patch()
        _patch_overlay(graph, feature, access.n_mels)
        bars = Patch()
        bars["data"][0]["marker"]["color"] = [
            "#ff6f00" if int(f["index"]) == index else ("#43a047" if float(f.get("value") or 0) >= 0 else "#e53935")
            for f in stored["features"]
        ]
        return graph, bars, _feature_link(stored["set_id"], feature, stored.get("edit_clip"))

    forward_on_load(app, "upload-clip-initial", "upload-clip")  # the clip named in the URL, to `analyse`

    @app.callback(
        Output("upload-clip", "data"),
        Input("url", "search"),
        State("url", "pathname"),
        State("upload-clip", "data"),
        prevent_initial_call=True,
    )
    def clip_from_url(search, pathname, current):
        if (pathname or "").rstrip("/") != PATH:
            return no_update
        wanted = clip_request(search)
        return no_update if wanted == current else wanted

    @app.callback(
        Output("clip-results", "children"),
        Input("clip-go", "n_clicks"),
        Input("clip-query", "n_submit"),
        State("clip-query", "value"),
        State("upload-set", "value"),
        prevent_initial_call=True,
    )
    def find_clips(_clicks, _submit, text, set_id):
        text = (text or "").strip()
        if not text:
            return html.Span("Type some words first.", className="field-error")
        try:
            found = list(access.index.search_clips(text) or [])
        except Exception as exc:  # noqa: BLE001
            log.exception("search_clips failed")
            return html.Span(f"Clip search failed: {exc}", className="field-error")
        if not found:
            return html.Span(f"No clip's transcript contains {text!r}.", className="muted")
        items = []
        for row in found[:50]:
            row = row if isinstance(row, dict) else {"clip_id": row}
            clip_id = str(row.get("clip_id"))
            provenance = provenance_line(row)
            items.append(html.Li([dcc.Link(clip_id, href=clip_href(clip_id, set_id), className="clip-id"),
                                  html.Span(f"  {row.get('transcript') or ''}", className="muted"),
                                  *([html.Span(f"  ({provenance})", className="hint provenance")] if provenance
                                    else [])]))
        more = f" (first 50 of {len(found)})" if len(found) > 50 else ""
        return html.Div([html.Span(f"{len(found)} clip{'s' if len(found) != 1 else ''}{more}:", className="muted"),
                         html.Ul(items, className="clip-list")])

    app.clientside_callback(
        "function(n) { return window.freud.record(n); }",
        Output("record-button", "children"),
        Output("record-status", "children"),
        Input("record-button", "n_clicks"),
        prevent_initial_call=True,
    )
