"""Phone, phone-class and artefact labels for features, from forced alignments, with their evidence.

`LabelCollector` is a mining observer: it sees every clip during the mining pass. Per feature:

Peaks. A feature's peak in a clip is its maximum there (first frame on ties); a clip where it never exceeds the
set's fire threshold gives no peak (a latent that is 0 throughout would otherwise "peak" at frame 0). The
`top_k` clips with the highest peaks are kept twice: among the training clips and among the held-out clips
(`heldout_split`: whole speakers/voices when the manifest has several, else the clips whose sha1(clip_id) starts
with an odd byte, about half). Exactly the top K by (peak descending, clip order ascending): of equal peaks, the
clip observed first.

Candidates. Every phone and phone class (`audio.phones.PHONE_CLASSES`) seen in the training alignments. Its
base rate q is the share of the training clips' frames it covers (silence counts in the total), i.e. the chance
that a peak lands on it if peaks fell on random frames. Of the n training peaks, k land on it: precision
P = k / n, lift = P / q, and p = P(Binomial(n, q) >= k), one-sided, Bonferroni-adjusted over the m candidates
tested (`p_value` = min(1, m p)).

Artefacts are tested first and take precedence: clip onset (peak in the first 100 ms of its clip), clip end (in
the last 100 ms), silence / non-speech (no phone covers the peak frame) and a fixed frame (the commonest peak
frame, past the onset; its p is also multiplied by the number of frame positions it was chosen from), in this
order. Each has its own base rate (e.g. the share of frames within 100 ms of a clip start); a feature is an
artefact when the test is significant and at least half of its peaks show it; with half its peaks at a clip's
onset or end but too few to be significant, it gets no label at all.

Loudness, when the collector is given each clip's per-frame level (`loudness`: clip id -> dB per frame, e.g.
`frames.frame_loudness_db` of the clip's audio; `build_feature_set(data_root=...)` passes it): a frame is loud
when its level is at or above the clip's (1 - LOUD_SHARE) quantile, the clip's loudest 10% of frames (none when
the quantile is the clip's lowest level, e.g. a silent clip); base rate = loud training frames / training frames.
This fifth test (m counts it: candidates + 5 instead of + 4) comes last and yields to the phones: vowels are
loud, so a vowel detector's peaks sit on loud frames too, and a broad class (vowel, back vowel) has a base rate
high enough that loudness can score higher by KL while the class generalises better to held-out voices (tried:
held-out precision 1.0 as "back vowel", 0.67 as loudness). A feature is the loudness artefact only when the test
passes as above, no earlier artefact holds, and no phone or class candidate passes: a feature that fires on loud
frames whatever the phone is "loudness"; one a phone or class explains keeps that label.

Label. Among the phone and class candidates that are significant (p_value < ALPHA), clearly above chance
(lift >= MIN_LIFT) and precise enough (P >= MIN_PRECISION), the one with the largest score wins, where
score = KL(Bernoulli(P) || Bernoulli(q)) in bits: the information that "the peak is on this label" carries
beyond chance (2 ln 2 n score is the G-test statistic). A class therefore wins over its best phone only when its
members together explain the peaks better than that phone alone (peaks on s and sh alike: "sibilant"; on s only:
"s"); ties go to the phone. Otherwise the feature is unlabelled: label None, and `reason` says why.

Held-out. The label chosen on the training clips is scored on the held-out clips' top peaks: heldout_precision is
the share of them on the label (for an artefact: showing it); a label is validated when heldout_precision >=
VALIDATED_PRECISION over at least MIN_SUPPORT held-out peaks.

Recall (training clips) = share of the label's occurrences where the feature's maximum inside the occurrence
exceeds half the median of its top-K training peaks. The threshold is only known after the pass, so occurrence
maxima are kept for a bounded uniform sample: a reservoir of `occurrences_per_phone` occurrences per phone, those
of smallest priority (a hash of the seed, the clip id and the occurrence's place in the clip), each an
[n_features] float16 vector (n_phones x occurrences_per_phone x n_features x 2 bytes, e.g. 40 x 64 x 24,576 x 2 =
126 MB); a class's recall weighs its phones by their number of occurrences. F1 = 2PR / (P + R). Words get a
label and precision only (too many word types for a per-word sample), the commonest word under the peaks when it
passes the same test as phones (Bonferroni over the words seen); none for artefacts.

Merging. Nothing above depends on the order in which clips arrive beyond the clip order of ties, so a collector
is mergeable: `state()` (numpy arrays, for np.savez) and `LabelCollector.from_state` keep it without the
activations, and `a.merge(b)` gives the collector that would have observed a's clips, then b's (b built with
`split=a.split_info`, its alignments the rows of its own clips): the same labels, exactly.

Frame t covers [t, t+1) x 20 ms; it belongs to the interval holding its centre (t + 0.5) x 20 ms.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from freud_pipeline.audio.phones import PHONE_CLASSES
from freud_pipeline.errors import FreudError
from freud_pipeline.features.mining import first_frame_of, is_torch_tensor
from freud_pipeline.features.state_file import Stacked
from freud_pipeline.frames import FRAME_SECONDS

SILENCE = frozenset({"", "pau", "sil", "sp", "spn", "h#", "<sil>", "<unk>"})
ALIGNMENT_COLUMNS = ("clip_id", "tier", "label", "start_s", "end_s")
MIN_SUPPORT = 3  # peaks needed before a feature gets a label (and before a held-out check counts)
ALPHA = 0.01  # significance level, after Bonferroni over the candidates
MIN_LIFT = 2.0
MIN_PRECISION = 0.25
ARTEFACT_SHARE = 0.5  # share of peaks that must show an artefact
VALIDATED_PRECISION = 0.5
ONSET_FRAMES = 5  # 100 ms
F1_GOOD = 0.5
KINDS = ("phone", "class", "artefact")
SHUFFLES = 10  # label permutations for the chance level of the validated share
LOUD_SHARE = 0.1  # a clip's loudest 10% of frames are "loud"
ONSET, END, FIXED, SILENT, LOUD = "clip onset", "clip end", "fixed frame", "silence / non-speech", "loudness"
BY_CLIP_RULE = "held out when the first byte of sha1(clip_id) is odd"
STATE_FORMAT = 1  # of LabelCollector.state()


class AlignmentError(FreudError, ValueError):
    """Alignments table with missing columns or unknown tiers."""


def interval_frames(start_s, end_s) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose centre lies in [start_s, end_s): range(first, stop). Scalars or arrays."""
    def to_frame(t):  # first frame whose centre is at or after t (1e-9: times given on a frame boundary)
        return np.maximum(np.ceil(np.asarray(t) / FRAME_SECONDS - 0.5 - 1e-9), 0).astype(np.int64)

    return to_frame(start_s), to_frame(end_s)


