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
  correlation of two features' per-frame activations (used for neuron similarity).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
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
    traces: np.ndarray  # [F, K, L] float16 (possibly a memmap); only [:trace_len] is meaningful
    order: np.ndarray  # [F, K] slot order, best first (traces are not reordered in place: may be on disk)
    count: np.ndarray  # [F] valid entries

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Features [start, stop) with every array put in rank order."""
        order = self.order[start:stop]
        take = lambda a: np.take_along_axis(a[start:stop], order, axis=1)  # noqa: E731
        traces = np.take_along_axis(np.asarray(self.traces[start:stop]), order[:, :, None], axis=1)
        return {
            "values": take(self.values),
            "clip_index": take(self.clip_index),
            "peak_frame": take(self.peak_frame),
            "trace_offset": take(self.trace_offset),
            "trace_len": take(self.trace_len),
            "traces": traces,
            "count": self.count[start:stop],
        }


@dataclass
class MiningResult:
    n_features: int
    top_k: int
    fire_threshold: float
    clip_ids: list[str]
    n_frames: int
    top: ExampleLists
    bottom: ExampleLists
    density: np.ndarray  # [F] share of frames > fire_threshold
    mean: np.ndarray
    max: np.ndarray
    min: np.ndarray
    quantile_levels: tuple[float, ...]
    quantiles: np.ndarray  # [F, Q]
    peak_hist_width: np.ndarray  # [F] bin width of the per-clip-max histogram
    peak_hist_counts: np.ndarray  # [F, PEAK_HIST_BINS]
    signature: np.ndarray  # [F, D] float32, centred random projection
    _spill: Any = field(default=None, repr=False)

    @property
    def n_clips(self) -> int:
        return len(self.clip_ids)

    def peak_histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(edges [B+1], counts [B]) of per-clip maxima, trimmed to the non-empty span."""
        counts = self.peak_hist_counts[feature]
        nonzero = np.flatnonzero(counts)
        if nonzero.size == 0:
            return np.zeros(0, np.float64), np.zeros(0, np.int64)
        lo, hi = nonzero[0], nonzero[-1] + 1
        edges = (np.arange(lo, hi + 1) - PEAK_HIST_BINS // 2) * self.peak_hist_width[feature]
        return edges, counts[lo:hi]

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
    """[F, K, L] float16 traces; L grows with the longest clip (<= max_frames); a memory-mapped temp file
    instead of RAM beyond ram_bytes."""

    def __init__(self, n_features: int, k: int, max_frames: int, ram_bytes: int, spill: _Spill, name: str):
        self.shape = (n_features, k)
        self.max_frames = max_frames
        self.ram_bytes = ram_bytes
        self.spill = spill
        self.name = name
        self.array = np.zeros((*self.shape, 0), np.float16)

    def _allocate(self, length: int) -> np.ndarray:
        shape = (*self.shape, length)
        if math.prod(shape) * 2 <= self.ram_bytes:
            return np.zeros(shape, np.float16)
        path = self.spill.path(f"{self.name}-{length}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

    def ensure(self, frames: int) -> None:
        length = self.array.shape[-1]
        if frames <= length:
            return
        new_length = min(self.max_frames, max(frames, 2 * length))
        grown = self._allocate(new_length)
        grown[..., :length] = self.array
        old, self.array = self.array, grown
        if isinstance(old, np.memmap):
            Path(old.filename).unlink(missing_ok=True)


class _RankedLists:
    """Streaming top-K per feature of a per-clip score (peak, or -minimum for the bottom list)."""

    def __init__(self, n_features: int, k: int, traces: _TraceBuffer):
        self.score = np.full((n_features, k), -np.inf, np.float32)
        self.value = np.zeros((n_features, k), np.float32)
        self.clip_index = np.full((n_features, k), -1, np.int64)
        self.peak_frame = np.zeros((n_features, k), np.int32)
        self.trace_offset = np.zeros((n_features, k), np.int32)
        self.trace_len = np.zeros((n_features, k), np.int32)
        self.traces = traces
        self.weakest_slot = np.zeros(n_features, np.int64)
        # k == 0 (bottom lists switched off): nothing ever enters.
        self.weakest = np.full(n_features, -np.inf if k else np.inf, np.float32)

    def update(self, clip_index: int, score: np.ndarray, value: np.ndarray, frame: np.ndarray, acts: Any) -> None:
        # Strict '>' keeps the earlier clip on ties, so results do not depend on batch boundaries.
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
        self.traces.ensure(n_frames)
        traces = self.traces.array
        traces[features, slots, :length] = _gather_traces(acts, features, offsets, length)
        traces[features, slots, length:] = 0
        rows = self.score[features]
        self.weakest_slot[features] = rows.argmin(axis=1)
        self.weakest[features] = rows[np.arange(features.size), self.weakest_slot[features]]

    def finish(self) -> ExampleLists:
        order = np.argsort(-self.score, axis=1, kind="stable")
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

    def quantiles(self, levels: Sequence[float], clamp_lo: np.ndarray, clamp_hi: np.ndarray) -> np.ndarray:
        lower, upper = self.bin_bounds()
        cumulative = np.cumsum(self.counts, axis=1)
        total = np.maximum(cumulative[:, -1:], 1)
        out = np.zeros((self.n_features, len(levels)), np.float32)
        for j, level in enumerate(levels):
            target = level * total[:, 0]
            b = np.minimum((cumulative < target[:, None]).sum(axis=1), _LOG_BINS - 1)
            below = np.where(b > 0, cumulative[np.arange(self.n_features), b - 1], 0)
            inside = np.maximum(self.counts[np.arange(self.n_features), b], 1e-12)
            frac = np.clip((target - below) / inside, 0, 1)
            value = lower[b] + frac * (upper[b] - lower[b])
            out[:, j] = np.clip(value, clamp_lo, clamp_hi)
        return out


class _PeakHistogram:
    """Linear histogram of per-clip maxima, symmetric around 0, bin widths doubling as the range grows."""

    def __init__(self, n_features: int, bins: int = PEAK_HIST_BINS):
        self.bins = bins
        self.width = np.full(n_features, 2.0**-20)
        self.counts = np.zeros((n_features, bins), np.int64)

    def add(self, peaks: np.ndarray) -> None:
        half = self.bins // 2
        while True:
            grow = np.flatnonzero(np.abs(peaks) >= half * self.width)
            if grow.size == 0:
                break
            # Bins 2j, 2j+1 (relative to 0) merge into bin j of twice the width: exact, no re-binning error.
            merged = self.counts[grow].reshape(grow.size, half, 2).sum(axis=2)
            self.counts[grow] = 0
            self.counts[grow, half // 2 : half // 2 + half] = merged
            self.width[grow] *= 2
        index = np.floor(peaks / self.width).astype(np.int64) + half
        self.counts[np.arange(peaks.size), np.clip(index, 0, self.bins - 1)] += 1


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
) -> MiningResult:
    """Mine ranked examples and statistics in one pass.

    Clips longer than 2*trace_radius frames keep a window of that many frames around the peak (default 1500
    frames = one 30 s Whisper window, so Whisper clips are always kept whole). bottom_k (default top_k) sizes
    the most-negative lists; 0 skips them (SAE latents are never negative). `observers` see every clip.
    """
    if top_k < 1:
        raise MiningError(f"top_k must be >= 1, got {top_k}")
    miner: _Miner | None = None
    for clip_id, acts in clips:
        if acts.ndim != 2:
            raise MiningError(f"clip {clip_id!r}: activations must be [frames, n_features], got {tuple(acts.shape)}")
        if miner is None:
            n_features = int(n_features or acts.shape[1])
            if spill_dir is None:
                from freud_pipeline.settings import data_dir

                spill_dir = data_dir() / "tmp"
            miner = _Miner(n_features, top_k, top_k if bottom_k is None else bottom_k, 2 * trace_radius,
                           fire_threshold, sample_frames, signature_dim, trace_ram_bytes, Path(spill_dir), seed)
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


class _Miner:
    def __init__(self, n_features, top_k, bottom_k, max_frames, fire_threshold, sample_frames, signature_dim,
                 trace_ram_bytes, spill_dir, seed):
        self.n_features, self.top_k, self.fire_threshold = n_features, top_k, fire_threshold
        self.sample_frames, self.signature_dim = sample_frames, signature_dim
        self.rng = np.random.default_rng(seed)
        self.spill = _Spill(spill_dir)
        # The RAM budget is shared by the two trace buffers in proportion to their size.
        def ranked(k: int, name: str) -> _RankedLists:
            budget = trace_ram_bytes * k // max(top_k + bottom_k, 1)
            return _RankedLists(n_features, k, _TraceBuffer(n_features, k, max_frames, budget, self.spill, name))

        self.top, self.bottom = ranked(top_k, "top"), ranked(bottom_k, "bottom")
        self.clip_ids: list[str] = []
        self.n_frames = 0
        self.total = np.zeros(n_features, np.float64)
        self.n_fire = np.zeros(n_features, np.int64)
        self.max = np.full(n_features, -np.inf, np.float32)
        self.min = np.full(n_features, np.inf, np.float32)
        self.log_hist = _LogHistogram(n_features)
        self.peak_hist = _PeakHistogram(n_features)
        self.sig = np.zeros((n_features, signature_dim), np.float32)
        self.sig_r = np.zeros(signature_dim, np.float64)
        self.sig_x = np.zeros(n_features, np.float64)
        self.sig_n = 0

    def add(self, clip_id: str, acts: Any) -> None:
        index = len(self.clip_ids)
        self.clip_ids.append(clip_id)
        frames = acts.shape[0]
        self.n_frames += frames
        sample = np.sort(self.rng.choice(frames, size=min(frames, self.sample_frames), replace=False))
        s = _summarise(acts, self.fire_threshold, sample)
        self.top.update(index, s.peak, s.peak, s.peak_frame, acts)
        self.bottom.update(index, -s.trough, s.trough, s.trough_frame, acts)
        self.total += s.total
        self.n_fire += s.n_fire
        np.maximum(self.max, s.peak, out=self.max)
        np.minimum(self.min, s.trough, out=self.min)
        self.log_hist.add(s.sampled, frames / len(sample))
        self.peak_hist.add(s.peak)
        # Signature: sum_t x_t r_t over the sampled frames; the sums kept here centre it at the end.
        projection = self.rng.standard_normal((len(sample), self.signature_dim)).astype(np.float32)
        self.sig += s.sampled.T @ projection
        self.sig_r += projection.sum(axis=0)
        self.sig_x += s.sampled.sum(axis=0, dtype=np.float64)
        self.sig_n += len(sample)

    def finish(self) -> MiningResult:
        frames = max(self.n_frames, 1)
        signature = self.sig - np.outer(self.sig_x / max(self.sig_n, 1), self.sig_r)
        return MiningResult(
            n_features=self.n_features,
            top_k=self.top_k,
            fire_threshold=self.fire_threshold,
            clip_ids=self.clip_ids,
            n_frames=self.n_frames,
            top=self.top.finish(),
            bottom=self.bottom.finish(),
            density=(self.n_fire / frames).astype(np.float32),
            mean=(self.total / frames).astype(np.float32),
            max=self.max,
            min=self.min,
            quantile_levels=QUANTILE_LEVELS,
            quantiles=self.log_hist.quantiles(QUANTILE_LEVELS, self.min, self.max),
            peak_hist_width=self.peak_hist.width,
            peak_hist_counts=self.peak_hist.counts,
            signature=signature.astype(np.float32),
            _spill=self.spill,
        )
