"""Feature editing: /edit[?clip=<clip_id> | ?upload=<token>][&set=<set_id>][&features=12:0,40:1.5]

Upload or record a clip (or load a dataset clip by id), pick an SAE feature set, list features with factors
(0 ablates, -1 flips, 2 doubles), and see three transcripts (original, SAE reconstruction spliced in, edited;
differences highlighted), the edited features' traces before/after and the per-frame activation change, and each
edited feature's stored effect on the transcript when ablated alone (`features.effect_store`, with the chance level).
The work is `freud_pipeline.features.editing.edit_clip`; this page only collects the inputs and draws.

Audio stays on the server: an upload or recording is decoded once and kept in a small LRU under a random token
(the browser holds the token only), a dataset clip is looked up by id.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

import plotly.graph_objects as go
from dash import ALL, Input, Output, State, ctx, dcc, html, no_update
from plotly.subplots import make_subplots

from dash_app.background import HIDDEN, background_args, forward_on_load, progress_indicator
from dash_app.components import audio_player, empty_index_notice, field_error, fmt, notice
from dash_app.data import (
    EDIT_PATH,
    SAMPLE_RATE,
    ClipNotFound,
    IndexAccess,
    IndexUnavailable,
    audio_url,
    clip_log_mel,
    decode_upload,
    feature_effects,
    search_href,
    set_label,
    wav_data_uri,
)
from dash_app.figures import clip_figure, clip_graph_style

log = logging.getLogger(__name__)

PATH = EDIT_PATH
N_PICKS = 12
COLOURS = ("#1e88e5", "#e53935", "#43a047", "#8e24aa", "#fb8c00", "#00897b", "#6d4c41", "#3949ab")
INS = {"background": "#c8e6c9", "borderRadius": "3px", "padding": "0 2px", "textDecoration": "none"}
DEL = {"background": "#ffcdd2", "borderRadius": "3px", "padding": "0 2px", "color": "#8e2424"}


def _params(search: str | None) -> dict[str, str]:
    parsed = parse_qs((search or "").lstrip("?"))
    return {k: v[-1] for k, v in parsed.items() if v}


def _sae_sets(sets: list[dict]) -> list[dict]:
    rows = [s for s in sets if s.get("kind") == "sae"]
    return sorted(rows, key=lambda s: str(s.get("created_at") or ""), reverse=True)


def no_sae_set_notice() -> html.Div:
    return notice(
        [html.Strong("No SAE feature set to edit. "),
         "Editing scales sparse-autoencoder latents, and this index only has neuron sets (raw Whisper "
         "activations). Train an SAE and index its latents (the topk_sae and sae_feature_index assets in "
         "Dagster, or `make demo`), then reload this page. ",
         dcc.Link("SAE runs →", href="/runs")],
        "warning", id="edit-no-sae",
    )


def layout(access: IndexAccess, max_upload_mb: float, max_upload_seconds: float, search: str | None = None):
    sets, message = access.status()
    if message:
        return html.Div([html.H2("Edit features"), empty_index_notice(message)], id="edit-page-empty")
    saes = _sae_sets(sets)
    if not saes:
        return html.Div([html.H2("Edit features"), no_sae_set_notice()], id="edit-page-empty")
    params = _params(search)
    chosen = next((s for s in saes if s["set_id"] == params.get("set")), saes[0])
    clip_id = params.get("clip")
    upload_token = params.get("upload")
    request = {"clip_id": clip_id} if clip_id else {"token": upload_token} if upload_token else None
    return html.Div(
        [
            html.H2("Edit features"),
            html.Div(
                "Scale SAE features inside Whisper's encoder and hear what the model makes of it: 0 ablates a "
                "feature, -1 flips it, 2 doubles it (a factor acts only where the feature is active).",
                className="hint", style={"marginBottom": "8px"},
            ),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("Audio file or recording"),
                            html.Div(
                                [
                                    html.Div(dcc.Upload(
                                        id="edit-upload",
                                        children=html.Div(["Drop an audio file here or ", html.A("choose one")]),
                                        multiple=False,
                                        className="upload-zone",
                                        className_reject="upload-zone upload-reject",
                                    )),
                                    html.Button("● Record", id="edit-record-button", n_clicks=0,
                                                className="secondary record"),
                                ],
                                className="upload-row",
                            ),
                            html.Div(f"Any format ffmpeg reads, up to {max_upload_mb:g} MB and "
                                     f"{max_upload_seconds:g} s; the first 30 s are edited.", className="hint"),
                            html.Div(id="edit-record-status", className="hint"),
                            field_error("edit-audio-error"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("…or a dataset clip", htmlFor="edit-clip-id"),
                            html.Div(
                                [
                                    dcc.Input(id="edit-clip-id", type="text", value=clip_id or "",
                                              placeholder="clip id", autoComplete="off",
                                              style={"flex": "1"}),
                                    html.Button("Load", id="edit-clip-go", n_clicks=0, className="secondary"),
                                ],
                                style={"display": "flex", "gap": "8px"},
                            ),
                            html.Div(["Find clip ids by their words on the ", dcc.Link("upload page", href="/upload"),
                                      "."], className="hint"),
                            field_error("edit-clip-error"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(className="controls-break"),
                    html.Div(
                        [
                            html.Label("SAE feature set", htmlFor="edit-set"),
                            dcc.Dropdown(id="edit-set", options=[{"label": set_label(s), "value": s["set_id"]}
                                                                 for s in saes],
                                         value=chosen["set_id"], clearable=False, className="set-dropdown"),
                            field_error("edit-set-error"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("Features (index[:factor], …)", htmlFor="edit-features"),
                            dcc.Input(id="edit-features", type="text", value=params.get("features", ""),
                                      placeholder="e.g. 12:0, 40:1.5", autoComplete="off"),
                            html.Div("Without a factor, the default factor applies.", className="hint"),
                            field_error("edit-features-error"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("Default factor", htmlFor="edit-factor"),
                            dcc.Input(id="edit-factor", type="text", inputMode="decimal",
                                      value=params.get("factor", "0"), autoComplete="off"),
                            html.Div("0 ablates", className="hint"),
                            field_error("edit-factor-error"),
                        ],
                        className="control control-narrow",
                    ),
                    html.Div(className="controls-break"),
                    html.Div(
                        [
                            dcc.Checklist(id="edit-keep-error",
                                          options=[{"label": " Keep the SAE's reconstruction error", "value": "keep"}],
                                          value=["keep"], className="abs-check"),
                            html.Div("Adds back x − x̂, so the edit is the only change to the model; unticked, the "
                                     "edited activation is the SAE's reconstruction alone.", className="hint"),
                        ],
                        className="control control-wide",
                    ),
                    html.Div([html.Button("Apply edit", id="edit-go", n_clicks=0, className="primary"),
                              html.Button("Cancel", id="edit-cancel", n_clicks=0, className="secondary",
                                          style=HIDDEN)],
                             className="control control-buttons"),
                ],
                className="controls",
            ),
            dcc.Store(id="edit-clip-request"),
            dcc.Store(id="edit-clip-initial", data=request),
            dcc.Store(id="edit-record-data"),
            dcc.Store(id="edit-source"),
            progress_indicator("edit-source-progress"),
            progress_indicator("edit-picks-progress"),
            html.Div([html.Div(id="edit-source-info"), html.Div(id="edit-picks")]),
            progress_indicator("edit-progress"),
            html.Div(html.Div(id="edit-results"), id="edit-results-wrap"),
        ],
        id="edit-page",
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _diff_view(reference: str, other: str, id_: str) -> html.Div:
    from freud_pipeline.features.editing import word_diff

    spans = []
    for op, text in word_diff(reference, other):
        if op == "same":
            spans.append(html.Span(text + " "))
        elif op == "new":
            spans += [html.Ins(text, style=INS, className="diff-new"), " "]
        else:
            spans += [html.Del(text, style=DEL, className="diff-gone"), " "]
    return html.Div(spans or html.Span("(nothing)", className="muted"), className="transcript", id=id_)


def transcripts_card(result: dict) -> html.Div:
    t = result["transcripts"]
    keep = result["keep_error"]
    base_name = "original" if keep else "SAE reconstruction"
    rows = [
        ("Original", html.Div(t["original"] or "(nothing)", className="transcript", id="edit-transcript-original"),
         "Whisper as it is"),
        ("SAE reconstruction", _diff_view(t["original"], t["spliced"], "edit-transcript-spliced"),
         f"x̂ spliced in at {result['hook']} · differences from the original"),
        ("Edited", _diff_view(t["original"] if keep else t["spliced"], t["edited"], "edit-transcript-edited"),
         f"differences from the {base_name}" + (" (error term kept)" if keep else "")),
    ]
    changed = result["changed"]
    verdict = (html.Strong("The edit changed the transcript.", style={"color": "#2e7d32"}) if changed else
               html.Span(["The transcript did not change; the activations did (max ‖Δx‖ per frame ",
                          html.Strong(fmt(result["max_activation_change"])), ")." if result["max_activation_change"]
                          else ") — the edited features are not active on this clip."]))
    return html.Div(
        [
            html.H3("Transcripts", className="card-title"),
            html.Table(html.Tbody([
                html.Tr([html.Th(name, style={"textAlign": "left", "verticalAlign": "top", "paddingRight": "14px",
                                              "whiteSpace": "nowrap", "width": "150px"}),
                         html.Td([view, html.Div(hint, className="hint")])])
                for name, view, hint in rows]), style={"width": "100%"}),
            html.Div(verdict, id="edit-verdict", className="card-line"),
        ],
        className="card", id="edit-transcripts", style={"marginBottom": "12px"},
    )


def edit_figure(result: dict) -> go.Figure:
    """Row 1: each edited feature before (solid) and after (dashed); row 2: ‖Δx‖ per frame at the hook."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.62, 0.38])
    step = result["frame_seconds"]
    times = [round((i + 0.5) * step, 4) for i in range(result["n_frames"])]
    for n, (j, trace) in enumerate(result["traces"].items()):
        colour = COLOURS[n % len(COLOURS)]
        factor = trace["factor"]
        fig.add_trace(go.Scatter(x=times, y=trace["before"], mode="lines", name=f"feature {j} before",
                                 line={"color": colour, "width": 1.6}, legendgroup=str(j),
                                 hovertemplate=f"feature {j} before" + " %{x:.2f} s: %{y:.3f}<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=times, y=trace["after"], mode="lines", name=f"feature {j} after (×{factor:g})",
                                 line={"color": colour, "width": 2, "dash": "dash"}, legendgroup=str(j),
                                 hovertemplate=f"feature {j} after" + " %{x:.2f} s: %{y:.3f}<extra></extra>"),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=times, y=result["activation_change"], mode="lines", name="activation change ‖Δx‖",
                             line={"color": "#ff6f00", "width": 1.6}, fill="tozeroy",
                             fillcolor="rgba(255,111,0,0.18)",
                             hovertemplate="‖Δx‖ %{x:.2f} s: %{y:.3f}<extra></extra>"),
                  row=2, col=1)
    fig.update_layout(
        height=400, margin={"l": 56, "r": 16, "t": 56, "b": 40}, plot_bgcolor="#fafafa", hovermode="x unified",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0, "font": {"size": 11}},
    )
    fig.update_yaxes(title_text="latent", row=1, col=1, zeroline=True, zerolinecolor="#bbb")
    fig.update_yaxes(title_text="‖Δx‖", row=2, col=1, rangemode="tozero")
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    return fig


