"""Feature search: /search?set=...&index=...&n=20&min=&max=&abs=0 (the URL holds the whole state)."""

from __future__ import annotations

import logging
import random

import numpy as np
import orjson

from dash import Input, Output, State, ctx, dcc, html, no_update

from dash_app.components import (
    audio_player,
    download_link,
    empty_index_notice,
    feature_card,
    field_error,
    fmt,
    no_sae_notice,
    notice,
    plain_json,
    provenance_line,
    transcript_view,
)
from dash_app.data import (
    DEFAULT_RESULTS,
    search_href,
    MAX_RESULTS,
    ClipNotFound,
    IndexAccess,
    IndexUnavailable,
    SearchState,
    audio_url,
    edit_href,
    feature_effects,
    features_by_effect,
    spectrogram_url,
    set_label,
    set_options,
    validate_search,
)
from dash_app import wire
from dash_app.figures import clip_figure_dict, clip_graph_style, display_rounded, histogram_figure
from dash_app.pages.upload import clip_href
from freud_pipeline.features.coverage import describe as describe_coverage
from freud_pipeline.frames import FRAME_SECONDS

log = logging.getLogger(__name__)

PATH = "/search"


def is_search_path(pathname: str | None) -> bool:
    return ((pathname or "/").rstrip("/") or "/") in ("/", PATH)
CONTROLS = ("set", "index", "n", "min", "max", "abs")


def _narrow_control(id_: str, label: str, input_mode: str, value: str, **input_props) -> html.Div:
    """A labelled one-line text input with its error line (`<id>-error`)."""
    return html.Div(
        [
            html.Label(label, htmlFor=id_),
            dcc.Input(id=id_, type="text", inputMode=input_mode, value=value, autoComplete="off", **input_props),
            field_error(f"{id_}-error"),
        ],
        className="control control-narrow",
    )


def label_quality_line(set_info: dict) -> str:
    """How far the set's automatic labels can be trusted: the share validated on held-out speech against chance."""
    summary = set_info.get("label_summary") or {}
    share, chance = summary.get("share_validated"), summary.get("share_validated_chance")
    if share is None:
        return "No phone labels (no alignments for this set's clips)."
    text = f"Labels: {share:.1%} of features carry a label validated on held-out speech"
    return text + (f" (chance, labels shuffled: {chance:.1%})." if chance is not None else ".")


def coverage_line(set_info: dict) -> str:
    """What the set covers (datasets, partitions, clips, hours) and when it last grew."""
    coverage = set_info.get("coverage")
    text = "Covers " + describe_coverage(coverage)
    return text + (f"; updated {coverage['updated_at']}." if coverage and coverage.get("updated_at") else ".")


