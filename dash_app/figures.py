"""Plotly figures: clip spectrogram with an activation trace, per-clip maxima histogram, top-features bars."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from freud_pipeline.frames import FRAME_SECONDS, MEL_FRAME_SECONDS

MAX_MEL_COLUMNS = 1200  # longer clips are mean-pooled in time for display
POSITIVE_RGB = (0, 200, 70)
NEGATIVE_RGB = (235, 40, 40)
TRACE_COLOUR = "#ffb300"
PLAYHEAD_COLOUR = "#00e5ff"
SHADE_MAX_OPACITY = 0.55
GREY_LEVELS = 16
_GREY_PALETTE = [round(v * 255 / (GREY_LEVELS - 1)) for v in range(GREY_LEVELS) for _ in range(3)]

# Trace order in clip figures (the upload page patches traces by position). The log-mel is a layout image, never an
# image trace: Plotly resolves an image trace's draw only in its picture's onload, which a redraw starting before the
# picture has loaded (a resize of a responsive graph) replaces. That draw then never completes, and dcc.Graph, which
# applies figure updates one after another, drew no later figure of that graph: a clicked feature's overlay stayed
# the first one (found under load by the upload page's browser test). A layout image from a data URI or a URL is
# drawn at once.
SHADING, LINE, PEAK = 0, 1, 2


def clip_graph_style(height: int) -> dict:
    """The style of the dcc.Graph that shows a clip figure `height` px high.

    Clip graphs are responsive (their width follows the page). In that mode dcc.Graph drops the figure's height
    and Plotly fills the graph's container, so the container must be given the height: left to its content it
    is 0 px high (the plot's layers are positioned absolutely), and the spectrogram spills over the player below.
    It held only where Plotly happened to draw first while the container was still hidden or empty."""
    return {"height": f"{int(height)}px"}


def _pool_columns(mel: np.ndarray, max_columns: int) -> tuple[np.ndarray, float]:
    """Mean-pool time columns so at most max_columns remain; returns (mel, seconds per column)."""
    frames = mel.shape[1]
    factor = max(1, math.ceil(frames / max_columns))
    if factor == 1:
        return mel, MEL_FRAME_SECONDS
    pad = (-frames) % factor
    if pad:
        mel = np.concatenate([mel, np.repeat(mel[:, -1:], pad, axis=1)], axis=1)
    pooled = mel.reshape(mel.shape[0], -1, factor).mean(axis=2)
    return pooled, MEL_FRAME_SECONDS * factor


@dataclass(frozen=True)
class Spectrogram:
    """A clip's log-mel as a greyscale PNG (data URI) plus its geometry: what a clip figure draws underneath.

    Sent as an image, not a heatmap of numbers: 80 x 1500 floats of JSON per 30 s clip made a 20-result search
    page about a megabyte and its serialisation most of a search's cost. It does not depend on the feature, so
    the app caches one per clip id."""

    uri: str
    n_mels: int
    columns: int
    column_s: float
    duration_s: float

    @cached_property
    def png_top_down(self) -> bytes:
        """The PNG with the highest mel bin in its first row, as a layout image is drawn: what the app serves by
        clip id for search pages (see `uri_top_down` for figures that embed it)."""
        with Image.open(io.BytesIO(base64.b64decode(self.uri.partition(",")[2]))) as image:
            flipped = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            buf = io.BytesIO()
            flipped.save(buf, format="PNG", bits=4, compress_level=6)
        return buf.getvalue()

    @cached_property
    def uri_top_down(self) -> str:
        """`png_top_down` as a data URI: the layout image of a clip that has no URL (an upload, an edit)."""
        return "data:image/png;base64," + base64.b64encode(self.png_top_down).decode("ascii")

    @cached_property
    def version(self) -> str:
        """A short hash of the image: part of its URL, so browsers may cache it for good."""
        return hashlib.sha1(self.uri.encode("ascii")).hexdigest()[:12]


def spectrogram_image(mel: np.ndarray, max_columns: int = MAX_MEL_COLUMNS) -> Spectrogram:
    """Encode a log-mel [n_mels, frames] (100 frames/s) as a PNG: loud is dark, as on a printed spectrogram."""
    n_mels, frames = mel.shape
    pooled, column_s = _pool_columns(np.asarray(mel, dtype=np.float32), max_columns)
    lo, hi = float(pooled.min()), float(pooled.max())
    level = (pooled - lo) / ((hi - lo) or 1.0)
    # Row 0 of the image is drawn at y0 = 0, the bottom of the non-reversed axis: the lowest mel bin.
    # 16 grey levels in a 4-bit palette PNG: a third of the bytes of 8-bit grey, and a background does not need more.
    image = Image.fromarray(np.round((GREY_LEVELS - 1) * (1.0 - level)).astype(np.uint8), mode="P")
    image.putpalette(_GREY_PALETTE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", bits=4, compress_level=6)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Spectrogram(uri, n_mels, pooled.shape[1], column_s, frames * MEL_FRAME_SECONDS)


def shading_colorscale() -> list[list]:
    """Red (negative) -> transparent (0) -> green (positive): the shading row is coloured by the trace itself."""
    (r0, g0, b0), (r1, g1, b1) = NEGATIVE_RGB, POSITIVE_RGB
    return [[0.0, f"rgba({r0},{g0},{b0},{SHADE_MAX_OPACITY})"], [0.5, "rgba(0,0,0,0)"],
            [1.0, f"rgba({r1},{g1},{b1},{SHADE_MAX_OPACITY})"]]


def display_rounded(values: np.ndarray, scale: float) -> np.ndarray:
    """float32 values to four significant digits of `scale`: beyond what a 250 px plot shows, and half the JSON
    (orjson writes a float32 in its shortest form: 0.107, not 0.10693359)."""
    if not (math.isfinite(scale) and scale > 0):
        return np.asarray(values, dtype=np.float32)
    return np.round(np.asarray(values, dtype=np.float32), max(0, 3 - math.floor(math.log10(scale))))


def trace_parts(trace: Sequence[float] | None, n_mels: int, name: str = "activation", *, scale: float | None = None,
                offset_frames: int = 0, rounded: bool = False) -> dict:
    """Data for the shading row and the trace line (used to build figures and to patch them in place).

    One value per 20 ms frame, positioned by x0/dx (no time array). `scale` is the |a| that gets full shading:
    the trace's own max by default (as the original); the search page passes the max over all results shown,
    so a clip where the feature barely moves is not painted as strongly as the top clip. rounded=True: the values
    are already `display_rounded` (the search page rounds all of a page's traces in one call)."""
    values = np.asarray(trace if trace is not None else [], dtype=np.float32)
    peak = float(scale) if scale else (float(np.max(np.abs(values))) if values.size else 0.0) or 1.0
    if not rounded:
        values = display_rounded(values, peak)
    return {
        "x0": round((offset_frames + 0.5) * FRAME_SECONDS, 4),
        "dx": FRAME_SECONDS,
        # a float32 array: orjson writes it in one call (a list would be walked value by value)
        "values": values.astype(np.float32),
        "scale": peak,
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
    mel: np.ndarray | Spectrogram,
    trace: Sequence[float] | None = None,
    *,
    peak_time_s: float | None = None,
    peak_value: float | None = None,
    trace_name: str = "activation",
    height: int = 250,
    shade_scale: float | None = None,
    trace_offset_frames: int = 0,
    value_range: tuple[float, float] | None = None,
    image_url: str | None = None,
    rounded: bool = False,
) -> dict:
    """Log-mel image (cropped to the clip) with the activation trace on a secondary axis and shading per frame.

    `mel` is the log-mel array or its cached `Spectrogram`. The log-mel is a layout image (see SHADING, LINE,
    PEAK: the traces, in that order): loaded from `image_url` (the app's /spectrogram route, which browsers cache
    across searches), else embedded as a data URI. A plain figure dict: building go.Figure objects
    validates every array and dominated a search's cost (20 figures per page). layout.shapes[0] is the playhead
    (moved in the browser by assets/freud.js).
    """
    spec = mel if isinstance(mel, Spectrogram) else spectrogram_image(mel)
    n_mels, duration = spec.n_mels, spec.duration_s
    parts = trace_parts(trace, n_mels, trace_name, scale=shade_scale, offset_frames=trace_offset_frames,
                        rounded=rounded)
    peak_x = [peak_time_s] if peak_time_s is not None and peak_value is not None else []
    peak_y = [peak_value] if peak_x else []
    data = [
        {"type": "heatmap", "z": parts["values"][None, :], "x0": parts["x0"], "dx": parts["dx"], "y0": (n_mels - 1) / 2,
         "dy": n_mels, "zmin": -parts["scale"], "zmax": parts["scale"], "colorscale": shading_colorscale(),
         "showscale": False, "hoverinfo": "skip", "name": "shading"},
        {"type": "scatter", "x0": parts["x0"], "dx": parts["dx"], "y": parts["values"], "yaxis": "y2",
         "mode": "lines", "line": {"color": TRACE_COLOUR, "width": 1.6}, "name": trace_name,
         "hovertemplate": "%{x:.2f} s: %{y:.3f}<extra></extra>", "showlegend": False},
        {"type": "scatter", "x": peak_x, "y": peak_y, "yaxis": "y2", "mode": "markers",
         "marker": {"symbol": "triangle-down", "size": 10, "color": TRACE_COLOUR,
                    "line": {"color": "black", "width": 1}},
         "name": "peak", "hovertemplate": "peak %{y:.3f} at %{x:.2f} s<extra></extra>", "showlegend": False},
    ]
    layout = {
        "height": height,
        "margin": {"l": 48, "r": 56, "t": 8, "b": 36},
        "hovermode": "closest",
        "plot_bgcolor": "black",
        "paper_bgcolor": "white",
        "xaxis": {"title": {"text": "time (s)", "standoff": 2}, "range": [0, duration], "showgrid": False,
                  "zeroline": False},
        "yaxis": {"title": {"text": "mel bin", "standoff": 2}, "range": [-0.5, n_mels - 0.5], "showgrid": False,
                  "zeroline": False, "fixedrange": True, "autorange": False, "scaleanchor": False},
        "yaxis2": {"title": {"text": trace_name, "standoff": 2}, "overlaying": "y", "side": "right",
                   "showgrid": False, "zeroline": True, "zerolinecolor": "rgba(255,179,0,0.45)",
                   "range": padded_range(parts["values"], value_range), "fixedrange": True, "tickmode": "auto",
                   "nticks": 6},
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": 0, "x1": 0, "y0": 0, "y1": 1,
                    "line": {"color": PLAYHEAD_COLOUR, "width": 2}, "name": "playhead"}],
        "images": [{"source": image_url or spec.uri_top_down, "xref": "x", "yref": "y", "x": 0, "y": n_mels - 0.5,
                    "sizex": spec.columns * spec.column_s, "sizey": n_mels, "xanchor": "left", "yanchor": "top",
                    "sizing": "stretch", "layer": "below", "name": "log-mel"}],
        "uirevision": "clip",
    }
    return {"data": data, "layout": layout}


