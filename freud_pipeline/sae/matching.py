"""Feature matching between SAE dictionaries by decoder cosine: seed stability and counterparts across SAEs.

A feature's decoder direction (`features.build.decoder_directions`, or W_dec's rows) is compared as a unit row;
the cosine is signed (latents are never negative, so a flipped direction is a different feature).

- `match_dictionaries(a, b)`: the optimal one-to-one assignment (scipy's `linear_sum_assignment`, maximising the
  summed cosine): each feature of A gets at most one counterpart in B and no feature of B is used twice. Its
  `share_matched(t)` is the share of A's features whose counterpart has cosine >= t: what seed stability reports.
- `chance_match(n_a, n_b, d)` / `chance_level(...)`: the same for two random dictionaries of the same shapes
  (Gaussian directions): the level a share must beat to mean anything (in d=384 a random pair's cosine has
  standard deviation 1/sqrt(384) ~ 0.05, so even the best of 6144 candidates stays near 0.2).
- `closest_counterparts(a, b, top)`: per feature of A its `top` highest cosines in B (not one-to-one), computed
  block by block, so any size fits in memory.

- `seed_stability({seed: directions})`: every pair of seeds matched, with the chance level (the asset
  `sae_seed_stability` in freud_pipeline/defs/stability.py).

Size: the assignment needs the whole [n_a, n_b] cosine matrix (scipy works in float64): 6144 x 6144 takes ~0.3 GB
and ~4 s on 2 quiet cores (~10 s under load); it is refused above MAX_ASSIGNMENT_ENTRIES (16384 x 16384, ~2 GB),
where `closest_counterparts` still works (6144 x 6144: 1-3 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

THRESHOLDS = (0.5, 0.7, 0.9)  # the curve shown on the runs page and logged to MLflow
DEFAULT_THRESHOLD = 0.7
MAX_ASSIGNMENT_ENTRIES = 16384 * 16384


def unit_rows(directions) -> np.ndarray:
    """[n, d] float32 rows scaled to unit length (a zero row stays zero: cosine 0 with everything). Takes numpy
    arrays or torch tensors."""
    if hasattr(directions, "detach"):
        directions = directions.detach().float().cpu().numpy()
    rows = np.asarray(directions, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"decoder directions must be a non-empty 2-D array [features, d]; got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise ValueError("decoder directions hold NaN or infinite values")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


def _pair(dec_a, dec_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = unit_rows(dec_a), unit_rows(dec_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries of different widths cannot be matched: d={a.shape[1]} and d={b.shape[1]}")
    return a, b


@dataclass(frozen=True)
class MatchResult:
    """The one-to-one assignment of A's features to B's: `counterpart[i]` (-1 where A has more features than B and
    i got none) and its `cosine[i]` (NaN there)."""

    counterpart: np.ndarray  # [n_a] int64
    cosine: np.ndarray  # [n_a] float32
    n_b: int
    threshold: float = DEFAULT_THRESHOLD

    @property
    def n_a(self) -> int:
        return len(self.counterpart)

    def share_matched(self, threshold: float | None = None) -> float:
        """Share of A's features whose counterpart has cosine >= threshold (default: the result's threshold)."""
        t = self.threshold if threshold is None else float(threshold)
        return float(np.mean(np.nan_to_num(self.cosine, nan=-np.inf) >= t))

    @property
    def share(self) -> float:
        return self.share_matched()

    def shares(self, thresholds: Iterable[float] = THRESHOLDS) -> dict[float, float]:
        """{threshold: share matched}: the curve."""
        return {float(t): self.share_matched(t) for t in thresholds}

    def mean_cosine(self) -> float:
        """Mean cosine over the assigned pairs."""
        assigned = self.cosine[self.counterpart >= 0]
        return float(assigned.mean()) if assigned.size else float("nan")

    def summary(self, thresholds: Iterable[float] = THRESHOLDS) -> dict:
        return {"n_a": self.n_a, "n_b": self.n_b, "threshold": self.threshold, "share_matched": self.share,
                "shares": {f"{t:g}": s for t, s in self.shares(thresholds).items()},
                "mean_cosine": self.mean_cosine(), "median_cosine": float(np.nanmedian(self.cosine))}


def match_dictionaries(dec_a, dec_b, threshold: float = DEFAULT_THRESHOLD) -> MatchResult:
    """The optimal one-to-one assignment of A's features to B's by decoder cosine (maximising its sum)."""
    from scipy.optimize import linear_sum_assignment

    a, b = _pair(dec_a, dec_b)
    if a.shape[0] * b.shape[0] > MAX_ASSIGNMENT_ENTRIES:
        raise ValueError(f"a one-to-one assignment of {a.shape[0]} x {b.shape[0]} features needs their whole cosine "
                         f"matrix (more than {MAX_ASSIGNMENT_ENTRIES:,} entries); use closest_counterparts, which "
                         "works block by block")
    cosines = a @ b.T
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    counterpart = np.full(a.shape[0], -1, np.int64)
    cosine = np.full(a.shape[0], np.nan, np.float32)
    counterpart[rows], cosine[rows] = cols, cosines[rows, cols]
    return MatchResult(counterpart, cosine, b.shape[0], float(threshold))


def random_dictionary(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n Gaussian directions in d dimensions as unit rows (uniform on the sphere)."""
    return unit_rows(rng.standard_normal((n, d), dtype=np.float32))