def layout(access: IndexAccess, search: str | None) -> html.Div:
    sets, message = access.status()
    if message:
        return html.Div([html.H2("Feature search"), empty_index_notice(message)], id="search-page-empty")
    state = SearchState.from_search(search)
    checked = validate_search(state, sets)
    chosen = checked.set_info or sets[0]
    notes = [] if any(s.get("kind") == "sae" for s in sets) else [no_sae_notice()]
    controls = html.Div(
        [
            html.Div(
                [
                    html.Label("Feature set", htmlFor="search-set"),
                    dcc.Dropdown(id="search-set", options=set_options(sets), value=str(chosen["set_id"]),
                                 clearable=False, className="set-dropdown"),
                    html.Div(label_quality_line(chosen), id="search-set-labels", className="hint"),
                    html.Div(coverage_line(chosen), id="search-set-coverage", className="hint"),
                    field_error("search-set-error"),
                ],
                className="control control-wide",
            ),
            html.Div(
                [
                    html.Label("Feature index", htmlFor="search-index"),
                    dcc.Input(id="search-index", type="text", inputMode="numeric", value=state.index or "",
                              placeholder=f"0 to {int(chosen['n_features']) - 1}", debounce=False, autoComplete="off"),
                    field_error("search-index-error"),
                ],
                className="control control-index",
            ),
            _narrow_control("search-n", "Max results", "numeric", state.n or str(DEFAULT_RESULTS)),
            _narrow_control("search-min", "Min activation", "decimal", state.min or "", placeholder="none"),
            _narrow_control("search-max", "Max activation", "decimal", state.max or "", placeholder="none"),
            html.Div(className="controls-break"),
            html.Div(
                [
                    dcc.Checklist(id="search-abs",
                                  options=[{"label": " Use absolute value", "value": "abs"},
                                           {"label": " Most negative clips", "value": "neg"}],
                                  value=(["abs"] if state.absolute else []) + (["neg"] if state.negative else []),
                                  className="abs-check", inline=True),
                    html.Div("Filters and ranking use each clip's peak (of |a| with absolute value; its minimum "
                             "for most negative).", className="hint"),
                    field_error("search-abs-error"),
                ],
                className="control control-auto",
            ),
            html.Div(
                [
                    html.Button("Search", id="search-go", n_clicks=0, className="primary"),
                    html.Button("Random feature", id="search-random", n_clicks=0, className="secondary"),
                ],
                className="control control-buttons",
            ),
        ],
        className="controls",
    )
    by_label = html.Details(
        [
            html.Summary("Find features by label (e.g. a phone: sh, m, aa)"),
            html.Div(
                [
                    dcc.Input(id="label-query", type="text", placeholder="label", debounce=False, autoComplete="off"),
                    html.Button("Find", id="label-go", n_clicks=0, className="secondary"),
                    html.Div(id="label-results", className="label-results"),
                ],
                className="label-row",
            ),
        ],
        className="by-label",
    )
    return html.Div(
        [
            html.H2("Feature search"),
            *notes,
            controls,
            by_label,
            dcc.Loading(
                html.Div(
                    [html.Div(id="search-summary"), html.Div(id="search-results")],
                    id="search-output",
                ),
                type="default",
                delay_show=150,
            ),
        ],
        id="search-page",
    )


