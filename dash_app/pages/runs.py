"""SAE runs: /runs lists MLflow experiment "freud-sae" (sortable table); ticking two runs compares them side by side;
the recorded seed-stability studies (share of features matched across seeds against chance) are shown below.

The runs come from `freud_pipeline.features.runs` (MlflowClient; the first visit imports MLflow, a few seconds).
Each run links to the MLflow UI (env FREUD_MLFLOW_URL, default http://127.0.0.1:5000) and to the feature sets
built from it in the search page (feature_sets.sae_run_id).
"""

from __future__ import annotations

import logging

from dash import Input, Output, dash_table, dcc, html

from dash_app.components import fmt, notice
from dash_app.figures import clip_graph_style, tradeoff_figure
from dash_app.data import IndexAccess, SearchState

log = logging.getLogger(__name__)

PATH = "/runs"
DIFF_STYLE = {"background": "#fff3e0", "fontWeight": 600}
HEADLINE_NAMES = {"fvu": "FVU (final eval)", "l0": "L0 (final eval)", "dead_pct": "dead % (final eval)",
                  "ce_recovered": "CE recovered", "wer": "WER (SAE spliced)",
                  "delta_wer": "ΔWER (spliced − original)"}
CELL = {"padding": "3px 12px 3px 0", "verticalAlign": "top", "textAlign": "left"}


def set_href(set_id: str) -> str:
    return "/search" + SearchState(set_id=str(set_id)).to_search()


def layout(access: IndexAccess, mlflow_uri_of) -> html.Div:
    from freud_pipeline.features.runs import mlflow_ui_url

    return html.Div(
        [
            html.H2("SAE runs"),
            html.Div(
                [
                    html.Span("MLflow experiment ", className="muted"), html.Strong("freud-sae"),
                    html.Span(f" · store {mlflow_uri_of()}", className="muted"), " · ",
                    html.A("open the MLflow UI ↗", href=mlflow_ui_url(), target="_blank", rel="noopener",
                           id="runs-mlflow-link"),
                ],
                className="card-line",
            ),
            html.Div("Click a column header to sort; tick two runs to compare them.", className="hint"),
            dcc.Loading(
                html.Div(
                    [
                        html.Div(id="runs-notice"),
                        dash_table.DataTable(
                            id="runs-table",
                            columns=_columns(),
                            data=[],
                            sort_action="native",
                            sort_mode="single",
                            row_selectable="multi",
                            selected_rows=[],
                            page_action="native",
                            page_size=25,
                            markdown_options={"html": True, "link_target": "_self"},
                            style_table={"overflowX": "auto"},
                            style_cell={"fontFamily": "system-ui, sans-serif", "fontSize": "12.5px",
                                        "padding": "4px 6px", "textAlign": "left", "whiteSpace": "nowrap"},
                            style_cell_conditional=[
                                {"if": {"column_id": "sets"}, "whiteSpace": "normal", "minWidth": "150px",
                                 "maxWidth": "190px", "wordBreak": "break-all"},
                                {"if": {"column_id": "run_name"}, "whiteSpace": "normal", "maxWidth": "160px"},
                                {"if": {"column_id": "hook"}, "whiteSpace": "normal", "maxWidth": "120px",
                                 "wordBreak": "break-all"},
                                {"if": {"column_id": "start_time"}, "whiteSpace": "normal", "maxWidth": "96px"},
                            ],
                            style_header={"fontWeight": 600, "background": "#eef0f6", "whiteSpace": "normal"},
                            style_data_conditional=[
                                {"if": {"state": "selected"}, "background": "#e8eaf6", "border": "1px solid #c5cae9"},
                            ],
                            css=[{"selector": ".dash-cell-value p", "rule": "margin: 0;"}],
                        ),
                    ],
                    id="runs-body",
                    className="card",
                ),
                type="default",
                delay_show=150,
            ),
            html.Div(
                [html.H3("Sparsity trade-off", className="card-title"),
                 html.Div("Each point is a run: fewer active latents (L0) against reconstruction error (FVU) and "
                          "against what splicing the SAE into Whisper costs the transcript (ΔWER, with its 95% "
                          "bootstrap interval over the held-out clips).", className="hint"),
                 dcc.Graph(id="runs-tradeoff", figure=tradeoff_figure([]), config={"displaylogo": False},
                           style=clip_graph_style(320))],
                className="card", style={"marginTop": "12px"}),
            html.Div(
                [html.H3("Seed stability", className="card-title"),
                 html.Div("The SAE recipe trained with different seeds: the share of one run's features whose "
                          "one-to-one counterpart in the other run (decoder cosine, optimal assignment) reaches each "
                          "cosine threshold, against the same share for two random dictionaries of the same shapes "
                          "(chance).", className="hint"),
                 html.Div(id="runs-stability")],
                className="card", style={"marginTop": "12px"}),
            html.Div(id="runs-compare", className="card", style={"marginTop": "12px"}),
        ],
        id="runs-page",
    )


