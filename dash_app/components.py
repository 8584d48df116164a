"""Small layout pieces shared by the pages."""

from __future__ import annotations

import math
from typing import Any

from dash import html
from dash.development.base_component import Component

from dash_app import wire
from dash_app.data import EMPTY_INDEX_HINT, audio_url, search_href
from freud_pipeline.numeric import finite_float


def notice(text: Any, kind: str = "info", **kwargs) -> html.Div:
    return html.Div(text, className=f"notice notice-{kind}", **kwargs)


def empty_index_notice(message: str | None = None) -> html.Div:
    return notice(
        [html.Strong("No features to show. "), html.Span(message or EMPTY_INDEX_HINT)],
        "warning",
        id="empty-index-notice",
    )


def no_sae_notice() -> html.Div:
    return notice(
        "Only neuron sets (raw Whisper activations) are indexed: no sparse-autoencoder set yet. "
        "Train an SAE and index its latents to add one.",
        "info",
        id="no-sae-notice",
    )


def field_error(id_: str) -> html.Div:
    return html.Div(id=id_, className="field-error", role="alert")


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _scalars(d: dict, skip: set[str]) -> list[tuple[str, Any]]:
    out = []
    for key, value in d.items():
        if key in skip or value is None:
            continue
        if isinstance(value, (int, float, str, bool)):
            out.append((key, value))
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
            out.append((key, value.item()))
    return out


_CARD_SKIP = {"set_id", "index", "label", "labels", "label_score", "label_scores", "scores", "density", "stats",
              "trace", "histogram", "examples", "key", "build_id", "label_kind", "label_precision", "label_recall",
              "label_f1", "word_label", "word_precision", "quantiles", "quantile_levels", "hist_counts", "hist_edges",
              "kind", "label_reason", "label_lift", "label_p_value", "label_base_rate", "label_n_peaks",
              "label_heldout_precision", "label_heldout_n", "label_validated", "artefact"}




def feature_card(feature: dict, *, set_id: str, index: int, set_label: str, similar: list) -> dict:
    """Label and its scores, density, stats, similar features (links); a wire-format element (one per search)."""
    h = wire.html
    label = feature.get("label")
    score_bits = []
    for key, name in (("label_precision", "precision"), ("label_recall", "recall"), ("label_f1", "F1")):
        if finite_float(feature.get(key)) is not None:
            score_bits.append(f"{name} {finite_float(feature.get(key)):.2f}")
    if label:
        score_bits += _quality_bits(feature)
    for key in ("label_score", "label_scores", "scores"):
        value = feature.get(key)
        if isinstance(value, dict):
            score_bits += [f"{k} {fmt(v)}" for k, v in value.items() if isinstance(v, (int, float))]
        elif isinstance(value, (int, float)):
            score_bits.append(f"{key.replace('_', ' ')} {fmt(value)}")
    labels = feature.get("labels")
    stats = dict(feature.get("stats") or {}) if isinstance(feature.get("stats"), dict) else {}
    rows = [(k, v) for k, v in _scalars(feature, _CARD_SKIP) + _scalars(stats, set())
            if not (isinstance(v, float) and math.isnan(v))]
    quantiles = stats.get("quantiles", feature.get("quantiles"))
    if isinstance(quantiles, (list, tuple)):
        levels = feature.get("quantile_levels") or (0.5, 0.9, 0.99)
        quantiles = dict(zip(levels, quantiles)) if len(levels) == len(quantiles) else {}
    if isinstance(quantiles, dict):
        rows += [(f"frame quantile {float(q):g}", finite_float(v)) for q, v in quantiles.items() if finite_float(v) is not None]
    density = feature.get("density", stats.get("density"))
    label_line = [h("Span", "label: ", className="muted"),
                  h("Strong", str(label) if label else ("unlabelled" if feature.get("label_reason") else "none yet"),
                    id="feature-label"),
                  h("Span", f"  ({', '.join(score_bits)})" if score_bits else "", className="muted")]
    if feature.get("label_kind") and label:
        label_line.insert(1, h("Span", f"{feature['label_kind']} ", className="muted"))
    head = [
        h("H3", [f"Feature {index}", h("Span", f" · {set_label}", className="muted")], className="card-title"),
        h("Div", label_line, className="card-line"),
    ]
    if feature.get("label_reason"):  # the evidence for the label, or why there is none
        head.append(h("Div", [h("Span", "evidence: ", className="muted"), h("Span", str(feature["label_reason"]))],
                      className="card-line", id="feature-label-evidence"))
    word = feature.get("word_label")
    if word:
        precision = finite_float(feature.get("word_precision"))
        head.append(h("Div", [h("Span", "word: ", className="muted"), h("Strong", str(word)),
                              h("Span", f"  (precision {precision:.2f})" if precision is not None else "",
                                className="muted")], className="card-line"))
    if isinstance(labels, list) and labels:
        head.append(h("Div", [h("Span", "other labels: ", className="muted"),
                              ", ".join(_label_text(x) for x in labels[:8])], className="card-line"))
    if density is not None:
        head.append(h("Div", [h("Span", "density: ", className="muted"), h("Strong", _density_text(density))],
                      className="card-line"))
    table = h("Table", [h("Tbody", [h("Tr", [h("Th", k.replace("_", " ")), h("Td", fmt(v))])
                                    for k, v in rows if k != "density"])], className="stats-table")
    links = []
    for item in similar or []:
        j, sim, lab = _similar_item(item)
        if j is None:
            continue
        text = f"{j}" + (f" ({sim:.2f})" if sim is not None else "") + (f" {lab}" if lab else "")
        links.append(wire.dcc("Link", text, href=search_href(set_id, j), className="chip", id=f"similar-{j}"))
    similar_block = h("Div", [h("Span", "similar features: ", className="muted"),
                              *(links or [h("Span", "none", className="muted")])],
                      className="card-line similar", id="similar-features")
    return h("Div", [*head, table, similar_block], className="card feature-card", id="feature-card")


