"""One streaming pass over per-clip activations: top-K / bottom-K clips per feature, statistics, sketches.

Input: an iterable of (clip_id, acts[frames, n_features]) — numpy (float32/float16) or torch tensors. Torch
tensors are reduced on their own device (an SAE's latents on a GPU never cross to the host whole); only
[n_features] summaries, a few sampled frames and the traces of features whose top-K changed are copied.

Everything kept is bounded by n_features, independent of the number of clips:
- top-K (highest per-clip peak) and bottom-K (most negative per-clip minimum) per feature, as [F, K] arrays
  updated vectorised per clip (a clip can enter a feature's list at most once, replacing its weakest slot);
- for every kept example, the feature's trace over the whole clip (float16). Clips longer than 2 x
  `trace_radius` frames keep a window that long centred on the peak (clamped to the clip), with its frame
  offset. The buffer [F, K, L] grows with the longest clip seen (L <= 2 x trace_radius) and is a memory-mapped
  temp file instead of RAM beyond `trace_ram_bytes` (24,576 x 32 x 1500 x 2 B = 2.4 GB per list);
- density (share of frames > `fire_threshold`), mean, max, min over all frames;
- per-frame quantiles from a fixed log-spaced histogram fed by up to `sample_frames` random frames per clip,
  each weighted by frames/sampled so long clips count in proportion;
- a histogram of per-clip maxima with linear bins whose width doubles (adjacent bins merge) whenever a peak
  falls outside the range: no first pass, and at least 32 bins between 0 and the largest |peak|;
- a random-projection signature of the same sampled frames, centred, whose cosine approximates the Pearson
  correlation of two features' per-frame activations (used for neuron similarity);
- examples across activation levels: per octave of the per-clip peak (above `fire_threshold`), a few clips drawn
  uniformly (`LevelSample`), so a user sees whether a feature's label holds below its very top.

Mergeable: a clip's sampled frames and projection rows come from an RNG seeded by (seed, a hash of its id), and
the ranked lists keep exactly the top-K by (score desc, clip index asc), so nothing depends on the clips mined
before. `MiningResult.state` (`MiningState`: the raw sums and histograms, no traces) lets `merge_mining(a, b)`
give the result of one pass over a's clips then b's without reading a's activations again.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from freud_pipeline.errors import FreudError

QUANTILE_LEVELS = (0.5, 0.9, 0.99)
# Log histogram for per-frame quantiles: |v| in [2^-16, 2^16), 8 bins per octave (bin width <= 12.5% of the value,
# interpolated inside a bin), one central bin for smaller magnitudes ("zero"). The bin is read straight from the
# float32 bits (exponent + 3 leading mantissa bits): no log per value. 100 MB of counts at 24,576 features.
_LOG_MIN, _LOG_MAX = -16, 16
_MANTISSA_BITS_KEPT = 3
_SHIFT = 23 - _MANTISSA_BITS_KEPT
_KEY_MIN = (127 + _LOG_MIN) << _MANTISSA_BITS_KEPT
_HALF_BINS = (_LOG_MAX - _LOG_MIN) << _MANTISSA_BITS_KEPT
_LOG_BINS = 2 * _HALF_BINS + 1  # negative bins, zero bin, positive bins
PEAK_HIST_BINS = 128  # symmetric around 0: [-64 w, 64 w)
# Examples across activation levels ("typical" examples): per feature, the clips whose peak lies in each octave
# [2^j, 2^(j+1)) for j in [LEVEL_MIN, LEVEL_MIN + LEVEL_BINS) (smaller firing peaks count in the lowest), LEVEL_SLOTS
# clips per octave: those with the smallest priority, a hash of (seed, clip id) — a uniform sample of each
# octave's clips that does not depend on the order clips come in, so it merges exactly.
LEVEL_MIN, LEVEL_BINS, LEVEL_SLOTS = -8, 24, 2


class MiningError(FreudError, ValueError):
    """Activations that cannot be mined (wrong width, no clips)."""


class ClipObserver(Protocol):
    """Gets every clip during the pass (e.g. the phone-label collector)."""

    def observe(self, clip_id: str, acts: Any) -> None: ...


@dataclass
class ExampleLists:
    """Per-feature ranked examples, best first. Rows hold `count[f]` valid entries; the rest are padding."""

    values: np.ndarray  # [F, K] float32 signed peak (top) or minimum (bottom)
    clip_index: np.ndarray  # [F, K] int64 into MiningResult.clip_ids, -1 = empty
    peak_frame: np.ndarray  # [F, K] int32 frame of the value within the whole clip
    trace_offset: np.ndarray  # [F, K] int32 first clip frame of the stored trace
    trace_len: np.ndarray  # [F, K] int32
    traces: np.ndarray  # [F, K', L] float16 (possibly a memmap), K' <= K: a pass over fewer than K clips fills
    # only K' slots (the others are empty); only [:trace_len] is meaningful
    order: np.ndarray  # [F, K] slot order, best first (traces are not reordered in place: may be on disk)
    count: np.ndarray  # [F] valid entries

    @classmethod
    def ranked(cls, values: np.ndarray, clip_index: np.ndarray, peak_frame: np.ndarray, trace_offset: np.ndarray,
               trace_len: np.ndarray, traces: np.ndarray) -> ExampleLists:
        """Lists already in rank order (e.g. read back from the index): order = identity, count = the slots with
        a clip (clip_index >= 0)."""
        clip_index = np.asarray(clip_index, np.int64)
        n, k = clip_index.shape
        return cls(
            values=np.asarray(values, np.float32), clip_index=clip_index,
            peak_frame=np.asarray(peak_frame, np.int32), trace_offset=np.asarray(trace_offset, np.int32),
            trace_len=np.asarray(trace_len, np.int32),
            traces=traces if traces.dtype == np.float16 else traces.astype(np.float16),
            order=np.tile(np.arange(k, dtype=np.int64), (n, 1)), count=(clip_index >= 0).sum(axis=1))

    def rows(self, start: int, stop: int, traces: bool = True) -> dict[str, np.ndarray]:
        """Features [start, stop) with every array put in rank order (traces [n, K, 0] with traces=False)."""
        return self._gathered(slice(start, stop), traces)

    def subset(self, features: np.ndarray, traces: bool = True) -> ExampleLists:
        """The lists of `features` only (in that order), ranked, traces included unless traces=False ([n, K, 0])."""
        rows = self._gathered(np.asarray(features, np.int64), traces)
        return ExampleLists.ranked(**{k: v for k, v in rows.items() if k != "count"})

    def traces_at(self, features: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """[m, L] traces of the entries at (features[i], ranks[i]), without gathering whole lists."""
        features = np.asarray(features, np.int64)
        return np.asarray(self.traces[features, self.order[features, ranks]])

    def _gathered(self, which: slice | np.ndarray, with_traces: bool) -> dict[str, np.ndarray]:
        order = self.order[which]
        k, slots = order.shape[1], self.traces.shape[1]
        ranked = (order == np.arange(k)).all()
        if ranked:  # already ranked (lists read back): copies, no gather
            take = lambda a: np.array(a[which])  # noqa: E731
        else:
            take = lambda a: np.take_along_axis(a[which], order, axis=1)  # noqa: E731
        if not with_traces:
            traces = np.zeros((*order.shape, 0), np.float16)
        elif ranked and slots == k:
            traces = np.array(self.traces[which])
        elif slots == k:
            traces = np.take_along_axis(np.asarray(self.traces[which]), order[:, :, None], axis=1)
        else:  # slots beyond the buffer's are empty (none at all if no clip entered): their traces stay zero
            traces = np.zeros((*order.shape, self.traces.shape[-1]), np.float16)
            held = order < slots
            if slots:
                traces[held] = np.take_along_axis(np.asarray(self.traces[which]),
                                                  np.minimum(order, slots - 1)[:, :, None], axis=1)[held]
        return {
            "values": take(self.values),
            "clip_index": take(self.clip_index),
            "peak_frame": take(self.peak_frame),
            "trace_offset": take(self.trace_offset),
            "trace_len": take(self.trace_len),
            "traces": traces,
            "count": self.count[which],
        }


@dataclass
class MiningState:
    """The raw accumulators of a pass, without traces: what `merge_mining` adds up (a few MB; 100 MB of log
    counts at 24,576 features). `to_arrays()` is savable with np.savez; `from_arrays` reads it back."""

    n_features: int
    top_k: int
    bottom_k: int
    max_frames: int  # 2 x trace_radius
    fire_threshold: float
    sample_frames: int
    signature_dim: int
    seed: int
    clip_ids: list[str]
    n_frames: int
    total: np.ndarray  # [F] float64 sum over all frames
    n_fire: np.ndarray  # [F] int64 frames > fire_threshold
    max: np.ndarray  # [F] float32
    min: np.ndarray  # [F] float32
    log_counts: np.ndarray  # [F, _LOG_BINS] float64 weighted sampled frames per log bin
    peak_hist_width: np.ndarray  # [F] float64
    peak_hist_counts: np.ndarray  # [F, PEAK_HIST_BINS] int64
    sig: np.ndarray  # [F, D] float32 sum over sampled frames of x_t r_t (uncentred)
    sig_r: np.ndarray  # [D] float64 sum of r_t
    sig_x: np.ndarray  # [F] float64 sum of x_t over sampled frames
    sig_n: int  # sampled frames
    # LevelSample's slots, [F, LEVEL_BINS, LEVEL_SLOTS] (None in states saved before they existed: empty)
    level_priority: np.ndarray | None = None
    level_clip_index: np.ndarray | None = None
    level_value: np.ndarray | None = None
    level_frame: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, d: Any) -> MiningState:
        """From `to_arrays()`'s dict, or the np.load of its np.savez file."""
        values = {}
        for f in fields(cls):
            if f.name not in d and f.name.startswith("level_"):
                continue  # saved before the level sample: filled empty below
            v = np.asarray(d[f.name])
            values[f.name] = [str(c) for c in v] if f.name == "clip_ids" else v.item() if v.ndim == 0 else v
        state = cls(**values)
        if state.level_priority is None:
            state.level_priority, state.level_clip_index, state.level_value, state.level_frame = \
                LevelSample(state.n_features).arrays()
        return state

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        out["clip_ids"] = np.array(self.clip_ids, dtype=str)
        return out