def _result_item(access: IndexAccess, i: int, ex: dict, shade_scale: float | None,
                 value_range: tuple[float, float] | None, set_id: str, value_name: str = "peak",
                 edit_feature: int | None = None) -> dict:
    """One result card (wire-format elements: a page has 20 of them); `edit_feature` (SAE sets) adds a link
    that ablates the feature in this clip on /edit."""
    clip_id = str(ex["clip_id"])
    graph_id, readout_id = f"clip-graph-{i}", f"clip-readout-{i}"
    trace = np.asarray(ex["trace"] if ex.get("trace") is not None else [], dtype=np.float32)
    peak_value = ex.get("value")
    peak_time = ex.get("peak_time_s")
    lo = float(trace.min()) + 0.0 if trace.size else None  # + 0.0: a rounded -0.0 reads "0", not "-0"
    hi = float(trace.max()) + 0.0 if trace.size else None
    header = wire.html(
        "Div",
        [
            wire.html("Span", f"#{ex.get('rank', i + 1)}", className="rank"),
            wire.html("Span", clip_id, className="clip-id"),
            wire.html("Span", [f"{value_name} ",
                               wire.html("Strong", fmt(float(peak_value)) if peak_value is not None else "–"),
                               f" at {float(peak_time):.2f} s" if peak_time is not None else ""], className="peak"),
            wire.html("Span", f"trace max {fmt(float(hi))} · min {fmt(float(lo))}" if hi is not None else "",
                      className="muted"),
        ],
        className="result-header",
    )
    words, provenance = None, None
    try:
        row = access.clip_row(clip_id)
        provenance = provenance_line(row)
        spectrogram = access.clip_spectrogram(clip_id)
        words = row.get("words") if isinstance(row.get("words"), list) else None
        # frames, for long clips whose stored trace is a window around the peak
        offset = int(ex.get("trace_offset_frame", ex.get("trace_offset")) or 0)
        # the marker sits on the signed trace value at the peak (for |a| searches too)
        figure = clip_figure_dict(spectrogram, trace, peak_time_s=peak_time,
                                  peak_value=_signed_at(trace, peak_time, peak_value, offset),
                                  shade_scale=shade_scale, trace_offset_frames=offset, value_range=value_range,
                                  image_url=spectrogram_url(clip_id, spectrogram.version), rounded=True)
        graph = wire.dcc("Graph", id=graph_id, figure=figure, config={"displayModeBar": False, "responsive": True},
                         className="clip-graph", style=clip_graph_style(figure["layout"]["height"]))
        links = [wire.dcc("Link", "top features of this clip →", href=clip_href(clip_id, set_id), className="download")]
        if edit_feature is not None:
            links.append(wire.dcc("Link", "ablate it here (edit) →", className="download edit-link",
                                  href=edit_href(clip_id, set_id, f"{edit_feature}:0")))
        player = wire.html(
            "Div",
            [audio_player(audio_url(clip_id), graph_id, readout_id), wire.html("Span", id=readout_id, className="readout"),
             download_link(clip_id), *links],
            className="player-row",
        )
    except ClipNotFound:
        graph = wire.html("Div", f"The audio of clip {clip_id} is not available (its file is missing).",
                          className="notice notice-warning")
        player = wire.html("Div")
    except Exception as exc:  # noqa: BLE001 - one broken clip must not hide the others
        log.exception("cannot show clip %s", clip_id)
        graph = wire.html("Div", f"Clip {clip_id} cannot be shown: {exc}", className="notice notice-error")
        player = wire.html("Div")
    parts = [header, transcript_view(ex.get("transcript"), words, peak_time), graph, player]
    if provenance:
        parts.insert(1, wire.html("Div", provenance, className="hint provenance"))
    return wire.html("Div", parts, className="result card", id=f"result-{i}")



def _counterparts(access: IndexAccess, set_info: dict, index: int) -> list[dict]:
    """The feature's closest counterparts in the other SAE sets ([] for neuron sets, or when they cannot be read:
    they are a bonus, like similar features)."""
    if set_info.get("kind") != "sae":
        return []
    try:
        return access.counterparts(str(set_info["set_id"]), index)
    except Exception:  # noqa: BLE001
        log.exception("counterparts failed")
        return []


def with_counterparts(card: dict, counterparts: list[dict], sae: bool) -> dict:
    """The feature card (wire format) with a line "closest counterparts in other SAEs": per other set, chips
    linking to its closest features (decoder cosine). SAE sets only."""
    if not sae:
        return card
    h = wire.html
    groups: dict[str, list[dict]] = {}
    for item in counterparts:
        groups.setdefault(item["set_id"], []).append(item)
    lines = [h("Div", [h("Span", f"{other}: ", className="muted counterpart-set"),
                       *[wire.dcc("Link", f"{c['index']} ({c['cosine']:.2f})", href=search_href(other, c["index"]),
                                  className="chip counterpart", title=f"{other}, feature {c['index']}")
                         for c in items]], className="counterpart-group")
             for other, items in groups.items()]
    block = h("Div", [h("Span", "closest counterparts in other SAEs: ", className="muted"),
                      *(lines or [h("Span", "none yet (they need another indexed SAE set of this model and "
                                    "width, linked by the sae_counterparts asset)", className="muted")])],
              className="card-line similar", id="feature-counterparts")
    card["props"]["children"] = [*card["props"]["children"], block]
    return card