def clip_figure(mel: np.ndarray, trace: Sequence[float] | None = None, **kwargs) -> go.Figure:
    """`clip_figure_dict` as a go.Figure, for callers that modify the figure further or patch it. Its arrays
    are plain lists (go.Figure would send numpy arrays as typed arrays), so a Patch assigning lists replaces like
    with like."""
    figure = clip_figure_dict(mel, trace, **kwargs)
    for item in figure["data"]:
        for key in ("z", "y"):
            if isinstance(item.get(key), np.ndarray):
                item[key] = item[key].tolist()
    return go.Figure(figure)


def histogram_figure(hist: dict, *, index: int, min_value: float | None = None, max_value: float | None = None,
                     height: int = 220) -> dict:
    """Counts of every clip's peak value (log y), with the active min/max filter drawn as lines (a plain dict)."""
    edges = np.asarray(hist.get("bin_edges") or [], dtype=np.float64)
    counts = np.asarray(hist.get("counts") or [], dtype=np.float64)
    data = []
    if edges.size >= 2 and counts.size == edges.size - 1:
        centres = (edges[:-1] + edges[1:]) / 2
        data.append({
            "type": "bar", "x": centres.tolist(), "y": [c if c > 0 else None for c in counts.tolist()],
            "width": np.diff(edges).tolist(), "marker": {"color": "#5c6bc0", "line": {"width": 0}},
            "customdata": np.stack([edges[:-1], edges[1:]], axis=1).tolist(),
            "hovertemplate": "%{customdata[0]:.3g} to %{customdata[1]:.3g}: %{y} clips<extra></extra>",
            "name": "clips",
        })
    shapes, annotations = [], []
    for value, label in ((min_value, "min"), (max_value, "max")):
        if value is not None:
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": value, "x1": value, "y0": 0, "y1": 1,
                           "line": {"color": "#d81b60", "dash": "dash", "width": 1.5}})
            annotations.append({"x": value, "xref": "x", "y": 1, "yref": "paper", "text": label, "showarrow": False,
                                "yanchor": "bottom", "font": {"color": "#d81b60"}})
    total = int(counts.sum()) if counts.size else 0
    layout = {
        "height": height,
        "margin": {"l": 52, "r": 12, "t": 30, "b": 40},
        "title": {"text": f"Peak of feature {index} in each clip ({total} clips)", "font": {"size": 13}, "x": 0.01},
        "xaxis": {"title": {"text": "peak activation of the clip", "standoff": 4}},
        "yaxis": {"title": {"text": "clips (log)", "standoff": 4}, "type": "log", "dtick": "D2"},
        "bargap": 0.02,
        "showlegend": False,
        "plot_bgcolor": "#fafafa",
        "shapes": shapes,
        "annotations": annotations,
    }
    return {"data": data, "layout": layout}


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