def chance_match(n_a: int, n_b: int, d: int, threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> MatchResult:
    """`match_dictionaries` of two random dictionaries of these shapes: the chance level, at every threshold."""
    rng = np.random.default_rng(seed)
    return match_dictionaries(random_dictionary(n_a, d, rng), random_dictionary(n_b, d, rng), threshold)


def chance_level(n_a: int, n_b: int, d: int, threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> float:
    """Share matched at `threshold` between two random dictionaries of the same shapes."""
    return chance_match(n_a, n_b, d, threshold, seed).share


def closest_counterparts(dec_a, dec_b, top: int = 3, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per feature of A, the `top` features of B with the highest decoder cosine, best first (not one-to-one: two
    features of A may share a counterpart). Returns (indices [n_a, top] int64, cosines [n_a, top] float32);
    `top` is capped at B's size. Computed `block` rows of A at a time."""
    a, b = _pair(dec_a, dec_b)
    top = min(int(top), b.shape[0])
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    indices = np.empty((a.shape[0], top), np.int64)
    cosines = np.empty((a.shape[0], top), np.float32)
    for start in range(0, a.shape[0], block):
        sims = a[start:start + block] @ b.T
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top] if top < b.shape[0] else \
            np.broadcast_to(np.arange(b.shape[0]), sims.shape).copy()
        values = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -values), axis=1)  # best first; ties: the lower index
        indices[start:start + block] = np.take_along_axis(part, order, axis=1)
        cosines[start:start + block] = np.take_along_axis(values, order, axis=1)
    return indices, cosines


def seed_stability(directions: Mapping[int, object], thresholds: Iterable[float] = THRESHOLDS,
                   threshold: float = DEFAULT_THRESHOLD, chance_seed: int = 0) -> dict:
    """Seed stability of one recipe: {seed: decoder directions} of its runs, every pair of seeds (in the given
    order) matched one-to-one, against the chance level of two random dictionaries of the first pair's shapes.
    Returns {"pairs": [{seed_a, seed_b, match (MatchResult), shares {t: share}, mean_cosine}], "chance": {shares,
    mean_cosine}, "mean": {shares (over pairs), mean_cosine}, "thresholds", "n_latents", "d_in"}."""
    thresholds = [float(t) for t in thresholds]
    seeds = list(directions)
    if len(seeds) < 2:
        raise ValueError(f"seed stability needs at least two seeds, got {seeds}")
    unit = {s: unit_rows(directions[s]) for s in seeds}
    pairs = []
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            match = match_dictionaries(unit[a], unit[b], threshold)
            pairs.append({"seed_a": a, "seed_b": b, "match": match, "shares": match.shares(thresholds),
                          "mean_cosine": match.mean_cosine()})
    n_a, d = unit[seeds[0]].shape
    chance = chance_match(n_a, unit[seeds[1]].shape[0], d, threshold, chance_seed)
    return {"pairs": pairs, "thresholds": thresholds, "n_latents": n_a, "d_in": d,
            "chance": {"shares": chance.shares(thresholds), "mean_cosine": chance.mean_cosine()},
            "mean": {"shares": {t: float(np.mean([p["shares"][t] for p in pairs])) for t in thresholds},
                     "mean_cosine": float(np.mean([p["mean_cosine"] for p in pairs]))}}


__all__ = ["DEFAULT_THRESHOLD", "MAX_ASSIGNMENT_ENTRIES", "THRESHOLDS", "MatchResult", "chance_level",
           "chance_match", "closest_counterparts", "match_dictionaries", "random_dictionary", "seed_stability",
           "unit_rows"]
