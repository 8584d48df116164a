"""How far a fast window mode strays from the faithful one: per-frame cosine and top-example overlap."""

from __future__ import annotations

import numpy as np


def _peaks(clips: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    return np.stack([clips[c].max(axis=0) for c in ids])  # [clips, features]


def compare_modes(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], top_n: int = 20) -> dict:
    """Fidelity of `candidate` activations against `reference` ones, clip by clip (same clip ids, same frames).

    Returns the mean and 1st-percentile per-frame cosine similarity, the worst clip's mean cosine, the global
    cosine over all values, and the mean overlap of each feature's top-`top_n` clips (by peak value).
    """
    ids = sorted(set(reference) & set(candidate))
    if not ids:
        raise ValueError("no clip in common between the two activation sets")
    cosines, per_clip = [], []
    dot = ref_sq = cand_sq = 0.0
    for clip_id in ids:
        ref = reference[clip_id].astype(np.float64)
        cand = candidate[clip_id].astype(np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"{clip_id}: shapes differ ({ref.shape} vs {cand.shape})")
        num = (ref * cand).sum(axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12
        cos = num / den
        cosines.append(cos)
        per_clip.append(cos.mean())
        dot += num.sum()
        ref_sq += (ref**2).sum()
        cand_sq += (cand**2).sum()
    frame_cos = np.concatenate(cosines)
    n = min(top_n, len(ids))
    ref_top = np.argsort(-_peaks(reference, ids), axis=0)[:n]  # [n, features]
    cand_top = np.argsort(-_peaks(candidate, ids), axis=0)[:n]
    overlap = np.mean([len(set(ref_top[:, f]) & set(cand_top[:, f])) / n for f in range(ref_top.shape[1])])
    return {
        "frame_cosine_mean": float(frame_cos.mean()),
        "frame_cosine_p01": float(np.percentile(frame_cos, 1)),
        "worst_clip_cosine": float(min(per_clip)),
        "global_cosine": float(dot / np.sqrt(ref_sq * cand_sq)),
        f"top{top_n}_overlap": float(overlap),
        "n_clips": len(ids),
    }
