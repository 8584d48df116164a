"""Feature-density histogram as a PNG (matplotlib) or, where matplotlib is missing, as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def write_density_plot(histogram: dict, directory: str | Path, title: str = "SAE feature density") -> Path:
    """`histogram` as from `metrics.density_histogram`. Returns the file written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is None:
        path = directory / "feature_density.json"
        path.write_text(json.dumps(histogram, indent=2))
        return path
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    edges, counts = histogram["log10_bin_edges"], histogram["counts"]
    fig = Figure(figsize=(6, 3.5), tight_layout=True)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True)
    ax.set_xlabel("log10(fraction of frames a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({histogram['n_dead']} dead)")
    path = directory / "feature_density.png"
    fig.savefig(path, dpi=100)
    return path