def typical_block(typical: list[dict], set_id: str, top_value: float | None) -> dict:
    """Examples across the activation range (wire format): per octave of the clip's peak, the clips drawn there,
    each linking to its analysis; says so when the set has none (built before levels were sampled)."""
    h = wire.html
    if not typical:
        body = [h("Span", "none stored for this feature (no clip fired, or the set was built before examples across "
                          "levels were sampled: rebuild it)", className="muted")]
    else:
        body = []
        for example in typical:
            share = f" · {example['value'] / top_value:.0%} of the top" if top_value else ""
            text = (example.get("transcript") or "")[:80]
            body.append(h("Div", [
                h("Span", f"{_level_name(example)}", className="chip level"),
                wire.dcc("Link", example["clip_id"], href=clip_href(example["clip_id"], set_id), className="clip-id"),
                h("Span", f" {fmt(example['value'])} at {example['peak_time_s']:.2f} s{share}", className="muted"),
                h("Span", f" “{text}”" if text else "", className="transcript"),
            ], className="typical-example"))
    return h("Div", [h("H4", "Typical examples across activation levels"),
                     h("Div", "Clips drawn at random from each band of peak activation (octaves), not only the strongest: "
                              "does the label hold below the top?", className="muted"), *body],
             className="card typical-card", id="typical-examples")


def effect_block(summary: dict | None, effect: dict | None, ranked: list[dict], set_id: str, index: int) -> dict:
    """What ablating SAE features does to the transcript (wire format): this feature's stored ΔCE with its interval
    and ΔWER, beside the chance level of random directions, and the set's features ranked by ΔCE as links."""
    h = wire.html
    if summary is None:
        return h("Div", [h("H4", "Effect on the transcript"),
                         h("Span", "not computed for this set (the sae_feature_effects asset measures it)",
                           className="muted")], className="card effect-card", id="feature-effect")
    chance = summary.get("chance_abs_p95")
    chance_text = f"chance: random directions of the same norm, 95% of |ΔCE| below {fmt(chance)}" if chance else ""
    if effect is None:
        line = h("Span", f"feature {index} not measured (the computation covered {summary.get('n_features')} "
                         "features)", className="muted")
    else:
        above = chance is not None and effect["delta_ce"] is not None and abs(effect["delta_ce"]) > chance
        wer = (f" · ΔWER {effect['delta_wer'] * 100:+.1f} points on {effect['wer_clips']} clips"
               if effect.get("delta_wer") is not None else "")
        line = h("Span", [h("Strong", f"ΔCE {effect['delta_ce']:+.4f} nats/token"),
                          f" [{fmt(effect['ci_low'])}, {fmt(effect['ci_high'])}] on {effect['n_clips']} top clips{wer}"
                          f" · {'above' if above else 'within'} chance"], id="feature-effect-value")
    rows = [h("Li", [wire.dcc("Link", f"feature {r['feature']}", href=search_href(set_id, r["feature"])),
                     h("Span", f" ΔCE {r['delta_ce']:+.4f}" + (" ★" if chance and abs(r["delta_ce"]) > chance else ""),
                       className="muted")]) for r in ranked]
    ranking = h("Details", [h("Summary", f"Features that matter most for the transcript ({len(ranked)} by ΔCE "
                                         "when ablated; ★ above chance)"), h("Ol", rows, className="effect-ranking")],
                className="by-effect", id="features-by-effect")
    return h("Div", [h("H4", "Effect on the transcript (this feature ablated alone)"), line,
                     h("Div", chance_text, className="muted"), ranking], className="card effect-card",
             id="feature-effect")


def _level_name(example: dict) -> str:
    low, high = example["low"], example["high"]
    return f"< {fmt(high)}" if low == 0 else f"{fmt(low)}–{fmt(high)}"


def _signed_at(trace, peak_time, fallback, offset: int = 0):
    """The trace value at the peak time (the marker sits on the line even for |a| searches)."""
    if peak_time is None or not len(trace):
        return fallback
    j = min(len(trace) - 1, max(0, int(float(peak_time) / FRAME_SECONDS) - offset))
    return float(trace[j])


