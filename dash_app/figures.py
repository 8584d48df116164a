"""Plotly figures: clip spectrogram with an activation trace, per-clip maxima histogram, top-features bars."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from dash_app.data import FRAME_SECONDS, MEL_HOP_SECONDS

MAX_MEL_COLUMNS = 1200  # longer clips are mean-pooled in time for display
POSITIVE_RGB = (0, 200, 70)
NEGATIVE_RGB = (235, 40, 40)
TRACE_COLOUR = "#ffb300"
PLAYHEAD_COLOUR = "#00e5ff"
SHADE_MAX_OPACITY = 0.55

# Trace order in clip figures (the upload page patches traces 1 and 2 by position).
HEATMAP, SHADING, LINE, PEAK = 0, 1, 2, 3


def _pool_columns(mel: np.ndarray, max_columns: int) -> tuple[np.ndarray, float]:
    """Mean-pool time columns so at most max_columns remain; returns (mel, seconds per column)."""
    frames = mel.shape[1]
    factor = max(1, math.ceil(frames / max_columns))
    if factor == 1:
        return mel, MEL_HOP_SECONDS
    pad = (-frames) % factor
    if pad:
        mel = np.concatenate([mel, np.repeat(mel[:, -1:], pad, axis=1)], axis=1)
    pooled = mel.reshape(mel.shape[0], -1, factor).mean(axis=2)
    return pooled, MEL_HOP_SECONDS * factor


def shading_colours(trace: Sequence[float], scale: float | None = None) -> list[str]:
    """One rgba colour per 20 ms frame: green positive, red negative, opacity by |a| / scale.

    `scale` defaults to the trace's own max |a| (as the original); the search page passes the max |a| over all
    results shown, so a clip where the feature barely moves is not painted as strongly as the top clip."""
    values = np.asarray(trace, dtype=np.float64)
    if values.size == 0:
        return []
    peak = float(scale) if scale else (float(np.max(np.abs(values))) or 1.0)
    colours = []
    for v in values:
        r, g, b = POSITIVE_RGB if v >= 0 else NEGATIVE_RGB
        colours.append(f"rgba({r},{g},{b},{SHADE_MAX_OPACITY * min(1.0, abs(v) / peak):.3f})")
    return colours


def trace_parts(trace: Sequence[float] | None, n_mels: int, name: str = "activation", *, scale: float | None = None,
                offset_frames: int = 0) -> dict:
    """Data for the shading bars and the trace line (used to build and to patch figures)."""
    values = np.asarray(trace if trace is not None else [], dtype=np.float64)
    times = (np.arange(values.size) + offset_frames + 0.5) * FRAME_SECONDS
    return {
        "times": np.round(times, 4).tolist(),
        "values": np.round(values, 5).tolist(),
        "colours": shading_colours(values, scale),
        "heights": [n_mels] * int(values.size),
        "name": name,
    }


def padded_range(values: Sequence[float], value_range: tuple[float, float] | None = None) -> list[float] | None:
    """Secondary-axis range including 0: a given (lo, hi) (shared by all results of a page) or the trace's."""
    if value_range is not None:
        lo, hi = value_range
    else:
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0:
            return None
        lo, hi = float(array.min()), float(array.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.08 * ((hi - lo) or 1.0)
    return [lo - pad, hi + pad]


def clip_figure_dict(
    mel: np.ndarray,
    trace: Sequence[float] | None = None,
    *,
    peak_time_s: float | None = None,
    peak_value: float | None = None,
    trace_name: str = "activation",
    height: int = 250,
    shade_scale: float | None = None,
    trace_offset_frames: int = 0,
    value_range: tuple[float, float] | None = None,
) -> dict:
    """Log-mel heatmap (cropped to the clip) with the activation trace on a secondary axis and shading per frame.

    A plain figure dict: building go.Figure objects validates every array and dominated a search's cost (20
    figures per page). layout.shapes[0] is the playhead (moved in the browser by assets/freud.js).
    """
    n_mels, frames = mel.shape
    duration = frames * MEL_HOP_SECONDS
    pooled, column_s = _pool_columns(mel, MAX_MEL_COLUMNS)
    x = (np.arange(pooled.shape[1]) + 0.5) * column_s
    parts = trace_parts(trace, n_mels, trace_name, scale=shade_scale, offset_frames=trace_offset_frames)
    peak_x = [peak_time_s] if peak_time_s is not None and peak_value is not None else []
    peak_y = [peak_value] if peak_x else []
    data = [
        {"type": "heatmap", "z": np.round(pooled.astype(np.float64), 2).tolist(), "x": np.round(x, 4).tolist(),
         "y": list(range(n_mels)), "colorscale": "Greys", "reversescale": True, "showscale": False,
         "hoverinfo": "skip", "name": "log-mel"},
        {"type": "bar", "x": parts["times"], "y": parts["heights"], "base": -0.5, "width": FRAME_SECONDS,
         "marker": {"color": parts["colours"], "line": {"width": 0}}, "hoverinfo": "skip", "showlegend": False,
         "name": "shading"},
        {"type": "scatter", "x": parts["times"], "y": parts["values"], "yaxis": "y2", "mode": "lines",
         "line": {"color": TRACE_COLOUR, "width": 1.6}, "name": trace_name,
         "hovertemplate": "%{x:.2f} s: %{y:.3f}<extra></extra>", "showlegend": False},
        {"type": "scatter", "x": peak_x, "y": peak_y, "yaxis": "y2", "mode": "markers",
         "marker": {"symbol": "triangle-down", "size": 10, "color": TRACE_COLOUR,
                    "line": {"color": "black", "width": 1}},
         "name": "peak", "hovertemplate": "peak %{y:.3f} at %{x:.2f} s<extra></extra>", "showlegend": False},
    ]
    layout = {
        "height": height,
        "margin": {"l": 48, "r": 56, "t": 8, "b": 36},
        "bargap": 0,
        "barmode": "overlay",
        "hovermode": "closest",
        "plot_bgcolor": "black",
        "paper_bgcolor": "white",
        "xaxis": {"title": {"text": "time (s)", "standoff": 2}, "range": [0, duration], "showgrid": False,
                  "zeroline": False},
        "yaxis": {"title": {"text": "mel bin", "standoff": 2}, "range": [-0.5, n_mels - 0.5], "showgrid": False,
                  "zeroline": False, "fixedrange": True},
        "yaxis2": {"title": {"text": trace_name, "standoff": 2}, "overlaying": "y", "side": "right",
                   "showgrid": False, "zeroline": True, "zerolinecolor": "rgba(255,179,0,0.45)",
                   "range": padded_range(parts["values"], value_range), "fixedrange": True, "tickmode": "auto",
                   "nticks": 6},
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": 0, "x1": 0, "y0": 0, "y1": 1,
                    "line": {"color": PLAYHEAD_COLOUR, "width": 2}, "name": "playhead"}],
        "uirevision": "clip",
    }
    return {"data": data, "layout": layout}