def _signed(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def effects_view(access: IndexAccess, set_id: str | None, features: list[int]) -> html.Div:
    """The stored effect of each edited feature on the transcript when it alone is ablated (sae_feature_effects),
    with the set's chance level, or "not computed"."""
    summary, rows = feature_effects(access, set_id, features) if set_id else (None, {})
    title = html.Strong("Effect on the transcript when ablated alone ")
    if summary is None:
        return html.Div([title, html.Span("not computed for this set (the sae_feature_effects asset measures it).",
                                          className="muted")], className="card-line", id="edit-effects")
    threshold = summary.get("chance_abs_p95")
    pad = {"paddingRight": "18px"}
    body = []
    for j in features:
        row = rows.get(int(j))
        if row is None:
            body.append(html.Tr([html.Td(str(j), style=pad),
                                 html.Td("not computed", colSpan=4, className="muted effect-missing")]))
            continue
        above = threshold is not None and row["delta_ce"] is not None and row["delta_ce"] > threshold
        body.append(html.Tr([
            html.Td(str(j), style=pad),
            html.Td(html.Strong(_signed(row["delta_ce"])) if above else _signed(row["delta_ce"]), style=pad,
                    className="effect-delta-ce"),
            html.Td(f"[{_signed(row['ci_low'])}, {_signed(row['ci_high'])}]", style=pad),
            html.Td(fmt(row["n_clips"]), style=pad),
            html.Td("not measured" if row["delta_wer"] is None else f"{100 * row['delta_wer']:+.1f} points",
                    style=pad),
        ]))
    table = html.Table(
        [html.Thead(html.Tr([html.Th(h, style={"textAlign": "left", "paddingRight": "18px"})
                             for h in ("feature", "ΔCE (nats/token)", "95% CI", "top clips", "ΔWER")])),
         html.Tbody(body)], className="stats-table", id="edit-effects-table")
    chance = (f"Chance (ablating a random direction of the same norm, {fmt(summary.get('chance_n') or 0)} features): "
              f"ΔCE {_signed(summary.get('chance_delta_ce'))} [{_signed(summary.get('chance_ci_low'))}, "
              f"{_signed(summary.get('chance_ci_high'))}]; 95% of them below |ΔCE| "
              + ("–" if threshold is None else f"{threshold:.4f}")
              + ("" if summary.get("current") else " · computed on an earlier build of this set"))
    return html.Div([title, html.Span("(stored: the original model against the feature removed on its top clips; "
                                      "bold: above chance)", className="muted"), table,
                     html.Div(chance, className="hint", id="edit-effects-chance")],
                    className="card-line", id="edit-effects", style={"marginTop": "10px"})


def results_view(result: dict, access: IndexAccess, audio, source: dict) -> html.Div:
    set_id = result["set_id"]
    notes = []
    if result["inactive"]:
        listed = ", ".join(str(j) for j in result["inactive"])
        notes.append(notice(f"Feature{'s' if len(result['inactive']) > 1 else ''} {listed} "
                            f"{'are' if len(result['inactive']) > 1 else 'is'} not active on this clip: "
                            "a factor changes nothing where a feature is silent.", "info", id="edit-inactive"))
    if result["truncated"]:
        notes.append(notice(f"Only the first 30 s of the {result['duration_s']:.1f} s clip were edited.", "info"))
    rows = []
    pad = {"paddingRight": "18px"}
    for j, trace in result["traces"].items():
        rows.append(html.Tr([
            html.Td(dcc.Link(str(j), href=search_href(set_id, j)) if set_id else str(j), style=pad),
            html.Td(f"×{trace['factor']:g}", style=pad),
            html.Td(fmt(trace["active_frames"]), style=pad),
            html.Td(f"{fmt(trace['peak'])} at {trace['peak_time_s']:.2f} s", style=pad),
            html.Td(fmt(max(trace["after"], key=abs) if trace["after"] else 0.0), style=pad),
        ]))
    table = html.Table(
        [html.Thead(html.Tr([html.Th(h, style={"textAlign": "left", "paddingRight": "18px"})
                             for h in ("feature", "factor", "active frames", "peak before", "peak after")])),
         html.Tbody(rows)],
        className="stats-table", id="edit-table",
    )
    first = next(iter(result["traces"].items()), None)
    spectrogram = []
    if first is not None:
        j, trace = first
        mel = clip_log_mel(audio, access.n_mels)
        peak_t = trace["peak_time_s"]
        figure = clip_figure(mel, trace["before"], peak_time_s=peak_t if trace["active_frames"] else None,
                             peak_value=trace["peak"], trace_name=f"feature {j} before", height=230)
        src = (audio_url(source["clip_id"]) if source.get("kind") == "clip"
               else wav_data_uri(audio))
        spectrogram = [
            dcc.Graph(id="edit-spectrogram", figure=figure, config={"displayModeBar": False, "responsive": True},
                      className="clip-graph", style=clip_graph_style(figure.layout.height)),
            html.Div([audio_player(src, "edit-spectrogram", "edit-readout", player_id="edit-player"),
                      html.Span(id="edit-readout", className="readout")], className="player-row"),
        ]
    meta = (f"{result['model']} · {result['hook']} · SAE {result['n_latents']} latents · reconstruction FVU on "
            f"this clip {fmt(result['reconstruction_fvu'])} · {result['seconds']:.1f} s")
    return html.Div(
        [
            *notes,
            transcripts_card(result),
            html.Div(
                [
                    html.H3("Edited features", className="card-title"),
                    html.Div(meta, className="muted card-line", id="edit-meta"),
                    table,
                    effects_view(access, set_id, [int(j) for j in result["traces"]]),
                    dcc.Graph(id="edit-graph", figure=edit_figure(result), config={"displayModeBar": False}),
                    *spectrogram,
                ],
                className="card",
            ),
        ],
        id="edit-output",
    )


def picks_view(features: list[dict], set_id: str) -> html.Div:
    if not features:
        return html.Div("No feature of this set is active on this clip.", className="muted", id="edit-no-picks")
    chips = []
    for f in features:
        j = int(f["index"])
        label = f" {f['label']}" if f.get("label") else ""
        chips.append(html.Button(f"{j}{label} · {fmt(float(f.get('value') or 0.0))}",
                                 id={"type": "edit-pick", "index": j}, n_clicks=0, className="chip",
                                 title=f"add feature {j} (max {float(f.get('value') or 0):.3f} at "
                                       f"{float(f.get('peak_time_s') or 0):.2f} s)",
                                 style={"border": "none", "cursor": "pointer"}))
    return html.Div(
        [html.Span("Top features of this clip (click to add): ", className="muted"), *chips],
        className="card-line", id="edit-pick-list",
    )


# ----------------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------------


ERRORS = ("audio", "clip", "set", "features", "factor")


def register(app, access: IndexAccess, *, max_upload_mb: float, max_upload_seconds: float) -> None:
    from freud_pipeline.features.editing import EditError, edit_clip, parse_edits, parse_factor

    uploads = access.uploads  # shared with the upload page, whose links hand a clip over by token
    limit_bytes = int(max_upload_mb * 1024 * 1024)

    def source_audio(source: dict | None):
        """(audio, error message) of the stored source."""
        if not source:
            return None, "Upload or record a clip, or load a dataset clip, first."
        if source.get("kind") == "clip":
            try:
                return access.clip_audio(str(source["clip_id"])).audio, None
            except (ClipNotFound, IndexUnavailable, FileNotFoundError):
                return None, f"No clip {source['clip_id']!r} in the dataset manifest."
        audio = uploads.get(str(source.get("token")))
        if audio is None:
            return None, "The server no longer holds this upload (restarted or too many since); upload it again."
        return audio, None

    @app.callback(
        Output("edit-source", "data"),
        Output("edit-source-info", "children"),
        Output("edit-audio-error", "children", allow_duplicate=True),
        Output("edit-clip-error", "children", allow_duplicate=True),
        Output("edit-results", "children", allow_duplicate=True),
        Input("edit-upload", "contents"),
        Input("edit-record-data", "data"),
        Input("edit-clip-go", "n_clicks"),
        Input("edit-clip-id", "n_submit"),
        Input("edit-clip-request", "data"),
        State("edit-upload", "filename"),
        State("edit-clip-id", "value"),
        # not on page load (the URL's clip comes in through edit-clip-request, see clip_on_load)
        prevent_initial_call=True,
        **background_args("edit-source-progress", (Output("edit-clip-go", "disabled"), True, False)),
    )
    def load_source(set_progress, contents, recorded, _go, _submit, request, filename, clip_value):
        from freud_pipeline.audio.decode import load_audio
        from freud_pipeline.errors import AudioError

        trigger = ctx.triggered_id
        keep = (no_update,) * 5
        if trigger in (None, "edit-clip-request") and request and request.get("token"):
            audio = uploads.get(str(request["token"]))  # a clip analysed on the upload page
            if audio is None:
                return (no_update, no_update, "The server no longer holds that upload (restarted or too many since); "
                        "upload it again.", "", no_update)
            source = {"kind": "upload", "token": str(request["token"]), "label": "clip from the upload page",
                      "duration_s": len(audio) / SAMPLE_RATE}
            player = wav_data_uri(audio)
        elif trigger in ("edit-clip-go", "edit-clip-id") or (trigger in (None, "edit-clip-request") and request):
            clip_id = (clip_value or "").strip() if trigger in ("edit-clip-go", "edit-clip-id") else \
                str(request.get("clip_id") or "")
            if not clip_id:
                return no_update, no_update, "", "Type a clip id first.", no_update
            set_progress(f"Reading the audio of {clip_id}…")
            try:
                audio = access.clip_audio(clip_id).audio
            except (ClipNotFound, IndexUnavailable, FileNotFoundError):
                return no_update, no_update, "", f"No clip {clip_id!r} in the dataset manifest.", no_update
            source = {"kind": "clip", "clip_id": clip_id, "label": clip_id, "duration_s": len(audio) / SAMPLE_RATE}
            player = audio_url(clip_id)
        elif trigger in ("edit-upload", "edit-record-data"):
            if trigger == "edit-record-data":
                if not recorded:
                    return keep
                contents, filename = recorded.get("contents"), recorded.get("filename") or "recording.webm"
            if not contents:
                return keep
            try:
                data = decode_upload(contents)
            except (ValueError, TypeError):
                return no_update, no_update, f"{filename or 'The upload'} could not be read.", "", no_update
            if len(data) > limit_bytes:
                return (no_update, no_update, f"{filename or 'The file'} is {len(data) / 1048576:.1f} MB; the limit "
                        f"is {max_upload_mb:g} MB.", "", no_update)
            set_progress("Decoding audio…")
            try:
                audio = load_audio(data, max_seconds=max_upload_seconds)
            except AudioError as exc:
                message = str(exc).replace(f"{len(data)} bytes of input", filename or "the upload")
                return no_update, no_update, message.replace("pipe:0: ", ""), "", no_update
            label = filename or "recording"
            source = {"kind": "upload", "token": uploads.put(audio), "label": label,
                      "duration_s": len(audio) / SAMPLE_RATE}
            player = wav_data_uri(audio)
        else:
            return keep
        info = html.Div(
            [html.Span("clip ", className="muted"), html.Strong(source["label"], className="clip-id"),
             html.Span(f" · {source['duration_s']:.2f} s", className="muted"), " ",
             html.Audio(src=player, controls=True, preload="metadata", className="freud-audio",
                        style={"height": "30px", "verticalAlign": "middle"})],
            className="card-line", id="edit-source-summary",
        )
        return source, info, "", "", None

    @app.callback(
        Output("edit-picks", "children"),
        Input("edit-source", "data"),
        Input("edit-set", "value"),
        prevent_initial_call=True,  # nothing to pick from before a clip is loaded
        **background_args("edit-picks-progress"),
    )
    def quick_picks(set_progress, source, set_id):
        if not source or not set_id:
            return None
        audio, error = source_audio(source)
        if audio is None:
            return html.Div(error, className="field-error")
        try:
            features = [dict(f) for f in access.index.clip_features(audio, str(set_id), N_PICKS,
                                                                    progress=set_progress)]
        except Exception as exc:  # noqa: BLE001 - quick picks are a help, not the edit
            log.exception("clip_features failed")
            return html.Div(f"The top features of this clip could not be computed: {exc}", className="field-error")
        return picks_view([f for f in features if float(f.get("value") or 0) > 0], str(set_id))

    @app.callback(
        Output("edit-features", "value"),
        Input({"type": "edit-pick", "index": ALL}, "n_clicks"),
        State("edit-features", "value"),
        prevent_initial_call=True,
    )
    def add_pick(clicks, current):
        trigger = ctx.triggered_id
        if not isinstance(trigger, dict) or not any(c for c in (clicks or []) if c) or not ctx.triggered[0]["value"]:
            return no_update
        j = int(trigger["index"])
        text = (current or "").strip().rstrip(",")
        present = {t.split(":")[0].split("=")[0].strip() for t in text.replace(";", ",").split(",") if t.strip()}
        if str(j) in present:
            return no_update
        return f"{text}, {j}" if text else str(j)

    @app.callback(
        Output("edit-results", "children", allow_duplicate=True),
        *[Output(f"edit-{e}-error", "children", allow_duplicate=True) for e in ERRORS],
        Input("edit-go", "n_clicks"),
        Input("edit-features", "n_submit"),
        Input("edit-factor", "n_submit"),
        State("edit-source", "data"),
        State("edit-set", "value"),
        State("edit-features", "value"),
        State("edit-factor", "value"),
        State("edit-keep-error", "value"),
        prevent_initial_call=True,
        # Cancel, or another clip, stops a running edit (at its next stage: a thread cannot be killed)
        **background_args("edit-progress", (Output("edit-go", "disabled"), True, False),
                          (Output("edit-cancel", "style"), {}, HIDDEN),
                          (Output("edit-results-wrap", "className"), "busy", ""),
                          cancel=[Input("edit-cancel", "n_clicks"), Input("edit-source", "data")]),
    )
    def run_edit(set_progress, _go, _s1, _s2, source, set_id, features, factor, keep):
        errors = dict.fromkeys(ERRORS, "")

        def fail(key, message):
            errors[key] = message
            return no_update, *[errors[e] for e in ERRORS]

        audio, problem = source_audio(source)
        if audio is None:
            return fail("audio", problem)
        sets, message = access.status()
        info = next((s for s in sets if s["set_id"] == str(set_id) and s.get("kind") == "sae"), None)
        if message or info is None:
            return fail("set", message or f"Choose an SAE feature set (not {set_id!r}).")
        try:
            default = parse_factor(factor if str(factor or "").strip() else "0")
        except EditError as exc:
            return fail("factor", str(exc)[:1].upper() + str(exc)[1:] + ".")
        try:
            edits = parse_edits(features, default, int(info["n_features"]))
        except EditError as exc:
            return fail("features", str(exc)[:1].upper() + str(exc)[1:] + ".")
        try:
            result = edit_clip(audio, str(set_id), edits, keep_error="keep" in (keep or []), index=access.index,
                               progress=set_progress)
        except EditError as exc:
            return fail("features", str(exc))
        except Exception as exc:  # noqa: BLE001 - say what failed, next to the results
            log.exception("edit_clip failed")
            return notice(f"The edit could not be made: {exc}", "error", id="edit-failed"), *[errors[e] for e in ERRORS]
        set_progress("Drawing the results…")
        return results_view(result, access, audio, source), *[errors[e] for e in ERRORS]

    @app.callback(
        *[Output(f"edit-{e}-error", "children", allow_duplicate=True) for e in ERRORS],
        Input("edit-features", "value"),
        Input("edit-factor", "value"),
        Input("edit-set", "value"),
        Input("edit-keep-error", "value"),
        Input("edit-clip-id", "value"),
        prevent_initial_call=True,
    )
    def clear_errors(*_):
        """Any change of the controls clears the messages of the previous action."""
        return [""] * len(ERRORS)

    forward_on_load(app, "edit-clip-initial", "edit-clip-request")  # the clip named in the URL, to `load_source`

    @app.callback(
        Output("edit-clip-request", "data"),
        Output("edit-clip-id", "value"),
        Input("url", "search"),
        State("url", "pathname"),
        State("edit-clip-request", "data"),
        prevent_initial_call=True,
    )
    def clip_from_url(search, pathname, current):
        """A link to /edit?clip=... while on /edit (same path: the page is not rebuilt) loads that clip."""
        if (pathname or "").rstrip("/") != PATH:
            return no_update, no_update
        params = _params(search)
        clip_id, token = params.get("clip"), params.get("upload")
        wanted = {"clip_id": clip_id} if clip_id else {"token": token} if token else None
        if not wanted or wanted == current:
            return no_update, no_update
        return wanted, clip_id or no_update

    app.clientside_callback(
        'function(n) { return window.freud.record(n, "edit-record-data", "Recording… press Stop to use it."); }',
        Output("edit-record-button", "children"),
        Output("edit-record-status", "children"),
        Input("edit-record-button", "n_clicks"),
        prevent_initial_call=True,
    )


__all__ = ["PATH", "layout", "register"]