def clip_heldout(clip_id: str) -> bool:
    """The by-clip rule: held out when the first byte of sha1(clip_id) is odd. About half the clips, unrelated to
    their names, and decided per clip: clips added later move no other."""
    return bool(hashlib.sha1(str(clip_id).encode()).digest()[0] & 1)


def heldout_split(clip_ids: Iterable[str], manifest: pd.DataFrame | None = None,
                  heldout_speakers: Iterable[str] | None = None, *,
                  split: dict[str, Any] | None = None) -> tuple[frozenset[str], dict[str, Any]]:
    """(held-out clip ids, description) for label validation.

    With `heldout_speakers`, or when the manifest's `speaker` column names two or more speakers among the clips,
    whole speakers are held out: by default, ordered by clip count (most first, then by name), every third one
    starting with the second (two speakers: the smaller one; more voices simply join the rotation). Otherwise
    `clip_heldout` decides each clip. `split`: an earlier description to follow (clips added to a set): its
    held-out speakers, which need no clips here, or the by-clip rule."""
    if split is not None and heldout_speakers is not None:
        raise AlignmentError("give heldout_speakers or split (an earlier split_info), not both")
    clip_ids = sorted({str(c) for c in clip_ids})
    speaker_of: dict[str, str] = {}
    if manifest is not None and {"clip_id", "speaker"} <= set(manifest.columns):
        known = manifest.dropna(subset=["speaker"])
        speaker_of = dict(zip(known["clip_id"].astype(str), known["speaker"].astype(str)))
    counts = Counter(speaker_of[c] for c in clip_ids if c in speaker_of)
    if split is not None:
        if split.get("heldout_by") not in ("speaker", "clip") or (split["heldout_by"] == "speaker"
                                                                  and not split.get("heldout_speakers")):
            raise AlignmentError(f"split must be a split_info, heldout_by 'speaker' or 'clip'; got {split!r}")
        held = set(split.get("heldout_speakers", ())) if split["heldout_by"] == "speaker" else set()
    elif heldout_speakers is not None:
        held = set(map(str, heldout_speakers))
        if not held & set(counts):
            raise AlignmentError(f"held-out speaker(s) {sorted(held)} have no aligned clips; "
                                 f"speakers with aligned clips: {sorted(counts) or 'none'}")
    elif len(counts) >= 2:
        ordered = sorted(counts, key=lambda s: (-counts[s], s))
        held = {s for i, s in enumerate(ordered) if i % 3 == 1}
    else:
        held = set()
    if held:
        heldout = frozenset(c for c in clip_ids if speaker_of.get(c) in held)
        info = {"heldout_by": "speaker", "train_speakers": sorted(set(counts) - held),
                "heldout_speakers": sorted(held if split is not None else held & set(counts))}
    else:
        heldout = frozenset(filter(clip_heldout, clip_ids))
        info = {"heldout_by": "clip", "heldout_rule": BY_CLIP_RULE, "speakers": sorted(counts)}
    info.update(n_train_clips=len(clip_ids) - len(heldout), n_heldout_clips=len(heldout))
    return heldout, info


@dataclass
class LabelResult:
    phones: list[str]
    label: list[str | None]  # per feature
    kind: list[str | None]  # "phone", "class", "artefact" or None (unlabelled)
    reason: list[str | None]  # the evidence, or why there is no label
    precision: np.ndarray  # training peaks on the label
    recall: np.ndarray
    f1: np.ndarray
    lift: np.ndarray
    p_value: np.ndarray  # Bonferroni-adjusted
    base_rate: np.ndarray
    n_peaks: np.ndarray  # training peaks
    heldout_precision: np.ndarray
    heldout_n: np.ndarray
    word_label: list[str | None]
    word_precision: np.ndarray
    threshold: np.ndarray  # recall threshold per feature
    summary: dict[str, Any] = field(default_factory=dict)