def clip_figure(mel: np.ndarray, trace: Sequence[float] | None = None, **kwargs) -> go.Figure:
    """`clip_figure_dict` as a go.Figure, for callers that modify the figure further."""
    return go.Figure(clip_figure_dict(mel, trace, **kwargs))


def histogram_figure(hist: dict, *, index: int, min_value: float | None = None, max_value: float | None = None,
                     height: int = 220) -> go.Figure:
    """Counts of every clip's peak value (log y), with the active min/max filter drawn as lines."""
    edges = np.asarray(hist.get("bin_edges") or [], dtype=np.float64)
    counts = np.asarray(hist.get("counts") or [], dtype=np.float64)
    fig = go.Figure()
    if edges.size >= 2 and counts.size == edges.size - 1:
        centres = (edges[:-1] + edges[1:]) / 2
        widths = np.diff(edges)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=np.where(counts > 0, counts, np.nan),
                width=widths,
                marker={"color": "#5c6bc0", "line": {"width": 0}},
                customdata=np.stack([edges[:-1], edges[1:]], axis=1),
                hovertemplate="%{customdata[0]:.3g} to %{customdata[1]:.3g}: %{y} clips<extra></extra>",
                name="clips",
            )
        )
    for value, label in ((min_value, "min"), (max_value, "max")):
        if value is not None:
            fig.add_vline(x=value, line={"color": "#d81b60", "dash": "dash", "width": 1.5},
                          annotation_text=label, annotation_position="top")
    total = int(counts.sum()) if counts.size else 0
    fig.update_layout(
        height=height,
        margin={"l": 52, "r": 12, "t": 30, "b": 40},
        title={"text": f"Peak of feature {index} in each clip ({total} clips)", "font": {"size": 13}, "x": 0.01},
        xaxis={"title": {"text": "peak activation of the clip", "standoff": 4}},
        yaxis={"title": {"text": "clips (log)", "standoff": 4}, "type": "log", "dtick": "D2"},
        bargap=0.02,
        showlegend=False,
        plot_bgcolor="#fafafa",
    )
    return fig


def top_features_figure(features: list[dict], *, set_label: str = "", selected: int | None = None,
                        height: int = 300) -> go.Figure:
    """Bars of the clip's top features (by their max over the clip); click a bar to overlay its trace."""
    indices = [int(f["index"]) for f in features]
    values = [float(f.get("value") or 0.0) for f in features]
    labels = [str(f.get("label") or "") for f in features]
    colours = ["#ff6f00" if i == selected else ("#43a047" if v >= 0 else "#e53935") for i, v in zip(indices, values)]
    fig = go.Figure(
        go.Bar(
            x=[str(i) for i in indices],
            y=values,
            marker={"color": colours},
            customdata=[[i, lab, float(f.get("peak_time_s") or 0.0)] for i, lab, f in zip(indices, labels, features)],
            hovertemplate="feature %{customdata[0]}<br>max %{y:.3f} at %{customdata[2]:.2f} s"
            "<br>%{customdata[1]}<extra></extra>",
            name="max over clip",
        )
    )
    fig.update_layout(
        height=height,
        margin={"l": 52, "r": 12, "t": 30, "b": 48},
        title={"text": f"Top {len(features)} features{(' of ' + set_label) if set_label else ''} — click a bar",
               "font": {"size": 13}, "x": 0.01},
        xaxis={"title": {"text": "feature index", "standoff": 4}, "type": "category"},
        yaxis={"title": {"text": "max activation over the clip", "standoff": 4}},
        showlegend=False,
        plot_bgcolor="#fafafa",
        clickmode="event",
    )
    return fig