@dataclass
class MiningResult:
    n_features: int
    top_k: int
    fire_threshold: float
    clip_ids: list[str]
    n_frames: int
    top: ExampleLists
    bottom: ExampleLists
    # density, mean, quantiles and signature are None in a result made only to be merged (`result_from_state`, a
    # pass mined `after` another): a merge computes them from the merged accumulators and would discard these.
    density: np.ndarray | None  # [F] share of frames > fire_threshold
    mean: np.ndarray | None
    max: np.ndarray
    min: np.ndarray
    quantile_levels: tuple[float, ...]
    quantiles: np.ndarray | None  # [F, Q]
    peak_hist_width: np.ndarray  # [F] bin width of the per-clip-max histogram
    peak_hist_counts: np.ndarray  # [F, PEAK_HIST_BINS]
    signature: np.ndarray | None  # [F, D] float32, centred random projection
    state: MiningState | None = None  # what merge_mining needs (None: built some other way)
    _spill: Any = field(default=None, repr=False)

    @property
    def n_clips(self) -> int:
        return len(self.clip_ids)

    def peak_histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every feature's histogram of per-clip maxima trimmed to its non-empty span, as flat lists: (counts,
        count offsets [F+1], edges, edge offsets [F+1]); feature f has counts[co[f]:co[f+1]] (B_f bins) and B_f + 1
        edges, or none of either when it has no clip."""
        counts = self.peak_hist_counts
        n, bins = counts.shape
        nonzero = counts != 0
        filled = nonzero.any(axis=1)
        lo = np.where(filled, nonzero.argmax(axis=1), 0)
        hi = np.where(filled, bins - nonzero[:, ::-1].argmax(axis=1), 0)  # one past the last non-empty bin
        column = np.arange(bins + 1)
        in_counts = (column[:-1] >= lo[:, None]) & (column[:-1] < hi[:, None])
        in_edges = (column >= lo[:, None]) & (column <= hi[:, None]) & filled[:, None]
        edges = (column - PEAK_HIST_BINS // 2)[None, :] * self.peak_hist_width[:, None]
        offsets = lambda mask: np.concatenate([[0], np.cumsum(mask.sum(axis=1))])  # noqa: E731
        return counts[in_counts], offsets(in_counts), edges[in_edges], offsets(in_edges)

    def level_examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Examples across activation levels of every feature, strongest first: (clip_index, value, frame), each
        [F, LEVEL_BINS x LEVEL_SLOTS], clip_index -1 after a feature's last one."""
        state = self.state
        n = self.n_features
        clip = state.level_clip_index.reshape(n, -1)
        value = np.where(clip >= 0, state.level_value.reshape(n, -1), -np.inf)
        order = np.lexsort((clip, -value), axis=-1)
        return (np.take_along_axis(clip, order, axis=1), np.take_along_axis(state.level_value.reshape(n, -1), order, 1),
                np.take_along_axis(state.level_frame.reshape(n, -1), order, 1))

    def close(self) -> None:
        """Drop the on-disk trace buffer, if one was needed."""
        if self._spill is not None:
            self._spill.cleanup()