def render(access: IndexAccess, search: str | None):
    """(summary, results, errors dict) for a URL search string."""
    try:
        sets, message = access.status()
    except IndexUnavailable as exc:
        return empty_index_notice(str(exc)), None, {}
    if message:
        return empty_index_notice(message), None, {}
    state = SearchState.from_search(search)
    checked = validate_search(state, sets)
    if checked.errors or checked.set_info is None:
        return None, None, checked.errors
    set_id = str(checked.set_info["set_id"])
    label = set_label(checked.set_info)
    if checked.index is None:
        return notice(f"Enter a feature index from 0 to {int(checked.set_info['n_features']) - 1} and press Search "
                      "(or Enter), or try a random feature.", "info", id="search-hint"), None, {}
    index = checked.index
    index_api = access.index
    try:
        feature = dict(index_api.feature(set_id, index, histogram=True) or {})
        hist = feature.pop("histogram", None) or {}
        try:
            similar = index_api.similar_features(set_id, index, n=10) or []
        except Exception:  # noqa: BLE001 - similar features are a bonus
            log.exception("similar_features failed")
            similar = []
        counterparts = _counterparts(access, checked.set_info, index)
        effect_summary, effect, ranked = None, None, []
        if checked.set_info.get("kind") == "sae":
            effect_summary, effects_of = feature_effects(access, set_id, [index])
            effect = effects_of.get(index)
            ranked = features_by_effect(access, set_id, limit=25) if effect_summary else []
        try:
            typical = index_api.typical_examples(set_id, index)
        except Exception:  # noqa: BLE001 - a bonus, like similar features
            log.exception("typical_examples failed")
            typical = []
        extra = {"negative": True} if checked.negative else {}
        examples = index_api.top_examples(set_id, index, n=checked.n, min_value=checked.min_value,
                                          max_value=checked.max_value, absolute=checked.absolute, **extra)
    except KeyError as exc:  # FeatureSetError is a KeyError
        return None, None, {"set": str(exc) if str(exc) else f"Unknown feature set {set_id!r}."}
    except IndexError as exc:  # FeatureIndexError
        return None, None, {"index": str(exc)}

    summary = html.Div(
        [
            with_counterparts(feature_card(dict(feature), set_id=set_id, index=index, set_label=label,
                                           similar=similar), counterparts, checked.set_info.get("kind") == "sae"),
            html.Div(
                dcc.Graph(id="search-histogram",
                          figure=histogram_figure(hist, index=index, min_value=checked.min_value,
                                                  max_value=checked.max_value),
                          config={"displayModeBar": False}),
                className="card histogram-card",
            ),
        ],
        className="summary-row",
    )
    filters = []
    if checked.min_value is not None:
        filters.append(f"value ≥ {checked.min_value:g}")
    if checked.max_value is not None:
        filters.append(f"value ≤ {checked.max_value:g}")
    ranking = ("peak |activation|" if checked.absolute else
               "most negative activation" if checked.negative else "peak activation")
    if not examples:
        results = notice("No clip matches: " + (", ".join(filters) if filters else "the index has no examples")
                         + ". Widen the min/max range.", "info", id="search-no-results")
        return summary, results, {}
    count = wire.html(
        "Div",
        f"{len(examples)} clip{'s' if len(examples) != 1 else ''} ranked by {ranking}"
        + (f" ({', '.join(filters)})" if filters else "")
        + (f"; fewer than the {checked.n} asked for match among the stored top examples"
           if len(examples) < checked.n else ""),
        className="muted results-count", id="results-count",
    )
    # One shading scale and one activation axis for the page (from all traces shown), so clips compare at a glance.
    # (numpy on all of the page's traces at once: per-trace calls cost more than their arithmetic)
    lengths = [len(ex.get("trace") or []) for ex in examples]
    flat = np.fromiter((v for ex in examples for v in (ex.get("trace") or [])), dtype=np.float32, count=sum(lengths))
    lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
    scale = max(abs(lo), abs(hi)) or None
    traces = np.split(display_rounded(flat, scale or 1.0), np.cumsum(lengths)[:-1])
    for ex, trace in zip(examples, traces):
        ex["trace"] = trace
    value_name = "|peak|" if checked.absolute else "min" if checked.negative else "peak"
    editable = index if checked.set_info.get("kind") == "sae" else None
    items = [_result_item(access, i, dict(ex), scale, (lo, hi), set_id, value_name, editable)
             for i, ex in enumerate(examples)]
    typical_card = typical_block(typical, set_id, (feature.get("stats") or {}).get("max"))
    effect_card = ([effect_block(effect_summary, effect, ranked, set_id, index)]
                   if checked.set_info.get("kind") == "sae" else [])
    # the results are wire-format elements throughout (20 of them: see dash_app.wire)
    return summary, wire.html("Div", [*effect_card, count, *items, typical_card], className="results"), {}