def tradeoff_figure(runs: list[dict], height: int = 320) -> go.Figure:
    """The sparsity trade-off of SAE runs: L0 against FVU (left) and against ΔWER with its confidence interval
    (right), one point per run, coloured by architecture. Runs without a number for a panel are left out of it."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("FVU (held-out frames) vs L0", "ΔWER (spliced − original) vs L0"))
    palette = ["#3949ab", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b"]
    archs = sorted({str(r.get("architecture") or "?") for r in runs})
    for i, arch in enumerate(archs):
        mine = [r for r in runs if str(r.get("architecture") or "?") == arch and r.get("l0") is not None]
        colour = palette[i % len(palette)]

        def text(r):
            return (f"{r.get('run_name')}<br>{r.get('n_latents') or '?'} latents, k {r.get('k') or '–'}, "
                    f"{r.get('steps') or '?'} steps")

        with_fvu = [r for r in mine if r.get("fvu") is not None]
        fig.add_trace(go.Scatter(
            x=[r["l0"] for r in with_fvu], y=[r["fvu"] for r in with_fvu], mode="markers", name=arch,
            legendgroup=arch, marker={"color": colour, "size": 9}, text=[text(r) for r in with_fvu],
            hovertemplate="%{text}<br>L0 %{x:.1f}, FVU %{y:.3f}<extra></extra>"), row=1, col=1)
        with_wer = [r for r in mine if r.get("delta_wer") is not None]
        lows = [r.get("delta_wer_ci_low") for r in with_wer]
        highs = [r.get("delta_wer_ci_high") for r in with_wer]
        error = None
        if with_wer and all(v is not None for v in lows + highs):
            error = {"type": "data", "symmetric": False,
                     "array": [100 * (h - r["delta_wer"]) for h, r in zip(highs, with_wer)],
                     "arrayminus": [100 * (r["delta_wer"] - lo) for lo, r in zip(lows, with_wer)]}
        fig.add_trace(go.Scatter(
            x=[r["l0"] for r in with_wer], y=[100 * r["delta_wer"] for r in with_wer], mode="markers", name=arch,
            legendgroup=arch, showlegend=False, marker={"color": colour, "size": 9}, error_y=error,
            text=[text(r) for r in with_wer],
            hovertemplate="%{text}<br>L0 %{x:.1f}, ΔWER %{y:+.2f} points<extra></extra>"), row=1, col=2)
    if not any(r.get("delta_wer") is not None for r in runs):
        fig.add_annotation(text="no run has a splice evaluation (ΔWER) yet", showarrow=False, row=1, col=2,
                           x=0.5, y=0.5, xref="x2 domain", yref="y2 domain", font={"color": "#6b7280"})
    fig.add_hline(y=0, line={"color": "#9ca3af", "dash": "dot", "width": 1}, row=1, col=2)
    fig.update_xaxes(title_text="L0 (active latents per frame)", type="log")
    fig.update_yaxes(title_text="FVU", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="ΔWER, points (95% CI)", row=1, col=2)
    fig.update_layout(height=height, margin={"l": 56, "r": 12, "t": 36, "b": 48}, plot_bgcolor="#fafafa",
                      legend={"title": {"text": "architecture"}}, font={"size": 11})
    return fig