def _columns() -> list[dict]:
    from dash.dash_table.Format import Format, Scheme

    number = Format(precision=4, scheme=Scheme.decimal_or_exponent).nully("–")
    pct = Format(precision=3, scheme=Scheme.decimal_or_exponent).nully("–")
    cols = [
        {"id": "run_name", "name": "run"},
        {"id": "start_time", "name": "started (UTC)"},
        {"id": "architecture", "name": "arch"},
        {"id": "hook", "name": "hook"},
        {"id": "k", "name": "k", "type": "numeric"},
        {"id": "n_latents", "name": "latents", "type": "numeric"},
        {"id": "fvu", "name": "FVU", "type": "numeric", "format": number},
        {"id": "l0", "name": "L0", "type": "numeric", "format": number},
        {"id": "dead_pct", "name": "dead %", "type": "numeric", "format": pct},
        {"id": "ce_recovered", "name": "CE recovered", "type": "numeric", "format": number},
        {"id": "wer", "name": "WER", "type": "numeric", "format": number},
        {"id": "delta_wer", "name": "ΔWER", "type": "numeric", "format": number},
        {"id": "delta_wer_ci", "name": "ΔWER 95% CI"},
        {"id": "sets", "name": "feature set", "presentation": "markdown"},
        {"id": "mlflow", "name": "MLflow", "presentation": "markdown"},
        {"id": "status", "name": "status"},
    ]
    return cols


def _trained_runs(runs: list[dict]) -> list[dict]:
    """The runs that trained an SAE: the parent runs of a seed-stability study (its metrics are in the stability
    card) and of a one-pass multi-hook training (its SAEs are its child runs, listed) are left out."""
    from freud_pipeline.features.matches import STUDY_KIND, STUDY_KIND_TAG
    from freud_pipeline.sae.multi import KIND as MULTI_KIND, KIND_TAG as MULTI_KIND_TAG

    parents = {(STUDY_KIND_TAG, STUDY_KIND), (MULTI_KIND_TAG, MULTI_KIND)}
    return [r for r in runs if not any((r.get("tags") or {}).get(tag) == kind for tag, kind in parents)]