def render_cached(access: IndexAccess, search: str | None):
    """`render`, cached per (URL state, index builds): a feature's page only changes when the index is rebuilt.
    Pages with errors or without an index are not cached (they are cheap, and their cause may go away)."""
    sets, message = access.status()
    if message:
        return render(access, search)
    key = ("search", SearchState.from_search(search).to_search(), access.builds(sets), access.matches_version(),
           access.effects_version())
    hit = access.cached_page(key)
    if hit is not None:
        return orjson.loads(hit)
    summary, items, errors = render(access, search)
    # as plain JSON-ready data: Dash then serialises it in one orjson call instead of walking the components
    result = (plain_json(summary), items if isinstance(items, dict) else plain_json(items), errors)
    if not errors:
        # kept as JSON bytes: a page is thousands of dicts and lists, and a hundred pages of them held as objects
        # made every full garbage collection of the worker walk them (measured: a quarter of a search's CPU)
        access.cache_page(key, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))
    return result


def label_matches(access: IndexAccess, set_id: str, label: str):
    """Links to the features of a set whose label matches (FeatureIndex.features_by_label)."""
    label = (label or "").strip()
    if not label:
        return html.Span("Type a label first.", className="field-error")
    try:
        found = list(access.index.features_by_label(str(set_id), label) or [])
    except KeyError as exc:
        return html.Span(str(exc), className="field-error")
    except Exception as exc:  # noqa: BLE001
        log.exception("features_by_label failed")
        return html.Span(f"Label search failed: {exc}", className="field-error")
    if not found:
        return html.Span(f"No feature of this set is labelled {label!r}.", className="muted")
    chips = []
    for item in found[:200]:
        if isinstance(item, dict):
            j = next((item[k] for k in ("index", "feature", "feature_index") if item.get(k) is not None), None)
            score = next((item[k] for k in ("label_f1", "word_precision", "score", "f1", "precision")
                          if item.get(k) is not None), None)
            name = item.get("label")
        else:
            j, score, name = item, None, None
        if j is None:
            continue
        text = f"{int(j)}" + (f" {name}" if name and name != label else "") + (f" ({float(score):.2f})" if score is not None else "")
        chips.append(dcc.Link(text, href=search_href(str(set_id), int(j)), className="chip"))
    return html.Div([html.Span(f"{len(found)} feature{'s' if len(found) != 1 else ''}: ", className="muted"), *chips])