class _Peaks:
    """Streaming top-K clips per feature by peak, with what lies under each peak: exactly the K best by (peak
    descending, clip order ascending), whichever way they arrived (`update` in clip order, or `merged`)."""

    FIELDS = ("peak", "order", "phone", "word", "frame", "from_end", "loud")
    EMPTY = np.iinfo(np.int64).max  # the clip order of an empty slot: last
    DTYPES = {"peak": np.float32, "order": np.int64, "phone": np.int32, "word": np.int32, "frame": np.int32,
              "from_end": np.int32, "loud": bool}

    def __init__(self, n_features: int, k: int):
        self.peak = np.full((n_features, k), -np.inf, self.DTYPES["peak"])
        self.order = np.full((n_features, k), self.EMPTY, self.DTYPES["order"])  # the clip's place in the pass
        self.phone = np.full((n_features, k), -1, self.DTYPES["phone"])
        self.word = np.full((n_features, k), -1, self.DTYPES["word"])
        self.frame = np.zeros((n_features, k), self.DTYPES["frame"])
        self.from_end = np.zeros((n_features, k), self.DTYPES["from_end"])
        self.loud = np.zeros((n_features, k), self.DTYPES["loud"])
        self.weakest = np.full(n_features, -np.inf, np.float32)
        self.weakest_slot = np.zeros(n_features, np.int64)

    @classmethod
    def of(cls, *, copy: bool = True, **fields: np.ndarray) -> _Peaks:
        """From its arrays (`FIELDS`, each [n_features, k]): copies, or (copy=False) the arrays themselves where
        their dtype is right (arrays nothing else holds, fresh from a ranking)."""
        out = cls.__new__(cls)
        for name in cls.FIELDS:
            setattr(out, name, np.array(fields[name], cls.DTYPES[name]) if copy else
                    np.asarray(fields[name], cls.DTYPES[name]))
        n = len(out.peak)
        out.weakest, out.weakest_slot = np.empty(n, np.float32), np.empty(n, np.int64)
        out._find_weakest(np.arange(n))
        return out

    def _find_weakest(self, features: np.ndarray) -> None:
        """The slot to evict: the weakest peak, among equal ones the latest clip (empty slots first)."""
        peak, order = self.peak[features], self.order[features]
        weakest = peak.min(axis=1) if peak.shape[1] else np.full(len(features), np.inf, np.float32)
        slot = np.where(peak == weakest[:, None], order, -1).argmax(axis=1) if peak.shape[1] else 0
        self.weakest[features], self.weakest_slot[features] = weakest, slot

    def update(self, score: np.ndarray, order: int, phone: np.ndarray, word: np.ndarray, frame: np.ndarray,
               n_frames: int, loud: np.ndarray):
        """One clip, later in order than every clip kept: it enters only above the weakest peak."""
        features = np.flatnonzero(score > self.weakest)  # -inf scores (no peak) never enter
        if not features.size:
            return
        slots = self.weakest_slot[features]
        self.peak[features, slots] = score[features]
        self.order[features, slots] = order
        self.phone[features, slots] = phone[features]
        self.word[features, slots] = word[features]
        self.frame[features, slots] = frame[features]
        self.from_end[features, slots] = n_frames - 1 - frame[features]
        self.loud[features, slots] = loud[features]
        self._find_weakest(features)

    def fields(self, offset: int = 0, phone_map: np.ndarray | None = None,
               word_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Its arrays; clip orders `offset` places later, phone and word codes mapped (`_remap`) when given."""
        out = {name: getattr(self, name) for name in self.FIELDS}
        if offset:
            out["order"] = np.where(self.order == self.EMPTY, self.EMPTY, self.order + offset)
        if phone_map is not None:
            out["phone"] = _remap(self.phone, phone_map)
        if word_map is not None:
            out["word"] = _remap(self.word, word_map)
        return out

    @classmethod
    def best(cls, k: int, *parts: dict[str, np.ndarray]) -> _Peaks:
        """The top k slots of `parts` (`fields`, side by side), each row in rank order (peak descending, clip order
        ascending, empty slots last)."""
        fields = {name: np.concatenate([part[name] for part in parts], axis=1) for name in cls.FIELDS}
        rank = np.lexsort((fields["order"], -fields["peak"]), axis=1)[:, :k]
        return cls.of(copy=False, **{name: np.take_along_axis(a, rank, axis=1) for name, a in fields.items()})

    @classmethod
    def merged(cls, k: int, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> _Peaks:
        """`best(k, a, b)`, ranking again only the rows where one of b's peaks enters: one above the row's weakest
        of a (b's clips come after a's, so an equal peak stays out; an empty slot is -inf, so a row that is not full
        takes any). A batch of a few clips reaches a few features' top K; the other rows are a's, ranked (as a merge
        leaves them: then copied as they are)."""
        if not k:
            return cls.best(k, a, b)
        ranked = None if _is_ranked(a["peak"], a["order"]) else cls.best(k, a)
        weakest = (a["peak"] if ranked is None else ranked.peak)[:, -1:]
        touched = np.flatnonzero((b["peak"] > weakest).any(axis=1))
        if touched.size == len(weakest):  # every row (lists not full yet): one ranking of both
            return cls.best(k, a, b)
        out = cls.of(**a) if ranked is None else ranked
        if touched.size:
            part = cls.best(k, {n: v[touched] for n, v in a.items()}, {n: v[touched] for n, v in b.items()})
            for name in cls.FIELDS:
                getattr(out, name)[touched] = getattr(part, name)
            out._find_weakest(touched)
        return out

    def ranked(self) -> _Peaks:
        """These peaks in rank order: what `result` reads, the same however the slots were filled (itself when
        already ranked, as a merge leaves them; a copy otherwise)."""
        if _is_ranked(self.peak, self.order):
            return self
        return self.best(self.peak.shape[1], self.fields())

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.peak)


def _is_ranked(peak: np.ndarray, order: np.ndarray) -> bool:
    """Every row in rank order: peak descending, clip order ascending among equal peaks (empty slots last)."""
    return bool(((peak[:, 1:] < peak[:, :-1]) | ((peak[:, 1:] == peak[:, :-1]) & (order[:, 1:] >= order[:, :-1]))).all())


class LabelCollector:
    """A mining observer (`mine_features(..., observers=[collector])`); `result()` after the pass.

    manifest / heldout_speakers / split: how clips are held out (`heldout_split`; split: an earlier collector's
    `split_info`, for clips to be merged with its). fire_threshold: a clip whose maximum does not exceed it gives
    the feature no peak. loudness: clip id -> that clip's level per frame in dB (None: unknown, no loud frames);
    without it the loudness artefact is not tested. seed: of the recall sample's priorities.

    `state()` / `from_state` keep what the pass gathered; `merge` unites two collectors' clips. A restored or
    merged collector gives `result()` and merges again, but observes no more clips (it has no alignments)."""

    def __init__(self, alignments: pd.DataFrame, n_features: int, top_k: int = 32,
                 occurrences_per_phone: int = 64, seed: int = 0, *, manifest: pd.DataFrame | None = None,
                 heldout_speakers: Iterable[str] | None = None, fire_threshold: float = 0.0,
                 loudness: Callable[[str], np.ndarray | None] | None = None, split: dict[str, Any] | None = None):
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
        self._rows: dict[str, tuple[int, int]] | None = {clip_ids[a]: (a, b) for a, b in zip(firsts, lasts)}
        self.heldout, split_info = heldout_split(self._rows, manifest, heldout_speakers, split=split)
        self.loudness = loudness
        self._empty(n_features, top_k, occurrences_per_phone, seed, fire_threshold, loudness is not None,
                    self.phones, self.words, {**split_info, "n_train_clips": 0, "n_heldout_clips": 0})

    def _empty(self, n_features: int, top_k: int, per_phone: int, seed: int, fire_threshold: float,
               loudness_tested: bool, phones: list[str], words: list[str], split_info: dict[str, Any],
               peaks: bool = True) -> None:
        """Settings, vocabularies and empty accumulators (also of restored and merged collectors; peaks=False
        leaves the peaks, `train` and `held`, to the caller)."""
        self.n_features, self.top_k, self.per_phone = int(n_features), int(top_k), int(per_phone)
        self.seed, self.fire_threshold, self.loudness_tested = int(seed), float(fire_threshold), bool(loudness_tested)
        self.phones, self.words, self.split_info = list(phones), list(words), dict(split_info)
        if peaks:
            self.train, self.held = _Peaks(self.n_features, self.top_k), _Peaks(self.n_features, self.top_k)
        # The recall sample: per phone, the occurrence maxima [per_phone, n_features] with the smallest priorities,
        # the first min(seen, per_phone) rows filled.
        self.reservoir: dict[int, np.ndarray] = {}
        self.priority: dict[int, np.ndarray] = {}  # [per_phone] uint64, beside each reservoir
        self.seen = np.zeros(len(self.phones), np.int64)
        # Base rates, over the training clips' frames.
        self.phone_frames = np.zeros(len(self.phones), np.int64)
        self.word_frames = np.zeros(len(self.words), np.int64)
        self.frames = self.silent_frames = self.onset_frames = self.end_frames = self.loud_frames = 0
        self.frames_at = np.zeros(0, np.int64)  # training clips with at least t + 1 frames, per t
        self.n_aligned_clips = 0  # also the clip order of the next one

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

    def _loud(self, clip_id: str, n_frames: int) -> np.ndarray:
        """Per frame: among the clip's loudest LOUD_SHARE of frames (levels cut or padded to n_frames; frames
        without a level, and every frame of a clip whose level is unknown, are not loud)."""
        out = np.zeros(n_frames, bool)
        level = self.loudness(clip_id) if self.loudness is not None else None
        if level is None:
            return out
        level = np.asarray(level, np.float64).ravel()[:n_frames]
        if level.size and np.isfinite(level).all():
            out[: level.size] = (level >= np.quantile(level, 1 - LOUD_SHARE)) & (level > level.min())
        return out

    def observe(self, clip_id: str, acts: Any) -> None:
        if self._rows is None:
            raise RuntimeError("this LabelCollector was restored from a state or merged: it has no alignments and "
                               "observes no clips; collect new clips in a new collector (split=this.split_info) "
                               "and merge it")
        clip_id = str(clip_id)
        if clip_id not in self._rows:
            return
        if is_torch_tensor(acts):
            acts = acts.float().cpu().numpy()
        acts = np.asarray(acts, dtype=np.float32)
        order = self.n_aligned_clips
        self.n_aligned_clips += 1
        n_frames = acts.shape[0]
        phones, phone_first, phone_stop, phone_mid = self._intervals(clip_id, phones=True)
        words, word_first, word_stop, _ = self._intervals(clip_id, phones=False)
        phone_of_frame = self._frame_labels(phones, phone_first, phone_stop, n_frames)
        peak = acts.max(axis=0)
        frame = first_frame_of(acts, peak, largest=True)
        word_of_frame = self._frame_labels(words, word_first, word_stop, n_frames)
        word_at = word_of_frame[frame]
        score = np.where(peak > self.fire_threshold, peak, -np.inf).astype(np.float32)
        loud = self._loud(clip_id, n_frames)
        held = clip_id in self.heldout
        self.split_info["n_heldout_clips" if held else "n_train_clips"] += 1  # clips observed, not in the table
        (self.held if held else self.train).update(score, order, phone_of_frame[frame], word_at, frame, n_frames,
                                                   loud[frame])
        if held:
            return
        self._count_frames(phone_of_frame, word_of_frame, loud)
        for i, (phone, a, b, mid) in enumerate(zip(phones, phone_first, phone_stop, phone_mid)):
            if a >= b:  # shorter than a frame, no frame centre inside: the frame holding its midpoint
                a, b = mid, mid + 1
            if a < n_frames:
                self._sample(phone, _priority(self.seed, clip_id, i, self.phones[phone], a), acts, a, b)

    def _count_frames(self, phone_of_frame: np.ndarray, word_of_frame: np.ndarray, loud: np.ndarray) -> None:
        n = len(phone_of_frame)
        self.frames += n
        self.phone_frames += np.bincount(phone_of_frame[phone_of_frame >= 0], minlength=len(self.phones))
        self.word_frames += np.bincount(word_of_frame[word_of_frame >= 0], minlength=len(self.words))
        self.silent_frames += int((phone_of_frame < 0).sum())
        self.loud_frames += int(loud.sum())
        self.onset_frames += min(n, ONSET_FRAMES)
        self.end_frames += min(n, ONSET_FRAMES)
        if n > len(self.frames_at):
            self.frames_at = np.r_[self.frames_at, np.zeros(n - len(self.frames_at), np.int64)]
        self.frames_at[:n] += 1

    def _sample(self, phone: int, priority: np.uint64, acts: np.ndarray, a: int, b: int) -> None:
        """Priority (bottom-k) sampling: a phone keeps its occurrences of smallest priority, a hash, i.e. a uniform
        sample; the smallest of two samples' union is the sample of both (`merge`). acts[a:b]: the occurrence."""
        seen = self.seen[phone]
        self.seen[phone] += 1
        if phone not in self.reservoir:
            self.reservoir[phone] = np.zeros((self.per_phone, self.n_features), np.float16)
            self.priority[phone] = np.zeros(self.per_phone, np.uint64)
        priorities = self.priority[phone]
        slot = seen if seen < self.per_phone else int(priorities.argmax()) if self.per_phone else None
        if slot is not None and (seen < self.per_phone or priority < priorities[slot]):
            self.reservoir[phone][slot] = acts[a:b].max(axis=0)
            priorities[slot] = priority

    # ------------------------------------------------------------ state and merging

    _SETTINGS = ("n_features", "top_k", "per_phone", "fire_threshold", "seed", "loudness_tested")
    _COUNTS = ("frames", "silent_frames", "onset_frames", "end_frames", "loud_frames", "n_aligned_clips")
    _VECTORS = ("seen", "phone_frames", "word_frames", "frames_at")

    def state(self) -> dict[str, np.ndarray]:
        """What the pass gathered, as numpy arrays only (np.savez; np.load(..., allow_pickle=False) reads it back):
        settings and counts as 0-d arrays, vocabularies as string arrays, split_info as a JSON string, the peaks
        (train_* and held_*, `_Peaks.FIELDS`, each row in rank order) and the recall sample (reservoir [phones,
        per_phone, n_features]: a `state_file.Stacked` of the phones' samples, which np.asarray stacks;
        reservoir_priority, reservoir_phones). `from_state` restores it."""
        phones = sorted(self.reservoir)
        out = {"format": np.array(STATE_FORMAT), "phones": np.array(self.phones, dtype=str),
               "words": np.array(self.words, dtype=str), "split_info": np.array(json.dumps(self.split_info)),
               **{name: np.array(getattr(self, name)) for name in self._SETTINGS + self._COUNTS + self._VECTORS},
               "reservoir_phones": np.array(phones, np.int32),
               "reservoir": Stacked([self.reservoir[p] for p in phones], (self.per_phone, self.n_features),
                                    np.float16),
               "reservoir_priority": (np.stack([self.priority[p] for p in phones]) if phones
                                      else np.zeros((0, self.per_phone), np.uint64))}
        # The peaks in rank order (what `result` reads): a merge then ranks only what it changes. Copies unless this
        # collector observes no more clips (restored or merged: nothing changes its arrays).
        keep = np.asarray if self._rows is None else np.array
        for side in ("train", "held"):
            out.update({f"{side}_{name}": keep(a) for name, a in getattr(self, side).ranked().fields().items()})
        return out

    @classmethod
    def from_state(cls, state: Any, *, loudness: Callable[[str], np.ndarray | None] | None = None) -> LabelCollector:
        """The collector a `state()` describes (a dict, or np.load's NpzFile of one): it gives `result()` and
        merges; it observes no clips. loudness: kept as `loudness` for the caller; whether the loudness
        artefact is tested comes from the state."""
        missing = [key for key in ("format", "split_info", *cls._SETTINGS, *cls._COUNTS) if key not in state]
        if missing or int(state["format"]) != STATE_FORMAT:
            raise AlignmentError(f"not a LabelCollector state (format {STATE_FORMAT}): missing {missing or 'none'}, "
                                 f"format {state['format'] if 'format' in state else None}")
        settings = {name: state[name].item() for name in cls._SETTINGS}
        out = cls._bare(**settings, phones=[str(x) for x in state["phones"]], words=[str(x) for x in state["words"]],
                        split_info=json.loads(str(state["split_info"])), loudness=loudness)
        for name in cls._COUNTS:
            setattr(out, name, int(state[name]))
        for name in cls._VECTORS:
            setattr(out, name, np.array(state[name], np.int64))
        for side in ("train", "held"):  # views too where the dtypes match: nothing changes a restored collector's peaks
            setattr(out, side, _Peaks.of(copy=False, **{name: state[f"{side}_{name}"] for name in _Peaks.FIELDS}))
        for i, phone in enumerate(np.asarray(state["reservoir_phones"]).tolist()):  # views, not copies: a restored
            out.reservoir[phone] = np.asarray(state["reservoir"][i], np.float16)  # collector's sample is only read
            out.priority[phone] = np.asarray(state["reservoir_priority"][i], np.uint64)
        return out

    @classmethod
    def _bare(cls, *, loudness: Callable[[str], np.ndarray | None] | None = None, **settings: Any) -> LabelCollector:
        """A collector without alignments (restored or merged), its accumulators empty but for the peaks, which the
        caller sets (`train`, `held`)."""
        out = cls.__new__(cls)
        out._rows, out.heldout, out.loudness = None, None, loudness  # heldout: the clip ids are not kept
        out._empty(settings["n_features"], settings["top_k"], settings["per_phone"], settings["seed"],
                   settings["fire_threshold"], settings["loudness_tested"], settings["phones"], settings["words"],
                   settings["split_info"], peaks=False)
        return out

    def merge(self, other: LabelCollector) -> LabelCollector:
        """A new collector (neither input changes; it may share arrays with them) as if one had observed this one's
        clips, then `other`'s: the same result(), exactly, when `other` was built with split=self.split_info and each
        collector's alignments were the rows of its own clips. Vocabularies are united by name (codes remapped),
        peaks ranked together (`other`'s clips come after these), counts added, recall samples merged by priority.
        AlignmentError when the settings or the held-out rules differ."""
        for name in self._SETTINGS:
            if getattr(self, name) != getattr(other, name):
                raise AlignmentError(f"cannot merge label collectors with different {name}: "
                                     f"{getattr(self, name)!r} and {getattr(other, name)!r}")
        phones, pa, pb = _vocabulary(self.phones, other.phones)
        words, wa, wb = _vocabulary(self.words, other.words)
        out = self._bare(**{name: getattr(self, name) for name in self._SETTINGS}, phones=phones, words=words,
                         split_info=_merged_split(self.split_info, other.split_info), loudness=self.loudness)
        offset = self.n_aligned_clips
        out.train = _Peaks.merged(self.top_k, self.train.fields(0, pa, wa), other.train.fields(offset, pb, wb))
        out.held = _Peaks.merged(self.top_k, self.held.fields(0, pa, wa), other.held.fields(offset, pb, wb))
        for name in self._COUNTS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name, a, b in (("seen", pa, pb), ("phone_frames", pa, pb), ("word_frames", wa, wb)):
            getattr(out, name)[a] += getattr(self, name)
            getattr(out, name)[b] += getattr(other, name)
        out.frames_at = np.zeros(max(len(self.frames_at), len(other.frames_at)), np.int64)
        out.frames_at[: len(self.frames_at)] += self.frames_at
        out.frames_at[: len(other.frames_at)] += other.frames_at
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for collector, codes in ((self, pa), (other, pb)):
            for phone, sample in collector.reservoir.items():
                kept = min(int(collector.seen[phone]), self.per_phone)
                parts.setdefault(int(codes[phone]), []).append((sample[:kept], collector.priority[phone][:kept]))
        for phone, both in parts.items():
            (sample, priority), *rest = both
            if len(priority) == self.per_phone and (
                    not rest or (len(rest[0][1]) == 0 or rest[0][1].min() >= priority.max())
                    and bool((priority[:-1] <= priority[1:]).all())):
                # One side only, full: its sample as it is; or a full first side, in priority order, that every
                # draw of the second follows (ties go to the first): the same rows as ranking both.
                out.reservoir[phone], out.priority[phone] = sample, priority
                continue
            priority = np.concatenate([p for _, p in both])
            keep = np.argsort(priority, kind="stable")[: self.per_phone]
            sample = np.zeros((self.per_phone, self.n_features), np.float16)
            start = 0
            for rows, _ in both:  # each kept row straight from its sample (no stacked copy of both)
                mine = (keep >= start) & (keep < start + len(rows))
                sample[np.flatnonzero(mine)] = rows[keep[mine] - start]
                start += len(rows)
            out.reservoir[phone] = sample
            out.priority[phone] = np.zeros(self.per_phone, np.uint64)
            out.priority[phone][: len(keep)] = priority[keep]
        return out

    # ------------------------------------------------------------ the verdict

    def _candidates(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(names, kinds, members [n_phones, C] bool, base rates [C]) of phones and classes seen in training."""
        n_phones = len(self.phones)
        classes = [(name, members) for name, members in PHONE_CLASSES.items()
                   if len(members & set(self.phones)) >= 2]
        members = np.zeros((n_phones, n_phones + len(classes)), bool)
        members[np.arange(n_phones), np.arange(n_phones)] = True
        for j, (_, phones) in enumerate(classes):
            members[[i for i, p in enumerate(self.phones) if p in phones], n_phones + j] = True
        base = (self.phone_frames @ members) / max(self.frames, 1)
        keep = base > 0
        names = [*self.phones, *(name for name, _ in classes)]
        kinds = ["phone"] * n_phones + ["class"] * len(classes)
        return ([n for n, k in zip(names, keep) if k], [c for c, k in zip(kinds, keep) if k], members[:, keep],
                base[keep])

    def _artefacts(self, train: _Peaks, held: _Peaks, n: np.ndarray, m: int) -> dict[str, dict[str, np.ndarray]]:
        """Per artefact test: hits, base rate, adjusted p, held-out hits (and the frame, for a fixed frame)."""
        valid, held_valid = train.valid, held.valid
        frames = max(self.frames, 1)
        tests = {
            ONSET: (valid & (train.frame < ONSET_FRAMES), self.onset_frames / frames, m,
                    held_valid & (held.frame < ONSET_FRAMES)),
            END: (valid & (train.from_end < ONSET_FRAMES), self.end_frames / frames, m,
                  held_valid & (held.from_end < ONSET_FRAMES)),
            SILENT: (valid & (train.phone < 0), self.silent_frames / frames, m, held_valid & (held.phone < 0)),
        }
        # Fixed frame: the commonest peak frame past the onset; chosen among every position, so tested for each.
        mode = _row_modes(np.where(valid & (train.frame >= ONSET_FRAMES), train.frame, -1 - np.arange(self.top_k)))
        at = np.clip(mode, 0, max(len(self.frames_at) - 1, 0))
        base_fixed = np.where(mode >= 0, self.frames_at[at] / frames if len(self.frames_at) else 0.0, 1.0)
        tests[FIXED] = (valid & (train.frame == mode[:, None]), base_fixed, m * max(len(self.frames_at), 1),
                        held_valid & (held.frame == mode[:, None]))
        if self.loudness_tested:
            tests[LOUD] = (valid & train.loud, self.loud_frames / frames, m, held_valid & held.loud)
        out = {}
        for name, (hits, base, tested, held_hits) in tests.items():
            k = hits.sum(axis=1)
            out[name] = {"k": k, "base": np.broadcast_to(base, k.shape).astype(np.float64),
                         "p": p_values(k, n, np.broadcast_to(base, k.shape), tested),
                         "held": held_hits.sum(axis=1), "mode": mode}
        return out

    def result(self) -> LabelResult:
        n_features, n_phones = self.n_features, len(self.phones)
        train, held = self.train.ranked(), self.held.ranked()  # the fixed frame's ties go to the stronger peak
        valid, held_valid = train.valid, held.valid
        n, n_held = valid.sum(axis=1), held_valid.sum(axis=1)
        names, kinds, members, base = self._candidates()
        m = len(names) + (5 if self.loudness_tested else 4)  # phone and class candidates, artefact tests
        phone_counts = _row_counts(np.where(valid, train.phone, -1), n_phones)
        hits = (phone_counts.astype(np.float64) @ members).astype(np.int64)  # [F, C]; exact (counts <= top_k), BLAS
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = hits / n[:, None]
            lift = precision / base
        # p only where the other rules hold (the binomial tail is the costly part), then for each feature's chosen
        # candidate, the one its reason names.
        eligible = (n[:, None] >= MIN_SUPPORT) & (lift >= MIN_LIFT) & (precision >= MIN_PRECISION)
        p = np.full(hits.shape, np.nan)
        rows, columns = np.nonzero(eligible)
        p[rows, columns] = p_values(hits[rows, columns], n[rows], base[columns], m)
        score = _kl_bits(np.nan_to_num(precision), base[None, :])
        passing = eligible & (p < ALPHA)
        best = np.where(passing, score, -np.inf).argmax(axis=1) if names else np.zeros(n_features, np.int64)
        labelled = passing.any(axis=1) if names else np.zeros(n_features, bool)
        runner_up = np.nan_to_num(score, nan=-np.inf).argmax(axis=1) if names else best
        chosen = np.where(labelled, best, runner_up)
        if names:
            rows = np.flatnonzero(np.isnan(p[np.arange(n_features), chosen]))
            p[rows, chosen[rows]] = p_values(hits[rows, chosen[rows]], n[rows], base[chosen[rows]], m)

        artefacts = self._artefacts(train, held, n, m)
        artefact = np.full(n_features, None, object)
        at_edge = np.zeros(n_features, bool)  # half the peaks at a clip's start or end: never a phone label
        for name, test in artefacts.items():  # in order of precedence
            share = test["k"] / np.maximum(n, 1)
            found = ((artefact == None) & (n >= MIN_SUPPORT)  # noqa: E711 - elementwise on an object array
                     & (test["p"] < ALPHA) & (share >= ARTEFACT_SHARE))
            if name == LOUD:  # yields to the phones and classes (vowels are loud), see the module doc
                found &= ~labelled
            artefact[found] = name
            if name in (ONSET, END):
                at_edge |= (n > 0) & (share >= ARTEFACT_SHARE)
        labelled &= ~at_edge

        # Held-out hits of the chosen phone / class.
        in_label = np.zeros((n_features, n_phones + 1), bool)  # column 0: silence
        if names:
            in_label[:, 1:] = members[:, chosen].T
        held_hits = np.take_along_axis(in_label, np.where(held_valid, held.phone + 1, 0), axis=1) & held_valid
        held_k = held_hits.sum(axis=1).astype(np.float64)

        threshold = self._recall_threshold(train)
        recall = self._recall(members[:, chosen].T if names else np.zeros((n_features, n_phones), bool), threshold)
        out = {key: np.full(n_features, np.nan) for key in ("precision", "lift", "p", "base", "held")}
        label, kind, reason = [None] * n_features, [None] * n_features, [None] * n_features
        n_list = n.tolist()
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, test in artefacts.items():
                rows = np.flatnonzero(artefact == name)
                k, q = test["k"][rows], test["base"][rows]
                out["precision"][rows], out["base"][rows], out["p"][rows] = k / n[rows], q, test["p"][rows]
                out["lift"][rows] = np.where(q > 0, k / n[rows] / q, np.inf)
                out["held"][rows] = np.where(n_held[rows] > 0, test["held"][rows] / n_held[rows], np.nan)
                modes = test["mode"][rows].tolist()
                for f, k_f, q_f, mode in zip(rows.tolist(), k.tolist(), q.tolist(), modes):
                    label[f], kind[f] = (f"{FIXED} {int(mode)}" if name == FIXED else name), "artefact"
                    reason[f] = f"{k_f} of {n_list[f]} training peaks {_WHERE[name]} (chance {q_f:.3f})"
            rows = np.flatnonzero(labelled & (artefact == None))  # noqa: E711 - elementwise on an object array
            c = chosen[rows]
            out["precision"][rows], out["lift"][rows], out["p"][rows], out["base"][rows] = \
                precision[rows, c], lift[rows, c], p[rows, c], base[c]
            out["held"][rows] = np.where(n_held[rows] > 0, held_k[rows] / n_held[rows], np.nan)
        phones_of = {name: f" ({'/'.join(sorted(PHONE_CLASSES[name] & set(self.phones)))})"
                     for name, what in zip(names, kinds) if what == "class"}
        for f, c_f, hits_f in zip(rows.tolist(), c.tolist(), hits[rows, c].tolist()):
            label[f], kind[f] = names[c_f], kinds[c_f]
            reason[f] = (f"{hits_f} of {n_list[f]} training peaks on {names[c_f]}{phones_of.get(names[c_f], '')} "
                         f"(base rate {base[c_f]:.3f})")
        rest = np.flatnonzero((artefact == None) & ~labelled)  # noqa: E711
        for f, c_f in zip(rest.tolist(), chosen[rest].tolist()):
            if at_edge[f]:
                reason[f] = "half or more of its training peaks sit at a clip's first or last 100 ms"
            elif n_list[f] < MIN_SUPPORT:
                reason[f] = f"only {n_list[f]} training peak(s) above the fire threshold (needs {MIN_SUPPORT})"
            elif names:
                reason[f] = (f"no phone or class clearly above chance (best: {names[c_f]}, precision "
                             f"{precision[f, c_f]:.2f}, lift {lift[f, c_f]:.1f}, p {p[f, c_f]:.2g})")
        is_label = np.array([k in ("phone", "class") for k in kind], bool)
        recall = np.where(is_label, recall, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(out["precision"] + recall > 0,
                          2 * out["precision"] * recall / (out["precision"] + recall), 0.0)
        f1 = np.where(is_label, f1, np.nan)
        best_word, word_precision, word_ok = self._word_labels(train, n, np.array([k != "artefact" for k in kind]))
        validated = is_label & (n_held >= MIN_SUPPORT) & (np.nan_to_num(out["held"]) >= VALIDATED_PRECISION)
        return LabelResult(
            phones=self.phones, label=label, kind=kind, reason=reason,
            precision=out["precision"].astype(np.float32), recall=recall.astype(np.float32),
            f1=f1.astype(np.float32), lift=out["lift"].astype(np.float32), p_value=out["p"],
            base_rate=out["base"].astype(np.float32), n_peaks=n.astype(np.int32),
            heldout_precision=out["held"].astype(np.float32), heldout_n=n_held.astype(np.int32),
            word_label=[self.words[w] if ok else None for w, ok in zip(best_word, word_ok)],
            word_precision=word_precision.astype(np.float32),
            threshold=threshold.astype(np.float32),
            summary=self._summary(label, kind, artefact, out["held"], f1, is_label, validated, list(artefacts),
                                  _shuffled_validated(in_label & is_label[:, None], held, n_held)),
        )

    def _word_labels(self, train: _Peaks, n: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, ...]:
        """(word id, precision, shown) per feature: the commonest word under the training peaks, shown under the
        same rule as phones (Bonferroni over the words seen, lift and precision), never for artefacts."""
        n_features = len(n)
        if not self.words:
            return np.zeros(n_features, np.int64), np.full(n_features, np.nan), np.zeros(n_features, bool)
        best, k = _commonest(np.where(train.valid, train.word, -1))
        base = self.word_frames[best] / max(self.frames, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = k / n
            lift = precision / base
        p = p_values(k, n, base, int((self.word_frames > 0).sum()))
        shown = allowed & (n >= MIN_SUPPORT) & (k > 0) & (p < ALPHA) & (lift >= MIN_LIFT) & (precision >= MIN_PRECISION)
        return best, np.where(shown, precision, np.nan), shown

    @staticmethod
    def _recall_threshold(train: _Peaks) -> np.ndarray:
        with warnings.catch_warnings():  # features without training peaks: all-NaN rows, threshold 0
            warnings.simplefilter("ignore", RuntimeWarning)
            threshold = 0.5 * np.nanmedian(np.where(train.valid, train.peak, np.nan), axis=1)
        return np.nan_to_num(threshold, nan=0.0)

    def _recall(self, label_phones: np.ndarray, threshold: np.ndarray) -> np.ndarray:
        """Share of the label's sampled occurrences (phones weighted by how often they occur) above threshold."""
        fired = np.zeros((len(self.phones), self.n_features), np.float32)
        for phone, sample in self.reservoir.items():
            kept = min(self.seen[phone], self.per_phone)
            fired[phone] = _above(sample[:kept], threshold).mean(axis=0)
        weights = label_phones * self.seen[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights * fired.T).sum(axis=1) / weights.sum(axis=1)

    def _summary(self, label, kind, artefact, heldout, f1, is_label, validated, tested, chance) -> dict[str, Any]:
        n_features = self.n_features
        share = float(validated.sum() / max(n_features, 1))
        good = is_label & (np.nan_to_num(f1) >= F1_GOOD)
        held_of_labels = heldout[is_label & np.isfinite(heldout)]
        return {
            "n_aligned_clips": self.n_aligned_clips,
            **self.split_info,
            "n_labelled": int(is_label.sum()),
            "n_phone_labels": int(sum(k == "phone" for k in kind)),
            "n_class_labels": int(sum(k == "class" for k in kind)),
            "n_artefacts": int(sum(k == "artefact" for k in kind)),
            "artefacts": {name: int((artefact == name).sum()) for name in tested},  # the artefact tests run
            "n_validated": int(validated.sum()),
            "share_labelled": float(is_label.sum() / max(n_features, 1)),
            "share_validated": share,
            # The chance level of share_validated: the same held-out peaks with the labels permuted across features.
            "share_validated_chance": float(chance.mean()),
            "share_validated_chance_sd": float(chance.std()),
            "validated_over_chance": share / chance.mean() if chance.mean() > 0 else None,
            "median_heldout_precision": float(np.median(held_of_labels)) if held_of_labels.size else None,
            "n_f1_at_least_0_5": int(good.sum()),
            "phones_covered": sorted({label[f] for f in np.flatnonzero(good) if kind[f] == "phone"}),
            "classes_covered": sorted({label[f] for f in np.flatnonzero(good) if kind[f] == "class"}),
            "n_phones": len(self.phones),
            "rule": f"Bonferroni p < {ALPHA}, lift >= {MIN_LIFT}, precision >= {MIN_PRECISION}; validated: "
                    f"held-out precision >= {VALIDATED_PRECISION} over >= {MIN_SUPPORT} held-out peaks",
            "recall_threshold": "0.5 x median of the feature's top-K training peaks",
            "occurrences_per_phone": self.per_phone,
        }


_WHERE = {ONSET: "in the first 100 ms of their clip", END: "in the last 100 ms of their clip",
          FIXED: "at one frame", SILENT: "on silence (no phone)",
          LOUD: f"on the clip's loudest {LOUD_SHARE:.0%} of frames"}


def _shuffled_validated(label_rows: np.ndarray, held: _Peaks, n_held: np.ndarray, seeds: int = SHUFFLES) -> np.ndarray:
    """Chance level of the validated share, one value per seed: the phone/class labels (rows [F, 1 + n_phones] of
    the phones each label covers; column 0 silence, empty rows for unlabelled features) permuted across features,
    each scored on the held-out peaks of the feature it lands on. Training significance is not required of a
    permuted label (it would almost never hold), so this is a conservative, higher chance level."""
    rng = np.random.default_rng(0)
    columns = np.where(held.valid, held.phone + 1, 0)
    shares = []
    for _ in range(seeds):
        received = label_rows[rng.permutation(len(label_rows))]
        hits = (np.take_along_axis(received, columns, axis=1) & held.valid).sum(axis=1)
        ok = (n_held >= MIN_SUPPORT) & (hits >= VALIDATED_PRECISION * np.maximum(n_held, 1))
        shares.append(ok.mean() if len(ok) else 0.0)
    return np.asarray(shares, np.float64)


def _above(sample: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """sample [S, F] float16 > threshold [F], without converting the samples to float32 (the bulk of labelling a
    merge): x > t equals x > (the largest float16 <= t) for a float16 x, and float16s >= 0 order like their bits."""
    t = np.asarray(threshold, np.float64)
    if sample.dtype != np.float16:  # the bit order below holds for float16 only
        return np.asarray(sample, np.float64) > t
    with np.errstate(over="ignore"):  # beyond float16's range: +-inf, then the largest float16 below
        t16 = t.astype(np.float16)
    t16 = np.where(t16.astype(np.float64) > t, np.nextafter(t16, np.float16(-np.inf)), t16)
    bits, floor = sample.view(np.int16), t16.view(np.int16)
    above = (bits > floor) & (bits <= 0x7C00)  # above 0x7C00 (+inf): NaN, never above
    signed = floor < 0  # a threshold below +0: negative samples do not order like their bits, compared as floats
    if signed.any():
        above[:, signed] = sample[:, signed].astype(np.float32) > t[signed]
    return above


def p_values(k: np.ndarray, n: np.ndarray, q: np.ndarray, tested: int) -> np.ndarray:
    """Bonferroni-adjusted one-sided binomial p: min(1, tested x P(Binomial(n, q) >= k))."""
    # scipy.special, not scipy.stats: the same survival function (bdtrc(k - 1, n, q) = P(X >= k)) without a
    # second of importing scipy.stats; imported here because the query side imports this module and needs neither.
    from scipy.special import bdtrc

    k, n, q = np.broadcast_arrays(np.asarray(k), np.asarray(n), np.clip(np.asarray(q, np.float64), 0, 1))
    with np.errstate(invalid="ignore"):
        p = np.where(k > 0, bdtrc(np.maximum(k - 1, 0), n, q), 1.0)
    return np.minimum(1.0, tested * np.nan_to_num(p, nan=1.0))


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)) in bits, 0 log 0 = 0."""
    q = np.clip(q, 1e-12, 1 - 1e-12)
    p = np.broadcast_to(np.asarray(p, np.float64), np.broadcast_shapes(np.shape(p), q.shape))
    with np.errstate(invalid="ignore", divide="ignore"):  # in place: [features, candidates] temporaries add up
        inside = np.divide(p, q)
        np.log2(inside, out=inside)
        np.multiply(p, inside, out=inside)
        inside[~(p > 0)] = 0.0
        rest = np.subtract(1, p)
        outside = np.divide(rest, 1 - q)
        np.log2(outside, out=outside)
        np.multiply(rest, outside, out=outside)
        outside[~(rest > 0)] = 0.0  # p < 1
    return np.add(inside, outside, out=inside)


def _row_modes(values: np.ndarray, block: int = 1024) -> np.ndarray:
    """The commonest value of each row (the first in row order on ties), in blocks of rows ([B, K, K] each)."""
    out = np.empty(len(values), values.dtype)
    for a in range(0, len(values), block):
        rows = values[a : a + block]
        same = (rows[:, :, None] == rows[:, None, :]).sum(axis=2)
        out[a : a + block] = rows[np.arange(len(rows)), same.argmax(axis=1)]
    return out


def _commonest(ids: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """[F, K] label ids (-1 = none) -> (the commonest id of each row, the smallest of those tied; its count), 0 and 0
    for a row without ids: what `_row_counts(ids, n).argmax(axis=1)` picks, without its [F, n] counts (the words of
    a corpus: a thousand columns per feature). In blocks of rows ([B, K, K] each)."""
    best, count = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    for a in range(0, len(ids), block):
        rows = np.sort(ids[a : a + block], axis=1)  # ascending: among equal counts the first is the smallest id
        same = np.where(rows >= 0, (rows[:, :, None] == rows[:, None, :]).sum(axis=2), 0)
        at = same.argmax(axis=1)
        count[a : a + block] = same[np.arange(len(rows)), at]
        best[a : a + block] = np.where(count[a : a + block] > 0, rows[np.arange(len(rows)), at], 0)
    return best, count


def _row_counts(ids: np.ndarray, n_labels: int) -> np.ndarray:
    """[F, K] label ids (-1 = none) -> [F, n_labels] counts."""
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    flat = ids.ravel()
    keep = flat >= 0
    counts = np.zeros((ids.shape[0], max(n_labels, 1)), np.int64)
    np.add.at(counts, (rows[keep], flat[keep]), 1)
    return counts[:, :n_labels] if n_labels else counts[:, :0]


def _priority(seed: int, clip_id: str, i: int, phone: str, first: int) -> np.uint64:
    """A phone occurrence's sampling priority: a stable hash of the seed, its clip and its place there (its rank
    among the clip's phone intervals, its phone and first frame), the same whichever collector sees the clip."""
    key = f"{seed}\0{clip_id}\0{i}\0{phone}\0{first}".encode()
    return np.uint64(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def _remap(codes: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Codes (-1: none) into another vocabulary: code c becomes mapping[c]."""
    return np.append(np.asarray(mapping, np.int32), np.int32(-1))[codes]


def _vocabulary(a: list[str], b: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The sorted union of two vocabularies and where each one's codes go in it."""
    union = sorted(set(a) | set(b))
    at = {name: i for i, name in enumerate(union)}
    return union, np.array([at[x] for x in a], np.int32), np.array([at[x] for x in b], np.int32)


def _merged_split(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a`'s split with `b`'s clips (speaker lists united, clip counts added); AlignmentError when their held-out
    rules differ."""
    def rule(split: dict[str, Any]) -> tuple:
        by = split.get("heldout_by")
        return by, sorted(split.get("heldout_speakers", ())) if by == "speaker" else []

    if rule(a) != rule(b):
        raise AlignmentError(f"cannot merge label collectors with different held-out rules: {rule(a)} and "
                             f"{rule(b)}; build the second with split=<the first's split_info>")
    out = dict(a)
    for key in ("train_speakers", "speakers"):
        if key in out:
            out[key] = sorted(set(a[key]) | set(b.get(key, ())))
    for key in ("n_train_clips", "n_heldout_clips"):
        out[key] = a.get(key, 0) + b.get(key, 0)
    return out