def _int(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def table_rows(runs: list[dict], sets_by_run: dict[str, list[dict]]) -> list[dict]:
    from freud_pipeline.features.runs import run_url

    rows = []
    for run in runs:
        sets = sets_by_run.get(run["run_id"], [])
        links = " ".join(f'<a href="{_escape(set_href(s["set_id"]))}" class="run-set-link">{_escape(s["set_id"])}</a>'
                         for s in sets) or "–"
        rows.append({
            "id": run["run_id"],
            "run_name": run["run_name"],
            "short_id": run["run_id"][:8],
            "start_time": (run["start_time"] or "")[:16],
            "status": run["status"],
            "architecture": run.get("architecture"),
            "hook": run.get("hook"),
            "k": _int(run.get("k")),
            "n_latents": _int(run.get("n_latents")),
            "steps": _int(run.get("steps")),
            "fvu": run.get("fvu"),
            "l0": run.get("l0"),
            "dead_pct": run.get("dead_pct"),
            "ce_recovered": run.get("ce_recovered"),
            "wer": run.get("wer"),
            "delta_wer": run.get("delta_wer"),
            "delta_wer_ci": (f"[{run['delta_wer_ci_low']:+.4f}, {run['delta_wer_ci_high']:+.4f}]"
                             if run.get("delta_wer_ci_low") is not None and run.get("delta_wer_ci_high") is not None
                             else "–"),
            "sets": links,
            "mlflow": f'<a href="{_escape(run_url(run))}" target="_blank" rel="noopener">open ↗</a>',
        })
    return rows


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _value(v) -> str:
    """Params exactly as logged (strings); metrics formatted."""
    if v is None:
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return fmt(int(v))
    return fmt(v)


def comparison(a: dict, b: dict, sets_by_run: dict[str, list[dict]]) -> html.Div:
    from freud_pipeline.features.runs import compare_runs, run_url

    cmp = compare_runs(a, b)

    def head(run):
        sets = sets_by_run.get(run["run_id"], [])
        return html.Th(
            [html.Div(run["run_name"]), html.Div(run["run_id"][:8], className="muted clip-id"),
             html.A("MLflow ↗", href=run_url(run), target="_blank", rel="noopener", className="download"),
             *[html.Div(dcc.Link(f"features: {s['set_id']}", href=set_href(s["set_id"]), className="download"))
               for s in sets]],
            style={**CELL, "minWidth": "220px"},
        )

    def rows(items, highlight: bool):
        out = []
        for r in items:
            style = {**CELL, **(DIFF_STYLE if highlight and r["differs"] else {})}
            out.append(html.Tr([html.Td(r["name"], style={**style, "color": "#374151"}),
                                html.Td(_value(r["a"]), style=style), html.Td(_value(r["b"]), style=style)],
                               className="differs" if r["differs"] else "same"))
        return out

    differing = [r for r in cmp["params"] if r["differs"]]
    same = [r for r in cmp["params"] if not r["differs"]]
    headline = [{**r, "name": HEADLINE_NAMES.get(r["name"], r["name"])} for r in cmp["metrics"] if r["headline"]]
    other_metrics = [r for r in cmp["metrics"] if not r["headline"]]
    header = html.Thead(html.Tr([html.Th("", style=CELL), head(a), head(b)]))
    return html.Div(
        [
            html.H3("Comparison", className="card-title"),
            html.Div([html.Span("differing params: ", className="muted"),
                      html.Strong(", ".join(cmp["differing"]) or "none")], id="runs-differing", className="card-line"),
            html.Table([header, html.Tbody(
                [html.Tr(html.Th("params that differ", colSpan=3, style={**CELL, "paddingTop": "8px"}))]
                + rows(differing, True)
                + [html.Tr(html.Th("metrics", colSpan=3, style={**CELL, "paddingTop": "8px"}))]
                + rows(headline, False))],
                className="stats-table", id="runs-compare-table"),
            html.Details([html.Summary(f"all {len(other_metrics)} logged metrics (latest values; eval/ = final "
                                       "evaluation)"),
                          html.Table(html.Tbody(rows(other_metrics, False)), className="stats-table")],
                         style={"marginTop": "6px"}),
            html.Details([html.Summary(f"{len(same)} identical params"),
                          html.Table(html.Tbody(rows(same, False)), className="stats-table")],
                         style={"marginTop": "6px"}),
        ],
    )


def stability_view(rows: list[dict], studies: int = 5) -> html.Div:
    """The recorded seed-stability studies (features.matches.seed_stability rows, newest first), the latest
    `studies` of them: per pair of seeds, the share matched at each threshold and the chance level."""
    from freud_pipeline.features.runs import run_url

    if not rows:
        return html.Div(["No seed-stability study recorded yet: run ",
                         html.Code("freud collect --config configs/train/demo_seed_stability.yaml"),
                         " (it trains the SAE recipe with a second seed)."],
                        className="muted", id="runs-stability-empty")
    by_study: dict[str, list[dict]] = {}
    for row in rows:
        by_study.setdefault(row["study_id"], []).append(row)
    blocks = []
    for study_id, pairs in list(by_study.items())[:studies]:
        first = pairs[0]
        thresholds = first["thresholds"]
        head = html.Tr([html.Th(x, style=CELL) for x in ["seeds", "runs", *[f"cosine ≥ {t:g}" for t in thresholds],
                                                          "mean cosine"]])
        body = [html.Tr([
            html.Td(f"{p['seed_a']} vs {p['seed_b']}", style=CELL),
            html.Td(f"{p['run_a'][:8]} · {p['run_b'][:8]}", className="clip-id", style=CELL),
            *[html.Td([html.Strong(f"{c['share_matched']:.1%}", className="stability-share"),
                       html.Span(f" (chance {c['chance']:.1%})", className="muted stability-chance")], style=CELL)
              for c in p["curve"]],
            html.Td([html.Strong(fmt(p["mean_cosine"])),
                     html.Span(f" (chance {fmt(p['chance_mean_cosine'])})", className="muted")], style=CELL),
        ]) for p in pairs]
        when = first["created_at"].strftime("%Y-%m-%d %H:%M UTC") if first.get("created_at") else ""
        link = (html.A("MLflow ↗", href=run_url({"experiment_id": first["experiment_id"], "run_id": study_id}),
                       target="_blank", rel="noopener", className="download") if first.get("experiment_id") else "")
        blocks.append(html.Div([
            html.Div([html.Strong(f"{first['model']} · {first['hook']} · {first['architecture']}"),
                      html.Span(f", {first['n_latents']:,} latents, {first['steps']:,} steps · {when} · ",
                                className="muted"), link], className="card-line"),
            html.Table([html.Thead(head), html.Tbody(body)], className="stats-table stability-table"),
        ], className="stability-study"))
    return html.Div(blocks, id="runs-stability-studies")


def register(app, access: IndexAccess, mlflow_uri_of) -> None:
    from freud_pipeline.features import runs as runs_lib

    def sets_by_run() -> dict[str, list[dict]]:
        sets, _ = access.status()
        return runs_lib.feature_sets_by_run(sets)

    @app.callback(
        Output("runs-table", "data"),
        Output("runs-notice", "children"),
        Output("runs-tradeoff", "figure"),
        Input("runs-page", "id"),
    )
    def load(_page):
        uri = mlflow_uri_of()
        try:
            runs = _trained_runs(runs_lib.list_runs(uri))
        except runs_lib.RunsUnavailable as exc:
            return [], notice(str(exc), "error", id="runs-error"), tradeoff_figure([])
        if not runs:
            return [], notice(
                [html.Strong("No SAE runs yet. "),
                 f"Nothing is logged in MLflow experiment freud-sae of {uri}. Train an SAE (materialise the "
                 "topk_sae asset in Dagster, or run `make demo`), then reload this page."],
                "warning", id="runs-empty"), tradeoff_figure([])
        rows = table_rows(runs, sets_by_run())
        return rows, html.Div(f"{len(rows)} run{'s' if len(rows) != 1 else ''}, newest first", id="runs-count",
                              className="muted results-count"), tradeoff_figure(runs)

    @app.callback(Output("runs-stability", "children"), Input("runs-page", "id"))
    def stability(_page):
        try:
            return stability_view(access.seed_stability())
        except Exception as exc:  # noqa: BLE001 - no index yet, or an unreadable one: say so in the card
            log.exception("seed stability cannot be read")
            return notice(f"Seed stability cannot be read: {exc}", "warning", id="runs-stability-error")

    @app.callback(
        Output("runs-compare", "children"),
        Input("runs-table", "selected_row_ids"),
    )
    def compare(selected):
        selected = list(selected or [])
        if len(selected) != 2:
            text = ("Tick two runs in the table to compare their params and metrics side by side."
                    if len(selected) < 2 else f"Select exactly two runs to compare; {len(selected)} are ticked.")
            return html.Div(text, className="muted", id="runs-compare-hint")
        uri = mlflow_uri_of()
        try:
            runs = {r["run_id"]: r for r in runs_lib.list_runs(uri)}
        except runs_lib.RunsUnavailable as exc:
            return notice(str(exc), "error")
        missing = [r for r in selected if r not in runs]
        if missing:
            return notice(f"Run {missing[0][:8]} is no longer in MLflow; reload the page.", "warning")
        return comparison(runs[selected[0]], runs[selected[1]], sets_by_run())


__all__ = ["PATH", "comparison", "layout", "register", "stability_view", "table_rows"]
