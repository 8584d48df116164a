"""Phone and word labels for features, from forced alignments, collected during the mining pass.

For each feature, over clips that have alignments:
- its top-K clips by peak (same ranking as mining, restricted to aligned clips) and the phone / word whose
  interval holds each peak frame's centre (silence and unaligned frames count as "no phone");
- label = the most frequent phone under those peaks; precision = its share of the peaks;
- recall = share of that phone's occurrences where the feature's maximum inside the occurrence exceeds
  half the median of its top-K peaks. The threshold is only known after the pass, so occurrence maxima are
  kept for a bounded uniform sample: a reservoir of `occurrences_per_phone` occurrences per phone, each an
  [n_features] float16 vector (memory: n_phones x occurrences_per_phone x n_features x 2 bytes, e.g.
  40 x 64 x 24,576 x 2 = 126 MB). Recall is exact when a phone has fewer occurrences than that;
- F1 = 2PR / (P + R). Words get a label and precision only (too many word types for a per-word sample).

Frame t covers [t, t+1) x 20 ms; it belongs to the interval holding its centre (t + 0.5) x 20 ms.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from freud_pipeline.errors import FreudError
from freud_pipeline.features.mining import first_frame_of, is_torch_tensor
from freud_pipeline.frames import FRAME_SECONDS

SILENCE = frozenset({"", "pau", "sil", "sp", "spn", "h#", "<sil>", "<unk>"})
ALIGNMENT_COLUMNS = ("clip_id", "tier", "label", "start_s", "end_s")
MIN_SUPPORT = 3  # aligned top peaks needed before a feature gets a label
F1_GOOD = 0.5


class AlignmentError(FreudError, ValueError):
    """Alignments table with missing columns or unknown tiers."""


def interval_frames(start_s, end_s) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose centre lies in [start_s, end_s): range(first, stop). Scalars or arrays."""
    def to_frame(t):  # first frame whose centre is at or after t (1e-9: times given on a frame boundary)
        return np.maximum(np.ceil(np.asarray(t) / FRAME_SECONDS - 0.5 - 1e-9), 0).astype(np.int64)

    return to_frame(start_s), to_frame(end_s)


@dataclass
class LabelResult:
    phones: list[str]
    label: list[str | None]  # per feature
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    word_label: list[str | None]
    word_precision: np.ndarray
    threshold: np.ndarray  # recall threshold per feature
    summary: dict[str, Any] = field(default_factory=dict)