def is_torch_tensor(x: Any) -> bool:
    """Whether `x` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


class _Spill:
    """A temp directory for trace buffers too big for RAM, created on first use."""

    def __init__(self, parent: Path):
        self.parent = parent
        self._dir: tempfile.TemporaryDirectory | None = None

    def path(self, name: str) -> Path:
        if self._dir is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(prefix="freud-traces-", dir=self.parent)
        return Path(self._dir.name) / name

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class _TraceBuffer:
    """[F, K, L] float16 traces; L grows with the longest clip (<= max_frames) and the slots with the clips seen
    (a batch of a few clips holds [F, few, L]: the memory its traces need, not a sparsely touched [F, K, L]); a
    memory-mapped temp file instead of RAM beyond ram_bytes."""

    def __init__(self, n_features: int, k: int, max_frames: int, ram_bytes: int, spill: _Spill, name: str):
        self.shape = (n_features, k)
        self.max_frames = max_frames
        self.ram_bytes = ram_bytes
        self.spill = spill
        self.name = name
        self.array = np.zeros((n_features, 0, 0), np.float16)
        self.written = np.zeros(n_features, bool)  # rows a trace was written to (growing copies only these)

    def _allocate(self, slots: int, length: int) -> np.ndarray:
        shape = (self.shape[0], slots, length)
        if math.prod(shape) * 2 <= self.ram_bytes:
            return np.zeros(shape, np.float16)
        path = self.spill.path(f"{self.name}-{slots}-{length}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

    def ensure(self, frames: int, slots: int | None = None) -> None:
        """Room for traces of `frames` frames in slots [0, slots) (default all K); each dimension grows by doubling."""
        k = self.shape[1]
        slots = k if slots is None else min(slots, k)
        _, have, length = self.array.shape
        # Clamped first: a clip longer than max_frames must not re-create a full buffer (on disk, the same file).
        frames = min(frames, self.max_frames)
        if frames <= length and slots <= have:
            return
        new_length = length if frames <= length else min(self.max_frames, max(frames, 2 * length))
        grown = self._allocate(have if slots <= have else min(k, max(slots, 2 * have)), new_length)
        if self.written.all():
            grown[:, :have, :length] = self.array
        else:  # only the rows written: the others are zeros, and the new buffer's pages for them stay untouched
            rows = np.flatnonzero(self.written)
            grown[rows, :have, :length] = self.array[rows]
        old, self.array = self.array, grown
        if isinstance(old, np.memmap):
            Path(old.filename).unlink(missing_ok=True)


class LevelSample:
    """Examples across activation levels: per feature and octave of the per-clip peak, the LEVEL_SLOTS clips of
    smallest priority (`clip_priority`), [F, LEVEL_BINS, LEVEL_SLOTS] arrays; clip_index -1 = empty slot."""

    def __init__(self, n_features: int, arrays: tuple[np.ndarray, ...] | None = None):
        if arrays is None:
            shape = (n_features, LEVEL_BINS, LEVEL_SLOTS)
            arrays = (np.full(shape, np.iinfo(np.int64).max, np.int64), np.full(shape, -1, np.int64),
                      np.zeros(shape, np.float32), np.zeros(shape, np.int32))
        self.priority, self.clip_index, self.value, self.frame = arrays

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.priority, self.clip_index, self.value, self.frame

    @staticmethod
    def level(values: np.ndarray) -> np.ndarray:
        """The octave bin of positive peaks."""
        with np.errstate(divide="ignore"):
            return np.clip(np.floor(np.log2(values)).astype(np.int64) - LEVEL_MIN, 0, LEVEL_BINS - 1)

    def add(self, clip_index: int, priority: int, peak: np.ndarray, peak_frame: np.ndarray,
            fire_threshold: float) -> None:
        f = np.flatnonzero((peak > fire_threshold) & (peak > 0))
        if not f.size:
            return
        level = self.level(peak[f])
        slots = self.priority[f, level]
        worst = slots.argmax(axis=1)
        take = priority < slots[np.arange(len(f)), worst]  # strictly: of equal priorities the earlier clip stays
        f, level, worst = f[take], level[take], worst[take]
        self.priority[f, level, worst] = priority
        self.clip_index[f, level, worst] = clip_index
        self.value[f, level, worst] = peak[f]
        self.frame[f, level, worst] = peak_frame[f]

    @classmethod
    def merged(cls, a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], offset: int) -> LevelSample:
        """Both samples' slots (b's clip indices shifted by offset), keeping the smallest (priority, clip index).
        Only the (feature, level) cells where b has a slot are merged (a batch of a few clips touches a few); the
        others keep a's slots as they are. The order of a cell's slots means nothing (`add` and `level_examples`
        do not depend on it)."""
        pa_, ca, va, fa = a
        pb, cb, vb, fb = b
        f, level = np.nonzero((cb >= 0).any(axis=2))
        priority = np.concatenate([pa_[f, level], pb[f, level]], axis=1)
        clip = np.concatenate([ca[f, level], np.where(cb[f, level] >= 0, cb[f, level] + offset, -1)], axis=1)
        order = np.lexsort((np.where(clip >= 0, clip, np.iinfo(np.int64).max), priority), axis=-1)[:, :LEVEL_SLOTS]
        out = []
        for x, y, both in ((pa_, pb, priority), (ca, cb, clip), (va, vb, None), (fa, fb, None)):
            both = np.concatenate([x[f, level], y[f, level]], axis=1) if both is None else both
            merged = np.array(x)
            merged[f, level] = np.take_along_axis(both, order, axis=1)
            out.append(merged)
        return cls(0, tuple(out))


def clip_priority(seed: int, clip_id: str) -> int:
    """A clip's priority in level samples: a stable hash of (seed, clip id) in [0, 2^62)."""
    digest = hashlib.blake2b(f"{seed}:{clip_id}".encode(), digest_size=8, person=b"freud-lvl").digest()
    return int.from_bytes(digest, "little") >> 2