def register(app, access: IndexAccess) -> None:
    @app.callback(
        Output("label-results", "children"),
        Input("label-go", "n_clicks"),
        Input("label-query", "n_submit"),
        State("label-query", "value"),
        State("search-set", "value"),
        prevent_initial_call=True,
    )
    def find_by_label(_clicks, _submit, label, set_id):
        return label_matches(access, set_id, label)

    error_outputs = [Output(f"search-{c}-error", "children", allow_duplicate=True) for c in CONTROLS]

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        *error_outputs,
        Input("search-go", "n_clicks"),
        Input("search-random", "n_clicks"),
        Input("search-index", "n_submit"),
        Input("search-n", "n_submit"),
        Input("search-min", "n_submit"),
        Input("search-max", "n_submit"),
        State("search-set", "value"),
        State("search-index", "value"),
        State("search-n", "value"),
        State("search-min", "value"),
        State("search-max", "value"),
        State("search-abs", "value"),
        prevent_initial_call=True,
    )
    def submit(_go, _random, _s1, _s2, _s3, _s4, set_id, index, n, min_v, max_v, absolute):
        sets, message = access.status()
        if message:
            return no_update, *([""] * len(CONTROLS))
        if ctx.triggered_id == "search-random":
            info = next((s for s in sets if str(s["set_id"]) == str(set_id)), None)
            if info is not None:
                index = str(random.randrange(int(info["n_features"])))
        state = SearchState(set_id=set_id, index=(str(index).strip() if index not in (None, "") else None),
                            n=(str(n).strip() or None) if n is not None else None,
                            min=(str(min_v).strip() or None) if min_v is not None else None,
                            max=(str(max_v).strip() or None) if max_v is not None else None,
                            absolute="abs" in (absolute or []), negative="neg" in (absolute or []))
        checked = validate_search(state, sets)
        if state.index is None and "index" not in checked.errors:
            checked.errors["index"] = "Enter a feature index."
        errors = [checked.errors.get(c, "") for c in CONTROLS]
        if checked.errors:
            return no_update, *errors
        return state.to_search(), *errors

    @app.callback(
        *[Output(f"search-{c}-error", "children", allow_duplicate=True) for c in CONTROLS],
        Input("search-set", "value"),
        Input("search-index", "value"),
        Input("search-n", "value"),
        Input("search-min", "value"),
        Input("search-max", "value"),
        Input("search-abs", "value"),
        prevent_initial_call=True,
    )
    def clear_errors(*_):
        """Any edit of the controls clears the messages of the previous action."""
        return [""] * len(CONTROLS)

    @app.callback(
        Output("search-index", "placeholder"),
        Input("search-set", "value"),
        prevent_initial_call=True,
    )
    def index_range(set_id):
        sets, _ = access.status()
        info = next((s for s in sets if str(s["set_id"]) == str(set_id)), None)
        return f"0 to {int(info['n_features']) - 1}" if info else ""

    @app.callback(
        Output("search-set", "value"),
        Output("search-index", "value"),
        Output("search-n", "value"),
        Output("search-min", "value"),
        Output("search-max", "value"),
        Output("search-abs", "value"),
        Input("url", "search"),
        State("url", "pathname"),
        State("search-set", "value"),
        prevent_initial_call=True,
    )
    def controls_from_url(search, pathname, current_set):
        """Back/forward and links (similar features) change the URL: show its state in the controls."""
        if not is_search_path(pathname):
            return (no_update,) * 6
        state = SearchState.from_search(search)
        return (
            state.set_id or current_set,
            state.index or "",
            state.n or str(DEFAULT_RESULTS),
            state.min or "",
            state.max or "",
            (["abs"] if state.absolute else []) + (["neg"] if state.negative else []),
        )

    @app.callback(
        Output("search-summary", "children"),
        Output("search-results", "children"),
        *[Output(f"search-{c}-error", "children", allow_duplicate=True) for c in CONTROLS],
        Input("url", "search"),
        Input("search-page", "id"),
        State("url", "pathname"),
        prevent_initial_call="initial_duplicate",
    )
    def results(search, _page, pathname):
        if not is_search_path(pathname):
            return (no_update,) * (2 + len(CONTROLS))
        summary, items, errors = render_cached(access, search)
        return summary, items, *[errors.get(c, "") for c in CONTROLS]


__all__ = ["PATH", "layout", "register", "render", "MAX_RESULTS"]