def _quality_bits(feature: dict) -> list[str]:
    """Lift, Bonferroni p and held-out precision of a feature's label (features.labels), as short texts."""
    bits = []
    lift, p = finite_float(feature.get("label_lift")), finite_float(feature.get("label_p_value"))
    if lift is not None:
        bits.append(f"lift {lift:.1f}")
    if p is not None:
        bits.append(f"p {p:.1e}" if p < 1e-3 else f"p {p:.3f}")
    held, n_held = finite_float(feature.get("label_heldout_precision")), feature.get("label_heldout_n")
    if held is not None:
        bits.append(f"held-out precision {held:.2f} of {n_held} peaks"
                    + (" ✓" if feature.get("label_validated") else ""))
    elif feature.get("label_kind"):
        bits.append("no held-out peaks")
    return bits


def _label_text(x: Any) -> str:
    if isinstance(x, dict):
        name = x.get("label") or x.get("name") or "?"
        score = next((x[k] for k in ("score", "f1", "precision", "auc") if isinstance(x.get(k), (int, float))), None)
        return f"{name} ({score:.2f})" if score is not None else str(name)
    return str(x)


def _density_text(density: Any) -> str:
    try:
        d = float(density)
    except (TypeError, ValueError):
        return str(density)
    return f"{d:.3%} of frames" if d <= 1 else fmt(d)


def _similar_item(item: Any) -> tuple[int | None, float | None, str | None]:
    if isinstance(item, (int,)) or (hasattr(item, "item") and not isinstance(item, dict)):
        return int(item), None, None
    if isinstance(item, (tuple, list)) and item:
        return int(item[0]), (float(item[1]) if len(item) > 1 else None), None
    if isinstance(item, dict):
        j = next((item[k] for k in ("index", "feature", "feature_index") if item.get(k) is not None), None)
        sim = next((item[k] for k in ("similarity", "cosine", "score") if item.get(k) is not None), None)
        return (int(j) if j is not None else None), (float(sim) if sim is not None else None), item.get("label")
    return None, None, None


def transcript_view(text: str | None, words: list[dict] | None = None, peak_time_s: float | None = None,
                    window_s: float = 0.06) -> dict:
    """The transcript; with word alignments, the words under the peak are highlighted (a wire-format element)."""
    if words and peak_time_s is not None:
        # runs of words: plain text, and a <mark> for the words under the peak (one element per run, not per word:
        # a search page shows 20 transcripts)
        runs: list[tuple[bool, list[str]]] = []
        for w in words:
            start, end = float(w.get("start_s", 0)), float(w.get("end_s", 0))
            hit = start - window_s <= peak_time_s <= end + window_s
            if runs and runs[-1][0] == hit:
                runs[-1][1].append(str(w.get("label", "")))
            else:
                runs.append((hit, [str(w.get("label", ""))]))
        parts: list = []
        for i, (hit, labels) in enumerate(runs):
            text = " ".join(labels)
            parts.append(wire.html("Mark", text) if hit else text)
            if i < len(runs) - 1:
                parts.append(" ")
        return wire.html("Div", parts, className="transcript")
    return wire.html("Div", text or "(no transcript)", className="transcript" + ("" if text else " muted"))


def audio_player(src: str, graph_id: str, readout_id: str, *, player_id: str | None = None) -> dict:
    """An HTML5 player tied to a clip figure: assets/freud.js draws its playhead and fills the readout."""
    return wire.html("Audio", src=src, controls=True, preload="metadata", id=player_id or f"{graph_id}-audio",
                     className="freud-audio", **{"data-graph": graph_id, "data-readout": readout_id})


def download_link(clip_id: str) -> dict:
    return wire.html("A", "download WAV", href=audio_url(clip_id, download=True), className="download", download="")


def plain_json(value: Any) -> Any:
    """A component tree as the plain dicts Dash sends (type, namespace, props), numpy arrays left in place.

    Dash serialises callback output with plotly's encoder: with orjson it is one C call for plain data, but a
    tree of component objects makes it fall back to walking every node in Python, several times slower.
    Only components, lists and wire-format elements (`dash_app.wire`) are descended into: other dicts (figures,
    styles, configs) hold no components."""
    if isinstance(value, Component):
        out = value.to_plotly_json()
        out["props"] = {k: plain_json(v) for k, v in out["props"].items()}
        return out
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, dict) and "props" in value and "namespace" in value:
        return {**value, "props": {k: plain_json(v) for k, v in value["props"].items()}}
    return value


def provenance_line(row: dict) -> str | None:
    """Where a clip that arrived later came from (the watched folder's batch and its arrival time), or None."""
    if not row.get("batch"):
        return None
    return f"Arrived {row.get('arrived_at') or '(time unknown)'} through the watched folder, batch {row['batch']}."