class _RankedLists:
    """Streaming top-K per feature of a per-clip score (peak, or -minimum for the bottom list)."""

    def __init__(self, n_features: int, k: int, traces: _TraceBuffer, floor: np.ndarray | None = None):
        self.score = np.full((n_features, k), -np.inf, np.float32)
        self.value = np.zeros((n_features, k), np.float32)
        self.clip_index = np.full((n_features, k), -1, np.int64)
        self.peak_frame = np.zeros((n_features, k), np.int32)
        self.trace_offset = np.zeros((n_features, k), np.int32)
        self.trace_len = np.zeros((n_features, k), np.int32)
        self.traces = traces
        self.weakest_slot = np.zeros(n_features, np.int64)
        # A clip enters only with a score above the floor (default none; see mine_features' `after`).
        self.floor = np.full(n_features, -np.inf, np.float32) if floor is None else np.asarray(floor, np.float32)
        # k == 0 (bottom lists switched off): nothing ever enters.
        self.weakest = self.floor.copy() if k else np.full(n_features, np.inf, np.float32)

    def update(self, clip_index: int, score: np.ndarray, value: np.ndarray, frame: np.ndarray, acts: Any) -> None:
        # Clips come in index order. Strict '>' keeps the earlier clip on ties, and the slot evicted is the weakest
        # score's latest clip: the kept set is exactly the top-K by (score desc, clip index asc), as merge_mining
        # needs (SAE latents tie at 0.0 a lot).
        features = np.flatnonzero(score > self.weakest)
        if features.size == 0:
            return
        slots = self.weakest_slot[features]
        self.score[features, slots] = score[features]
        self.value[features, slots] = value[features]
        self.clip_index[features, slots] = clip_index
        self.peak_frame[features, slots] = frame[features]
        n_frames = acts.shape[0]
        length = min(n_frames, self.traces.max_frames)
        # Window centred on the peak, clamped to the clip; 0 for clips that fit whole.
        offsets = np.clip(frame[features].astype(np.int64) - length // 2, 0, n_frames - length)
        self.trace_offset[features, slots] = offsets
        self.trace_len[features, slots] = length
        self.traces.ensure(n_frames, slots=int(slots.max()) + 1)  # slots fill in clip order: few for a few clips
        traces = self.traces.array
        traces[features, slots, :length] = _gather_traces(acts, features, offsets, length)
        traces[features, slots, length:] = 0
        self.traces.written[features] = True
        rows = self.score[features]
        weakest = rows.min(axis=1)
        latest = np.where(rows == weakest[:, None], self.clip_index[features], -2)
        self.weakest_slot[features] = latest.argmax(axis=1)
        self.weakest[features] = np.maximum(weakest, self.floor[features])

    def finish(self) -> ExampleLists:
        order = _rank(self.score, self.clip_index)
        return ExampleLists(
            values=self.value,
            clip_index=self.clip_index,
            peak_frame=self.peak_frame,
            trace_offset=self.trace_offset,
            trace_len=self.trace_len,
            traces=self.traces.array,
            order=order,
            count=np.isfinite(self.score).sum(axis=1),
        )


def _rank(score: np.ndarray, clip_index: np.ndarray) -> np.ndarray:
    """[F, K] slot order by (score desc, clip index asc); empty slots (score -inf) last."""
    return np.lexsort((clip_index, -score), axis=-1)


def _gather_traces(acts: Any, features: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """acts[offset_f : offset_f + length, f] for each feature f -> [n, length] float16 on the host."""
    if is_torch_tensor(acts):
        import torch

        feats = torch.as_tensor(features, device=acts.device)
        if length == acts.shape[0]:
            out = acts[:, feats].T
        else:
            frames = torch.as_tensor(offsets, device=acts.device)[:, None] + torch.arange(length, device=acts.device)
            out = acts[frames, feats[:, None]]
        return out.to(torch.float16).cpu().numpy()
    if length == acts.shape[0]:
        if features.size > acts.shape[1] // 4:  # early clips update most features: one transpose beats a gather
            return acts.T.astype(np.float16)[features]
        return acts[:, features].T.astype(np.float16)
    frames = offsets[:, None] + np.arange(length)
    return acts[frames, features[:, None]].astype(np.float16)


def first_frame_of(acts: np.ndarray, target: np.ndarray, largest: bool, block: int = 32) -> np.ndarray:
    """First frame where acts[:, f] == target[f] (the peak or trough). numpy's argmax along axis 0 of a C-order
    [frames, features] array strides across memory; this reduces blocks of frames, then searches one block."""
    n_frames, n_features = acts.shape
    reduce = np.max if largest else np.min
    n_blocks = n_frames // block
    parts = [reduce(acts[: n_blocks * block].reshape(n_blocks, block, n_features), axis=1)] if n_blocks else []
    if n_frames % block:
        parts.append(reduce(acts[n_blocks * block :], axis=0, keepdims=True))
    first_block = (np.concatenate(parts) == target).argmax(axis=0)
    frames = np.minimum(first_block * block + np.arange(block)[:, None], n_frames - 1)
    window = acts[frames, np.arange(n_features)]
    return (frames[(window == target).argmax(axis=0), np.arange(n_features)]).astype(np.int32)


@dataclass
class _ClipSummary:
    peak: np.ndarray
    peak_frame: np.ndarray
    trough: np.ndarray
    trough_frame: np.ndarray
    total: np.ndarray  # sum over frames
    n_fire: np.ndarray
    sampled: np.ndarray  # [S, F] float32


def _summarise(acts: Any, fire_threshold: float, sample: np.ndarray) -> _ClipSummary:
    if is_torch_tensor(acts):  # only accelerator tensors get here; CPU tensors are converted to numpy (faster)
        import torch

        with torch.no_grad():
            peak, peak_frame = acts.max(dim=0)
            trough, trough_frame = acts.min(dim=0)
            host = lambda t: t.cpu().numpy()  # noqa: E731
            return _ClipSummary(
                host(peak.float()), host(peak_frame).astype(np.int32),
                host(trough.float()), host(trough_frame).astype(np.int32),
                host(acts.sum(dim=0, dtype=torch.float64)), host((acts > fire_threshold).sum(dim=0)),
                host(acts[torch.as_tensor(sample, device=acts.device)].float()),
            )
    peak = acts.max(axis=0)
    trough = acts.min(axis=0)
    return _ClipSummary(
        peak.astype(np.float32), first_frame_of(acts, peak, largest=True),
        trough.astype(np.float32), first_frame_of(acts, trough, largest=False),
        acts.sum(axis=0, dtype=np.float32), np.add.reduce(acts > fire_threshold, axis=0, dtype=np.int64),
        acts[sample].astype(np.float32),
    )


class _LogHistogram:
    """Per-feature histogram of values on fixed log-spaced bins."""

    def __init__(self, n_features: int):
        self.n_features = n_features
        # Float counts: a sampled frame stands for frames/n_sampled frames of its clip, otherwise short clips
        # (all frames sampled) would outweigh long ones.
        self.counts = np.zeros((n_features, _LOG_BINS), np.float64)

    @staticmethod
    def bin_of(values: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
        level = ((bits & 0x7FFFFFFF) >> _SHIFT) - _KEY_MIN  # NaN/inf land in the top bin
        level = np.minimum(level, _HALF_BINS - 1)
        signed = np.where(bits < 0, -(level + 1), level + 1)
        return np.where(level < 0, 0, signed) + _HALF_BINS  # zero bin in the middle

    def add(self, sampled: np.ndarray, weight: float) -> None:
        """sampled: [S, F], each row standing for `weight` frames"""
        flat = self.bin_of(sampled) + np.arange(self.n_features) * _LOG_BINS
        np.add.at(self.counts.reshape(-1), flat.ravel(), weight)  # scalar weight: add.at's fast path

    @staticmethod
    def bin_bounds() -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper value of every bin (the zero bin spans the smallest magnitudes)."""
        keys = (np.arange(_HALF_BINS + 1) + _KEY_MIN).astype(np.int32) << _SHIFT
        edges = keys.view(np.float32).astype(np.float64)
        pos_lo, pos_hi = edges[:-1], edges[1:]
        lower = np.concatenate([-pos_hi[::-1], [-edges[0]], pos_lo])
        upper = np.concatenate([-pos_lo[::-1], [edges[0]], pos_hi])
        return lower, upper

    @classmethod
    def quantiles(cls, counts: np.ndarray, levels: Sequence[float], clamp_lo: np.ndarray,
                  clamp_hi: np.ndarray, block: int = 256) -> np.ndarray:
        """Interpolated quantiles of `counts` [F, _LOG_BINS], clamped to [clamp_lo, clamp_hi]; in blocks of features
        (temporaries of a block, not of all 24,576 features' 100 MB of counts)."""
        return np.concatenate([cls._quantiles(counts[a : a + block], levels, clamp_lo[a : a + block],
                                              clamp_hi[a : a + block]) for a in range(0, len(counts), block)]
                              or [np.zeros((0, len(levels)), np.float32)])

    @classmethod
    def _quantiles(cls, counts: np.ndarray, levels: Sequence[float], clamp_lo: np.ndarray,
                   clamp_hi: np.ndarray) -> np.ndarray:
        lower, upper = cls.bin_bounds()
        n_features = counts.shape[0]
        cumulative = np.cumsum(counts, axis=1)
        total = np.maximum(cumulative[:, -1:], 1)
        out = np.zeros((n_features, len(levels)), np.float32)
        for j, level in enumerate(levels):
            target = level * total[:, 0]
            # The margin keeps float64 rounding of the counts (summed in another order by a merge) from moving the
            # bin past empty ones when the cumulative count meets the target exactly.
            b = np.minimum((cumulative < (target - 1e-9 * total[:, 0])[:, None]).sum(axis=1), _LOG_BINS - 1)
            below = np.where(b > 0, cumulative[np.arange(n_features), b - 1], 0)
            inside = np.maximum(counts[np.arange(n_features), b], 1e-12)
            frac = np.clip((target - below) / inside, 0, 1)
            value = lower[b] + frac * (upper[b] - lower[b])
            out[:, j] = np.clip(value, clamp_lo, clamp_hi)
        return out


class _PeakHistogram:
    """Linear histogram of per-clip maxima, symmetric around 0, bin widths doubling as the range grows."""

    def __init__(self, n_features: int, bins: int = PEAK_HIST_BINS, width: np.ndarray | None = None):
        self.bins = bins
        # Any power of two times 2^-20 (wider ones skip the doublings the first peaks would make); 2^-20 by default.
        self.width = np.full(n_features, 2.0**-20) if width is None else np.array(width, np.float64)
        self.counts = np.zeros((n_features, bins), np.int64)

    def add(self, peaks: np.ndarray) -> None:
        half = self.bins // 2
        grow = np.flatnonzero((np.abs(peaks) >= half * self.width) & np.isfinite(peaks))
        if grow.size:
            # The doublings each feature needs at once (the first clip needs about 20): the fewest d with
            # |peak| < half x width x 2^d.
            steps = np.floor(np.log2(np.abs(peaks[grow]) / (half * self.width[grow]))).astype(np.int64) + 1
            steps += np.abs(peaks[grow]) >= half * np.ldexp(self.width[grow], steps)  # log2 rounded down a step
            self.counts[grow] = _coarsened(self.counts[grow], steps)
            self.width[grow] = np.ldexp(self.width[grow], steps)
        index = np.floor(peaks / self.width).astype(np.int64) + half
        self.counts[np.arange(peaks.size), np.clip(index, 0, self.bins - 1)] += 1


def _coarsened(counts: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Peak histograms [n, B], row i at 2^steps[i] times its bin width: bin r (relative to 0) becomes
    floor(r / 2^steps[i]), i.e. doubling the width steps[i] times. Exact, no re-binning error: the bins are
    floor(peak / width) with width a power of two times 2^-20."""
    n, bins = counts.shape
    half = bins // 2
    out = np.zeros_like(counts)
    steps = np.where(counts.any(axis=1), steps, 0)  # an empty histogram stays empty at any width
    for step in np.unique(steps):
        rows = np.flatnonzero(steps == step)
        if step == 0:
            out[rows] = counts[rows]
            continue
        target = half + np.floor_divide(np.arange(bins) - half, 2 ** min(int(step), 62))  # non-decreasing
        starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
        out[np.ix_(rows, target[starts])] = np.add.reduceat(counts[rows], starts, axis=1)
    return out


def _widened(counts: np.ndarray, width: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Peak histograms brought to the (wider or equal) bin widths `target` (both powers of two times 2^-20): `counts`
    itself where every width is the target's already, else a new array."""
    steps = np.rint(np.log2(target / width)).astype(np.int64)
    return _coarsened(counts, steps) if steps.any() else counts


def encoded_clips(clips: Iterable[tuple[str, Any]], encode: Callable[[Any], Any]) -> Iterator[tuple[str, Any]]:
    """SAE sets: map residual activations to latents clip by clip (`encode` e.g. wraps `sae.encode`)."""
    for clip_id, acts in clips:
        yield clip_id, encode(acts)


def mine_features(
    clips: Iterable[tuple[str, Any]],
    n_features: int | None = None,
    top_k: int = 32,
    trace_radius: int = 750,
    *,
    bottom_k: int | None = None,
    fire_threshold: float = 0.0,
    sample_frames: int = 64,
    signature_dim: int = 128,
    observers: Sequence[ClipObserver] = (),
    trace_ram_bytes: int = 2 << 30,
    spill_dir: str | Path | None = None,
    seed: int = 0,
    after: MiningResult | None = None,
) -> MiningResult:
    """Mine ranked examples and statistics in one pass.

    Clips longer than 2*trace_radius frames keep a window of that many frames around the peak (default 1500
    frames = one 30 s Whisper window, so Whisper clips are always kept whole). bottom_k (default top_k) sizes
    the most-negative lists; 0 skips them (SAE latents are never negative). `observers` see every clip.
    after: the result this pass will be merged after (`merge_mining(after, this)`), to save work that merge would
    discard: a clip enters a list only if it can enter the merged one (above the last entry of a full list of
    `after`), so it costs no trace otherwise, and the peak histograms start at `after`'s bin widths. The merge
    is the same; this pass alone is not what a plain pass gives (and has no statistics: see MiningResult).
    """
    if top_k < 1:
        raise MiningError(f"top_k must be >= 1, got {top_k}")
    miner: _Miner | None = None
    for clip_id, acts in clips:
        if acts.ndim != 2:
            raise MiningError(f"clip {clip_id!r}: activations must be [frames, n_features], got {tuple(acts.shape)}")
        if miner is None:
            n_features = int(n_features or acts.shape[1])
            miner = _Miner(n_features, top_k, top_k if bottom_k is None else bottom_k, 2 * trace_radius,
                           fire_threshold, sample_frames, signature_dim, trace_ram_bytes, _spill_for(spill_dir), seed,
                           after)
        if acts.shape[1] != n_features:
            raise MiningError(f"clip {clip_id!r} has {acts.shape[1]} features; expected {n_features} like the others")
        if acts.shape[0] == 0:
            continue
        if is_torch_tensor(acts) and acts.device.type == "cpu":
            acts = acts.detach().numpy()  # numpy reduces CPU arrays along frames faster than torch does
        if not is_torch_tensor(acts) and acts.dtype not in (np.float32, np.float16):
            acts = acts.astype(np.float32)
        miner.add(str(clip_id), acts)
        for observer in observers:
            observer.observe(str(clip_id), acts)
    if miner is None or not miner.clip_ids:
        raise MiningError("no clips with activations to mine (empty input, or every clip had 0 frames)")
    return miner.finish()


def _list_floors(result: MiningResult) -> tuple[np.ndarray, np.ndarray]:
    """The score a later clip must beat to enter the top and bottom lists of `result` (`_RankedLists`' floor): the
    score of each full list's last entry (-inf where a list has room). A later clip with an equal score would rank
    after it (ties go to the earlier clip), so only a higher one can enter."""
    def floor(lists: ExampleLists, sign: int) -> np.ndarray:
        n, k = lists.values.shape
        if not k:
            return np.full(n, np.inf, np.float32)
        last = np.take_along_axis(lists.values, lists.order[:, k - 1 :], axis=1)[:, 0]
        return np.where(lists.count >= k, sign * last, -np.inf).astype(np.float32)

    return floor(result.top, 1), floor(result.bottom, -1)


def _spill_for(spill_dir: str | Path | None) -> _Spill:
    if spill_dir is None:
        from freud_pipeline.settings import data_dir

        spill_dir = data_dir() / "tmp"
    return _Spill(Path(spill_dir))


def _trace_buffers(n_features: int, top_k: int, bottom_k: int, max_frames: int, trace_ram_bytes: int,
                   spill: _Spill) -> tuple[_TraceBuffer, _TraceBuffer]:
    """Top and bottom trace buffers sharing the RAM budget in proportion to their size."""
    def buffer(k: int, name: str) -> _TraceBuffer:
        budget = trace_ram_bytes * k // max(top_k + bottom_k, 1)
        return _TraceBuffer(n_features, k, max_frames, budget, spill, name)

    return buffer(top_k, "top"), buffer(bottom_k, "bottom")


def clip_rng(seed: int, clip_id: str) -> np.random.Generator:
    """One clip's RNG, seeded by (seed, a stable hash of its id): the clip gets the same sampled frames and
    projection rows whatever was mined before it."""
    digest = hashlib.blake2b(clip_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


class _Miner:
    def __init__(self, n_features, top_k, bottom_k, max_frames, fire_threshold, sample_frames, signature_dim,
                 trace_ram_bytes, spill, seed, after=None):
        self.n_features, self.top_k, self.bottom_k, self.max_frames = n_features, top_k, bottom_k, max_frames
        self.fire_threshold, self.sample_frames, self.signature_dim = fire_threshold, sample_frames, signature_dim
        self.seed = seed
        self.spill = spill
        top, bottom = _trace_buffers(n_features, top_k, bottom_k, max_frames, trace_ram_bytes, spill)
        top_floor, bottom_floor = _list_floors(after) if after is not None else (None, None)
        self.merged_later = after is not None
        self.top = _RankedLists(n_features, top_k, top, top_floor)
        self.bottom = _RankedLists(n_features, bottom_k, bottom, bottom_floor)
        self.clip_ids: list[str] = []
        self.n_frames = 0
        self.total = np.zeros(n_features, np.float64)
        self.n_fire = np.zeros(n_features, np.int64)
        self.max = np.full(n_features, -np.inf, np.float32)
        self.min = np.full(n_features, np.inf, np.float32)
        self.log_hist = _LogHistogram(n_features)
        self.peak_hist = _PeakHistogram(n_features, width=None if after is None else after.peak_hist_width)
        self.sig = np.zeros((n_features, signature_dim), np.float32)
        self.sig_r = np.zeros(signature_dim, np.float64)
        self.sig_x = np.zeros(n_features, np.float64)
        self.sig_n = 0
        self.levels = LevelSample(n_features)

    def add(self, clip_id: str, acts: Any) -> None:
        index = len(self.clip_ids)
        self.clip_ids.append(clip_id)
        frames = acts.shape[0]
        self.n_frames += frames
        rng = clip_rng(self.seed, clip_id)
        sample = np.sort(rng.choice(frames, size=min(frames, self.sample_frames), replace=False))
        s = _summarise(acts, self.fire_threshold, sample)
        self.top.update(index, s.peak, s.peak, s.peak_frame, acts)
        self.bottom.update(index, -s.trough, s.trough, s.trough_frame, acts)
        self.total += s.total
        self.n_fire += s.n_fire
        np.maximum(self.max, s.peak, out=self.max)
        np.minimum(self.min, s.trough, out=self.min)
        self.log_hist.add(s.sampled, frames / len(sample))
        self.peak_hist.add(s.peak)
        self.levels.add(index, clip_priority(self.seed, clip_id), s.peak, s.peak_frame, self.fire_threshold)
        # Signature: sum_t x_t r_t over the sampled frames; the sums kept here centre it at the end.
        projection = rng.standard_normal((len(sample), self.signature_dim), dtype=np.float32)
        self.sig += s.sampled.T @ projection
        self.sig_r += projection.sum(axis=0)
        self.sig_x += s.sampled.sum(axis=0, dtype=np.float64)
        self.sig_n += len(sample)

    def finish(self) -> MiningResult:
        state = MiningState(
            n_features=self.n_features, top_k=self.top_k, bottom_k=self.bottom_k, max_frames=self.max_frames,
            fire_threshold=self.fire_threshold, sample_frames=self.sample_frames, signature_dim=self.signature_dim,
            seed=self.seed, clip_ids=self.clip_ids, n_frames=self.n_frames, total=self.total, n_fire=self.n_fire,
            max=self.max, min=self.min, log_counts=self.log_hist.counts, peak_hist_width=self.peak_hist.width,
            peak_hist_counts=self.peak_hist.counts, sig=self.sig, sig_r=self.sig_r, sig_x=self.sig_x,
            sig_n=self.sig_n, **_level_fields(self.levels))
        return _result(state, self.top.finish(), self.bottom.finish(), self.spill, stats=not self.merged_later)


def _level_fields(levels: LevelSample) -> dict[str, np.ndarray]:
    return dict(zip(("level_priority", "level_clip_index", "level_value", "level_frame"), levels.arrays()))


def _level_arrays(state: MiningState) -> tuple[np.ndarray, ...]:
    return state.level_priority, state.level_clip_index, state.level_value, state.level_frame


def derived(state: MiningState) -> dict[str, Any]:
    """The statistics computed from the accumulators (for a pass and a merge alike): density, mean, quantiles,
    and the centred signature."""
    frames = max(state.n_frames, 1)
    return {
        "density": (state.n_fire / frames).astype(np.float32),
        "mean": (state.total / frames).astype(np.float32),
        "quantile_levels": QUANTILE_LEVELS,
        "quantiles": _LogHistogram.quantiles(state.log_counts, QUANTILE_LEVELS, state.min, state.max),
        "signature": (state.sig - np.outer(state.sig_x / max(state.sig_n, 1), state.sig_r)).astype(np.float32),
    }


def _result(state: MiningState, top: ExampleLists, bottom: ExampleLists, spill: _Spill, *,
            stats: bool = True) -> MiningResult:
    """stats=False: a result made only to be merged, without the statistics `derived` computes (see MiningResult)."""
    return MiningResult(
        n_features=state.n_features, top_k=state.top_k, fire_threshold=state.fire_threshold,
        clip_ids=state.clip_ids, n_frames=state.n_frames, top=top, bottom=bottom, max=state.max, min=state.min,
        peak_hist_width=state.peak_hist_width, peak_hist_counts=state.peak_hist_counts, state=state, _spill=spill,
        **(derived(state) if stats else {"density": None, "mean": None, "quantile_levels": QUANTILE_LEVELS,
                                         "quantiles": None, "signature": None}))


def result_from_state(state: MiningState, top: ExampleLists, bottom: ExampleLists) -> MiningResult:
    """A MiningResult from a saved state and its example lists read back (`ExampleLists.ranked`), to merge into
    (without statistics: see MiningResult)."""
    return _result(state, top, bottom, None, stats=False)


_MERGE_PARAMETERS = ("n_features", "top_k", "bottom_k", "max_frames", "fire_threshold", "sample_frames",
                     "signature_dim", "seed")


def merge_mining(a: MiningResult, b: MiningResult, *, trace_ram_bytes: int = 2 << 30,
                 spill_dir: str | Path | None = None, batch_features: int = 256, traces: bool = True,
                 into_b: bool = False) -> MiningResult:
    """The result of one pass over a's clips then b's, from the two results (no activations read again).

    Exact for the ranked examples, counts, maxima/minima and histograms; sums added in another order
    (mean, signature, and the quantiles' weighted counts) may differ by float rounding. Both must come from
    mine_features (or merge_mining) with the same parameters and no clip in common. Traces are as wide as the
    wider input's; a memory-mapped temp file beyond trace_ram_bytes, like mine_features. traces=False ranks
    without them (the result's lists have traces [F, K, 0]): enough to see which features' lists took one of b's
    clips (`clip_index >= len(a.clip_ids)`), whose traces `merge_lists` then merges alone. into_b: the sums and
    histograms are added into b's arrays (a batch's, not used again: memory in use already, where fresh memory costs
    a page fault per 4 KB).
    """
    sa, sb = a.state, b.state
    if sa is None or sb is None:
        raise MiningError("merge_mining needs results with their MiningState (from mine_features or merge_mining)")
    for name in _MERGE_PARAMETERS:
        if getattr(sa, name) != getattr(sb, name):
            raise MiningError(f"cannot merge mining results with different {name}: "
                              f"{getattr(sa, name)!r} vs {getattr(sb, name)!r}")
    shared = set(sa.clip_ids).intersection(sb.clip_ids)
    if shared:
        raise MiningError(f"cannot merge mining results that share {len(shared)} clip(s), e.g. {min(shared)!r}: "
                          f"each clip must be counted once")
    width = np.maximum(sa.peak_hist_width, sb.peak_hist_width)

    def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        into = into_b and y.flags.writeable and y.shape == x.shape and y.dtype == np.result_type(x, y)
        return np.add(x, y, out=y) if into else x + y

    state = MiningState(
        **{name: getattr(sa, name) for name in _MERGE_PARAMETERS},
        clip_ids=list(sa.clip_ids) + list(sb.clip_ids), n_frames=sa.n_frames + sb.n_frames,
        total=add(sa.total, sb.total), n_fire=add(sa.n_fire, sb.n_fire),
        max=np.maximum(sa.max, sb.max), min=np.minimum(sa.min, sb.min), log_counts=add(sa.log_counts, sb.log_counts),
        peak_hist_width=width, peak_hist_counts=add(_widened(sa.peak_hist_counts, sa.peak_hist_width, width),
                                                    _widened(sb.peak_hist_counts, sb.peak_hist_width, width)),
        sig=add(sa.sig, sb.sig), sig_r=sa.sig_r + sb.sig_r, sig_x=add(sa.sig_x, sb.sig_x), sig_n=sa.sig_n + sb.sig_n,
        **_level_fields(LevelSample.merged(_level_arrays(sa), _level_arrays(sb), len(sa.clip_ids))))
    spill = _spill_for(spill_dir)
    buffers = (_trace_buffers(sa.n_features, sa.top_k, sa.bottom_k, sa.max_frames, trace_ram_bytes, spill)
               if traces else (None, None))
    offset = len(sa.clip_ids)
    top = _merged_lists(a.top, b.top, offset, 1, buffers[0], batch_features)
    bottom = _merged_lists(a.bottom, b.bottom, offset, -1, buffers[1], batch_features)
    return _result(state, top, bottom, spill)


def merge_lists(a: ExampleLists, b: ExampleLists, offset: int, sign: int, max_frames: int, *,
                trace_ram_bytes: int = 2 << 30, spill_dir: str | Path | None = None,
                batch_features: int = 256) -> tuple[ExampleLists, _Spill]:
    """The ranked lists of the same features from two passes, traces included, as `merge_mining` merges them
    (b's clip indices are shifted by `offset`; sign -1 for bottom lists). Returns the lists and the spill
    holding their traces if they went to disk (clean it up when done)."""
    spill = _spill_for(spill_dir)
    n_features, k = a.values.shape
    buffer = _TraceBuffer(n_features, k, max_frames, trace_ram_bytes, spill, "merged")
    return _merged_lists(a, b, offset, sign, buffer, batch_features), spill


def _merged_lists(a: ExampleLists, b: ExampleLists, offset: int, sign: int, buffer: _TraceBuffer | None,
                  batch: int) -> ExampleLists:
    """Top-K of both lists by (score desc, clip index asc), score = sign x value; b's clips come after a's.
    Without a buffer, traces are left out ([F, K, 0]), and only the features where b has an entry are ranked
    (a batch of a few clips enters a few lists): the others are a's lists as they are."""
    n_features, k = a.values.shape
    if buffer is None and k:
        touched = np.flatnonzero(b.count > 0)
        if touched.size < n_features:
            out = a.rows(0, n_features, traces=False)
            empty = out["clip_index"] < 0  # padded like a merge pads (a list read back may pad otherwise)
            for name in ("values", "peak_frame", "trace_offset", "trace_len"):
                out[name][empty] = 0
            if touched.size:
                part = _merged_lists(a.subset(touched, False), b.subset(touched, False), offset, sign, None, batch)
                rows = part.rows(0, touched.size, traces=False)
                for name in ("values", "clip_index", "peak_frame", "trace_offset", "trace_len"):
                    out[name][touched] = rows[name]
            del out["count"]
            return ExampleLists.ranked(**out)
    length = max(a.traces.shape[-1], b.traces.shape[-1]) if buffer is not None else 0
    if buffer is not None:
        buffer.ensure(length)
    out = {"values": np.zeros((n_features, k), np.float32), "clip_index": np.full((n_features, k), -1, np.int64),
           "peak_frame": np.zeros((n_features, k), np.int32), "trace_offset": np.zeros((n_features, k), np.int32),
           "trace_len": np.zeros((n_features, k), np.int32)}
    for start in range(0, n_features if k else 0, batch):
        stop = min(start + batch, n_features)
        ra, rb = a.rows(start, stop, buffer is not None), b.rows(start, stop, buffer is not None)
        rb["clip_index"] = np.where(rb["clip_index"] >= 0, rb["clip_index"] + offset, -1)
        both = {name: np.concatenate([ra[name], rb[name]], axis=1) for name in out}
        filled = both["clip_index"] >= 0
        rank = _rank(np.where(filled, sign * both["values"], -np.inf), both["clip_index"])[:, :k]
        kept = np.take_along_axis(filled, rank, axis=1)
        for name, array in out.items():  # empty slots padded like a pass leaves them
            array[start:stop] = np.where(kept, np.take_along_axis(both[name], rank, axis=1), array[start:stop])
        if buffer is None:
            continue
        # Each kept slot's trace straight from the list it came from (no padded copy of both lists).
        ka = ra["values"].shape[1]
        traces = np.zeros((stop - start, k, length), np.float16)
        for source, take, part in ((ra["traces"], kept & (rank < ka), rank), (rb["traces"], kept & (rank >= ka),
                                                                            rank - ka)):
            f, slot = np.nonzero(take)
            traces[f, slot, : source.shape[-1]] = source[f, part[f, slot]]
        buffer.array[start:stop] = traces
    traces = buffer.array if buffer is not None else np.zeros((n_features, k, 0), np.float16)
    return ExampleLists.ranked(traces=traces, **out)