class LabelCollector:
    """A mining observer (`mine_features(..., observers=[collector])`); `result()` after the pass."""

    def __init__(self, alignments: pd.DataFrame, n_features: int, top_k: int = 32,
                 occurrences_per_phone: int = 64, seed: int = 0):
        missing = [c for c in ALIGNMENT_COLUMNS if c not in alignments.columns]
        if missing:
            raise AlignmentError(f"alignments lack column(s) {missing}; expected {list(ALIGNMENT_COLUMNS)}")
        tiers = set(alignments["tier"].unique()) - {"word", "phone"}
        if tiers:
            raise AlignmentError(f"unknown alignment tier(s) {sorted(tiers)}; expected 'word' and 'phone'")
        labels = alignments["label"].astype(str).str.lower()
        table = alignments.assign(label=labels)[~labels.isin(SILENCE)]
        table = table.sort_values(["clip_id", "start_s"], kind="stable")
        is_phone = table["tier"].eq("phone").to_numpy()
        self.phones = sorted(table["label"][is_phone].unique())
        self.words = sorted(table["label"][~is_phone].unique())
        # Flat arrays plus a row range per clip: millions of rows stay compact (no Python object per row).
        phone_codes = pd.Categorical(table["label"], categories=self.phones).codes
        word_codes = pd.Categorical(table["label"], categories=self.words).codes
        self._is_phone = is_phone
        self._label = np.where(is_phone, phone_codes, word_codes).astype(np.int32)
        self._start = table["start_s"].to_numpy(np.float64)
        self._end = table["end_s"].to_numpy(np.float64)
        clip_ids = table["clip_id"].astype(str).to_numpy()
        firsts = np.flatnonzero(np.r_[True, clip_ids[1:] != clip_ids[:-1]]) if len(clip_ids) else np.zeros(0, int)
        lasts = np.r_[firsts[1:], len(clip_ids)]
        self._rows = {clip_ids[a]: (a, b) for a, b in zip(firsts, lasts)}
        self.n_features, self.top_k, self.per_phone = n_features, top_k, occurrences_per_phone
        self.rng = np.random.default_rng(seed)
        self.peak = np.full((n_features, top_k), -np.inf, np.float32)
        self.peak_phone = np.full((n_features, top_k), -1, np.int32)
        self.peak_word = np.full((n_features, top_k), -1, np.int32)
        self.weakest = np.full(n_features, -np.inf, np.float32)
        self.weakest_slot = np.zeros(n_features, np.int64)
        self.reservoir: dict[int, np.ndarray] = {}
        self.seen = np.zeros(len(self.phones), np.int64)
        self.n_aligned_clips = 0

    def _intervals(self, clip_id: str, phones: bool) -> tuple[np.ndarray, ...]:
        """(label ids, first frame, end frame, midpoint frame) of a clip's phone or word intervals."""
        a, b = self._rows[clip_id]
        keep = self._is_phone[a:b] == phones
        start, end = self._start[a:b][keep], self._end[a:b][keep]
        first, stop = interval_frames(start, end)
        midpoint = ((start + end) / 2 / FRAME_SECONDS).astype(np.int64)
        return self._label[a:b][keep], first, stop, midpoint

    @staticmethod
    def _frame_labels(labels: np.ndarray, first: np.ndarray, stop: np.ndarray, n_frames: int) -> np.ndarray:
        out = np.full(n_frames, -1, np.int32)
        for label, a, b in zip(labels, first, stop):
            out[a:b] = label
        return out

    def observe(self, clip_id: str, acts: Any) -> None:
        clip_id = str(clip_id)
        if clip_id not in self._rows:
            return
        if is_torch_tensor(acts):
            acts = acts.float().cpu().numpy()
        acts = np.asarray(acts, dtype=np.float32)
        self.n_aligned_clips += 1
        n_frames = acts.shape[0]
        phones, phone_first, phone_stop, phone_mid = self._intervals(clip_id, phones=True)
        words, word_first, word_stop, _ = self._intervals(clip_id, phones=False)
        peak = acts.max(axis=0)
        frame = first_frame_of(acts, peak, largest=True)
        phone_at = self._frame_labels(phones, phone_first, phone_stop, n_frames)[frame]
        word_at = self._frame_labels(words, word_first, word_stop, n_frames)[frame]
        features = np.flatnonzero(peak > self.weakest)
        if features.size:
            slots = self.weakest_slot[features]
            self.peak[features, slots] = peak[features]
            self.peak_phone[features, slots] = phone_at[features]
            self.peak_word[features, slots] = word_at[features]
            rows = self.peak[features]
            self.weakest_slot[features] = rows.argmin(axis=1)
            self.weakest[features] = rows[np.arange(features.size), self.weakest_slot[features]]
        for phone, a, b, mid in zip(phones, phone_first, phone_stop, phone_mid):
            if a >= b:  # shorter than a frame, no frame centre inside: the frame holding its midpoint
                a, b = mid, mid + 1
            if a < n_frames:
                self._sample(phone, acts[a:b].max(axis=0))

    def _sample(self, phone: int, occurrence_max: np.ndarray) -> None:
        """Reservoir sampling (Algorithm R): every occurrence of a phone is kept with equal probability."""
        seen = self.seen[phone]
        self.seen[phone] += 1
        if phone not in self.reservoir:
            self.reservoir[phone] = np.zeros((self.per_phone, self.n_features), np.float16)
        if seen < self.per_phone:
            self.reservoir[phone][seen] = occurrence_max
        else:
            slot = self.rng.integers(seen + 1)
            if slot < self.per_phone:
                self.reservoir[phone][slot] = occurrence_max

    def result(self) -> LabelResult:
        n_features, n_phones = self.n_features, len(self.phones)
        valid = np.isfinite(self.peak)
        support = valid.sum(axis=1)
        with warnings.catch_warnings():  # features without aligned peaks: all-NaN rows, threshold 0
            warnings.simplefilter("ignore", RuntimeWarning)
            threshold = 0.5 * np.nanmedian(np.where(valid, self.peak, np.nan), axis=1)
        threshold = np.nan_to_num(threshold, nan=0.0)
        phone_counts = _row_counts(np.where(valid, self.peak_phone, -1), n_phones)
        word_counts = _row_counts(np.where(valid, self.peak_word, -1), len(self.words))
        labelled = (support >= MIN_SUPPORT) & (threshold > 0) & (phone_counts.sum(axis=1) > 0)
        best_phone = phone_counts.argmax(axis=1) if n_phones else np.zeros(n_features, np.int64)
        precision = np.where(labelled, phone_counts.max(axis=1, initial=0) / np.maximum(support, 1), np.nan)
        fired = np.zeros((max(n_phones, 1), n_features), np.float32)
        for phone, sample in self.reservoir.items():
            kept = min(self.seen[phone], self.per_phone)
            fired[phone] = (sample[:kept].astype(np.float32) > threshold).mean(axis=0)
        recall = np.where(labelled, fired[best_phone, np.arange(n_features)], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        f1 = np.where(labelled, f1, np.nan)
        word_ok = (support >= MIN_SUPPORT) & (word_counts.sum(axis=1) > 0)
        best_word = word_counts.argmax(axis=1) if self.words else np.zeros(n_features, np.int64)
        word_precision = np.where(word_ok, word_counts.max(axis=1, initial=0) / np.maximum(support, 1), np.nan)
        good = labelled & (f1 >= F1_GOOD)
        return LabelResult(
            phones=self.phones,
            label=[self.phones[p] if ok else None for p, ok in zip(best_phone, labelled)],
            precision=precision.astype(np.float32),
            recall=recall.astype(np.float32),
            f1=f1.astype(np.float32),
            word_label=[self.words[w] if ok else None for w, ok in zip(best_word, word_ok)],
            word_precision=word_precision.astype(np.float32),
            threshold=threshold.astype(np.float32),
            summary={
                "n_aligned_clips": self.n_aligned_clips,
                "n_labelled": int(labelled.sum()),
                "n_f1_at_least_0_5": int(good.sum()),
                "phones_covered": sorted({self.phones[p] for p in best_phone[good]}),
                "n_phones": n_phones,
                "recall_threshold": "0.5 x median of the feature's top-K aligned peaks",
                "occurrences_per_phone": self.per_phone,
            },
        )


def _row_counts(ids: np.ndarray, n_labels: int) -> np.ndarray:
    """[F, K] label ids (-1 = none) -> [F, n_labels] counts."""
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    flat = ids.ravel()
    keep = flat >= 0
    counts = np.zeros((ids.shape[0], max(n_labels, 1)), np.int64)
    np.add.at(counts, (rows[keep], flat[keep]), 1)
    return counts[:, :n_labels] if n_labels else counts[:, :0]
