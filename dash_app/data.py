"""The app's only data access: a FeatureIndex (freud_pipeline.features query API) plus clip audio by id.

Everything the pages show comes through `IndexAccess`, which
- opens the index lazily (so the app starts, and says what to do, before the pipeline has run),
- turns the index's answers into the few plain shapes the pages use,
- decodes a clip's audio from the manifest (index.clip(clip_id)) and caches its log-mel and WAV bytes.
No file path ever comes from a request: audio is looked up by clip id only.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
import wave
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlencode

import numpy as np

from freud_pipeline import objectstore
from freud_pipeline.frames import MEL_FRAME_SECONDS, SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_RESULTS = 200
DEFAULT_RESULTS = 20
DEFAULT_TOP_FEATURES = 32
EDIT_PATH = "/edit"

EMPTY_INDEX_HINT = (
    "The feature index is empty. Run `make demo`, or materialise the pipeline's feature assets in Dagster first, "
    "then reload this page."
)


class IndexUnavailable(RuntimeError):
    """The feature index cannot be opened (not built yet, or the features package is missing)."""


class ClipNotFound(KeyError):
    """No clip with this id in the manifest."""


# --------------------------------------------------------------------------------------------------------------
# URL state of the search page
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SearchState:
    """What /search?set=...&index=...&n=20&min=&max=&abs=0 holds. Values are raw (strings) until validated."""

    set_id: str | None = None
    index: str | None = None
    n: str | None = None
    min: str | None = None
    max: str | None = None
    absolute: bool = False
    negative: bool = False

    @classmethod
    def from_search(cls, search: str | None) -> "SearchState":
        params = parse_qs((search or "").lstrip("?"), keep_blank_values=True)

        def one(key: str) -> str | None:
            values = params.get(key)
            value = values[-1].strip() if values else None
            return value or None

        return cls(
            set_id=one("set"),
            index=one("index"),
            n=one("n"),
            min=one("min"),
            max=one("max"),
            absolute=(one("abs") or "0").lower() in ("1", "true", "yes", "on"),
            negative=(one("neg") or "0").lower() in ("1", "true", "yes", "on"),
        )

    def to_search(self) -> str:
        params: list[tuple[str, str]] = []
        if self.set_id is not None:
            params.append(("set", str(self.set_id)))
        if self.index not in (None, ""):
            params.append(("index", str(self.index)))
        params.append(("n", str(self.n or DEFAULT_RESULTS)))
        if self.min not in (None, ""):
            params.append(("min", str(self.min)))
        if self.max not in (None, ""):
            params.append(("max", str(self.max)))
        params.append(("abs", "1" if self.absolute else "0"))
        if self.negative:
            params.append(("neg", "1"))
        return "?" + urlencode(params, quote_via=quote)


def search_href(set_id: str, index: int, **extra: Any) -> str:
    state = SearchState(set_id=set_id, index=str(index), n=str(extra.get("n") or DEFAULT_RESULTS))
    return "/search" + state.to_search()


def edit_href(clip_id: str | None = None, set_id: str | None = None, features: str | None = None,
              upload: str | None = None) -> str:
    """/edit with a dataset clip (or an upload's token), a set and a features spec such as "12:0"."""
    params = []
    for key, value in (("clip", clip_id), ("upload", upload), ("set", set_id), ("features", features)):
        if value:
            params.append(f"{key}={quote(str(value), safe='')}")
    return EDIT_PATH + ("?" + "&".join(params) if params else "")


def decode_upload(contents: str) -> bytes:
    """The file bytes of a dcc.Upload `contents` string ("data:<type>;base64,<data>"); ValueError for anything
    else: not a string (a crafted request may send any JSON), not a base64 data URL, or characters outside the
    base64 alphabet (never silently dropped)."""
    if not isinstance(contents, str):
        raise ValueError(f"upload contents must be a data URL, not a JSON {type(contents).__name__}")
    header, _, data = contents.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ValueError("unexpected upload encoding")
    return base64.b64decode(data, validate=True)  # binascii.Error (a ValueError) on junk characters


@dataclass
class Validated:
    """A search request checked against the index; `errors` maps a control name to its message."""

    set_info: dict | None = None
    index: int | None = None
    n: int = DEFAULT_RESULTS
    min_value: float | None = None
    max_value: float | None = None
    absolute: bool = False
    negative: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def _parse_float(text: Any) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def validate_search(state: SearchState, sets: list[dict]) -> Validated:
    out = Validated(absolute=state.absolute, negative=state.negative)
    by_id = {str(s["set_id"]): s for s in sets}
    if state.set_id is None:
        out.set_info = default_set(sets)
    elif str(state.set_id) in by_id:
        out.set_info = by_id[str(state.set_id)]
    else:
        out.errors["set"] = f"Unknown feature set {state.set_id!r}; choose one from the list."
    n_features = int(out.set_info["n_features"]) if out.set_info else None

    if state.index not in (None, ""):
        try:
            value = float(state.index)
            if not value.is_integer():
                raise ValueError
            out.index = int(value)
        except (TypeError, ValueError):
            out.errors["index"] = f"Feature index must be a whole number, not {state.index!r}."
        else:
            if n_features is not None and not 0 <= out.index < n_features:
                out.errors["index"] = f"Feature index {out.index} is out of range: this set has features 0 to {n_features - 1}."
                out.index = None
    if state.n not in (None, ""):
        try:
            value = float(state.n)
            if not value.is_integer() or not 1 <= value <= MAX_RESULTS:
                raise ValueError
            out.n = int(value)
        except (TypeError, ValueError):
            out.errors["n"] = f"Max results must be a whole number from 1 to {MAX_RESULTS}, not {state.n!r}."
    for key in ("min", "max"):
        raw = getattr(state, key)
        if raw in (None, ""):
            continue
        try:
            setattr(out, f"{key}_value", _parse_float(raw))
        except (TypeError, ValueError):
            out.errors[key] = f"{'Min' if key == 'min' else 'Max'} activation must be a number, not {raw!r}."
    if state.absolute and state.negative:
        out.errors["abs"] = "Choose one ranking: absolute value, or most negative."
    elif state.negative and out.set_info is not None and out.set_info.get("kind") == "sae":
        out.errors["abs"] = "SAE latents are never negative: there are no most-negative clips to show."
    if out.min_value is not None and out.max_value is not None and out.min_value > out.max_value:
        out.errors["min"] = f"Min activation ({out.min_value:g}) is above max activation ({out.max_value:g})."
    return out


# --------------------------------------------------------------------------------------------------------------
# Feature sets
# --------------------------------------------------------------------------------------------------------------


def default_set(sets: list[dict]) -> dict | None:
    """The set a bare /search opens: the newest SAE set if any, else the first neuron set."""
    if not sets:
        return None
    saes = [s for s in sets if s.get("kind") == "sae"]
    if saes:
        return max(saes, key=lambda s: str(s.get("created_at") or ""))
    return sets[0]


_SAE_ARCH = re.compile(r"/sae-([a-z0-9_]+)-[0-9a-f]{8}$")  # pipeline set ids: <model>/<hook>/sae-<arch>-<run8>


def set_label(s: dict) -> str:
    kind = s.get("kind")
    n = s.get("n_features")
    arch = s.get("architecture") or (m.group(1) if (m := _SAE_ARCH.search(str(s.get("set_id", "")))) else "")
    what = (f"SAE {arch}, {n} latents" if arch else f"SAE, {n} latents") if kind == "sae" else f"neurons, {n}"
    run = s.get("sae_run_id")
    if kind == "sae" and run:
        what += f", run {str(run)[:8]}"
    return f"{s.get('model', '?')} · {s.get('hook', '?')} · {what}"


def set_options(sets: list[dict]) -> list[dict]:
    return [{"label": set_label(s), "value": str(s["set_id"])} for s in sets]


# --------------------------------------------------------------------------------------------------------------
# Audio helpers
# --------------------------------------------------------------------------------------------------------------


def wav_bytes(audio: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM mono WAV in memory (every browser plays it)."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sr)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_data_uri(audio: np.ndarray) -> str:
    """`audio` as a data: URI an <audio> element plays (for audio that has no URL of its own: an upload, an edit)."""
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(audio)).decode("ascii")


def clip_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel [n_mels, frames] of a clip, cropped to its real length (100 frames/s).

    The values are those of the padded 30 s window Whisper runs: the clip gets 0.2 s of the same zero padding
    (more than one 25 ms STFT window, so no frame inside the clip sees the difference) instead of all of it,
    so a short clip's spectrogram does not cost a whole window's.
    """
    from freud_pipeline.whisper.hooks import log_mel

    n_samples = len(audio)
    tail = np.zeros(int(0.2 * SAMPLE_RATE), np.float32)
    mel = log_mel(np.concatenate([np.asarray(audio, np.float32), tail]), n_mels, pad=False)
    frames = max(1, min(mel.shape[-1], math.ceil(n_samples / (MEL_FRAME_SECONDS * SAMPLE_RATE))))
    return mel[:, :frames].cpu().numpy().astype(np.float32)


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get_or_make(self, key, make: Callable[[], Any]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class AudioStore:
    """Decoded uploads and recordings by random token, on disk (a diskcache under `<data dir>/cache/uploads`), so
    that every worker process finds them: the upload page hands a clip to the edit page by token, and the edit
    page's later requests may land on another gunicorn worker. Bounded in bytes (the least recently stored go
    first) and in time."""

    def __init__(self, directory: str | Path | Callable[[], Path], *, max_bytes: int = 2 << 30,
                 expire_s: float = 24 * 3600):
        self._directory = directory
        self.max_bytes = max_bytes
        self.expire_s = expire_s
        self._cache = None
        self._lock = threading.Lock()

    def _store(self):
        with self._lock:
            if self._cache is None:
                import diskcache

                directory = Path(self._directory() if callable(self._directory) else self._directory)
                directory.mkdir(parents=True, exist_ok=True)
                self._cache = diskcache.Cache(str(directory), size_limit=self.max_bytes,
                                              eviction_policy="least-recently-stored")
            return self._cache

    def put(self, audio) -> str:
        token = uuid.uuid4().hex
        samples = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        self._store().set(token, samples.tobytes(), expire=self.expire_s)
        return token

    def get(self, token: str):
        """The samples (float32, 16 kHz) or None when unknown or gone."""
        if not token or not token.isalnum():
            return None
        data = self._store().get(token)
        return None if data is None else np.frombuffer(data, dtype=np.float32)


@dataclass
class ClipAudio:
    clip_id: str
    audio: np.ndarray
    mel: np.ndarray  # [n_mels, frames] at 100 frames/s

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


# --------------------------------------------------------------------------------------------------------------
# Access to the index
# --------------------------------------------------------------------------------------------------------------


class IndexAccess:
    """Lazily opened FeatureIndex plus clip audio caches. Thread-safe enough for Flask's threaded server."""

    SETS_TTL_S = 1.0

    def __init__(self, index: Any | None = None, data_dir: str | Path | None = None, n_mels: int = 80):
        self._index = index
        self._index_given = index is not None
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.n_mels = n_mels
        self._lock = threading.Lock()
        self._clips = _LRU(128)
        self._rows = _LRU(4096)  # manifest rows (transcript, words) of the clips shown
        self._wavs = _LRU(64)
        self._spectrograms = _LRU(2048)
        self._pages = _LRU(128)  # rendered search pages: the same link (a shared URL, back button) costs nothing
        self._sets_cache: tuple[float, list[dict]] | None = None
        self._matches_cache: tuple[float, tuple] | None = None
        self._effects_cache: tuple[float, tuple] | None = None
        self._own_cache: tempfile.TemporaryDirectory | None = None
        # decoded uploads and recordings by random token (upload and edit pages), shared by the worker processes
        self.uploads = AudioStore(lambda: self.cache_dir("uploads"))

    # -- the index ------------------------------------------------------------------------------------------
    @property
    def index(self):
        with self._lock:
            if self._index is None:
                self._index = self._open()
            return self._index

    def _open(self):
        try:
            from freud_pipeline.features import FeatureIndex
        except ImportError as exc:  # the features package is not installed/built yet
            raise IndexUnavailable(f"The features package cannot be imported ({exc}). {EMPTY_INDEX_HINT}") from exc
        # FREUD_LANCEDB_URI (an index elsewhere: in a bucket on a cluster) wins over the data directory's own, as in
        # the pipeline (FreudStorage.index_uri)
        uri = os.environ.get("FREUD_LANCEDB_URI") or None
        if uri is None and self.data_dir is not None:
            uri = str(self.data_dir / "lancedb")
        try:
            return FeatureIndex(uri) if uri else FeatureIndex()
        except Exception as exc:  # noqa: BLE001 - anything here means "not built yet" to the user
            raise IndexUnavailable(f"The feature index cannot be opened ({exc}). {EMPTY_INDEX_HINT}") from exc

    def sets(self) -> list[dict]:
        """The index's feature sets, re-read at most every SETS_TTL_S (every callback asks; a build shows up
        within that time, as with the index's own read consistency interval)."""
        with self._lock:
            cached = self._sets_cache
        if cached is not None and time.monotonic() - cached[0] < self.SETS_TTL_S:
            return [dict(s) for s in cached[1]]
        try:
            sets = list(self.index.sets())
        except IndexUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise IndexUnavailable(f"The feature index cannot be read ({exc}). {EMPTY_INDEX_HINT}") from exc
        for s in sets:
            s["set_id"] = str(s["set_id"])
        with self._lock:
            self._sets_cache = (time.monotonic(), sets)
        return [dict(s) for s in sets]

    @staticmethod
    def builds(sets: list[dict]) -> tuple:
        """What identifies the index's current content: cached pages are valid while it is unchanged."""
        return tuple(sorted((str(s["set_id"]), str(s.get("build_id") or s.get("created_at"))) for s in sets))

    # -- feature matches across SAEs (FeatureIndex.counterparts, .seed_stability) ---------------------------------
    def _index_uri(self) -> str | None:
        return getattr(self.index, "uri", None)  # an index without a LanceDB location (a stub) has no matches

    def counterparts(self, set_id: str, index: int) -> list[dict]:
        """A feature's closest counterparts in the other indexed SAE sets ([{set_id, index, cosine, rank}]); []
        when none were computed. FeatureSetError / FeatureIndexError as the index raises them."""
        if self._index_uri() is None:
            return []
        return self.index.counterparts(str(set_id), int(index))

    def matches_version(self) -> tuple:
        """What identifies the stored counterparts (each pair's current match id), re-read at most every
        SETS_TTL_S: part of a cached search page's key, since counterparts land just after an index build."""
        with self._lock:
            cached = self._matches_cache
        if cached is not None and time.monotonic() - cached[0] < self.SETS_TTL_S:
            return cached[1]
        version: tuple = ()
        if self._index_uri() is not None:
            try:
                version = self.index.matches_version()
            except Exception:  # noqa: BLE001 - no matches table is no matches
                log.exception("cannot read the feature matches")
        with self._lock:
            self._matches_cache = (time.monotonic(), version)
        return version

    def effects_version(self) -> tuple:
        """What identifies the stored feature effects (each set's current computation), re-read at most every
        SETS_TTL_S: part of a cached search page's key."""
        with self._lock:
            cached = self._effects_cache
        if cached is not None and time.monotonic() - cached[0] < self.SETS_TTL_S:
            return cached[1]
        version: tuple = ()
        if self._index_uri() is not None:
            try:
                version = self.index.effects_version()
            except Exception:  # noqa: BLE001 - no effects table is no effects
                log.exception("cannot read the feature effects")
        with self._lock:
            self._effects_cache = (time.monotonic(), version)
        return version

    def seed_stability(self) -> list[dict]:
        """The recorded seed-stability rows, newest study first."""
        return self.index.seed_stability() if self._index_uri() is not None else []

    def cached_page(self, key):
        """A page rendered earlier for `key` (which includes `builds(...)`), or None."""
        return self._pages.get(key)

    def cache_page(self, key, page) -> None:
        self._pages.put(key, page)

    def status(self) -> tuple[list[dict], str | None]:
        """(sets, message): message says why there is nothing to show, or None."""
        try:
            sets = self.sets()
        except IndexUnavailable as exc:
            return [], str(exc)
        if not sets:
            return [], EMPTY_INDEX_HINT
        return sets, None

    # -- clips ----------------------------------------------------------------------------------------------
    def clip_row(self, clip_id: str) -> dict:
        def make() -> dict:
            try:
                row = self.index.clip(clip_id)
            except (KeyError, LookupError, ValueError) as exc:
                raise ClipNotFound(clip_id) from exc
            if not row:
                raise ClipNotFound(clip_id)
            return dict(row)

        return dict(self._rows.get_or_make(clip_id, make))

    def clip_path(self, row: dict) -> Path:
        """The clip's audio file: the manifest `path` (relative to the data directory this app was given), else
        the index's resolved `audio_path`."""
        raw = row.get("path")
        if raw and not Path(raw).is_absolute() and self.data_dir is not None:
            return objectstore.fetch(self.data_dir, raw)  # from the bucket on first use, on a cluster
        for key in ("audio_path", "abs_path", "absolute_path", "path"):
            value = row.get(key)
            if value:
                path = Path(value)
                if not path.is_absolute():
                    from freud_pipeline.settings import data_dir

                    path = data_dir() / path
                return path
        raise ClipNotFound(row.get("clip_id", "?"))

    def clip_audio(self, clip_id: str) -> ClipAudio:
        def make() -> ClipAudio:
            from freud_pipeline.audio.decode import load_audio

            path = self.clip_path(self.clip_row(clip_id))
            if not path.is_file():
                raise ClipNotFound(clip_id)
            audio = load_audio(path, max_seconds=None)
            return ClipAudio(clip_id, audio, clip_log_mel(audio, self.n_mels))

        return self._clips.get_or_make(clip_id, make)

    def clip_spectrogram(self, clip_id: str):
        """The clip's log-mel as a `figures.Spectrogram` image (it does not depend on the feature), cached in
        memory and on disk under <data dir>/cache/spectrograms: decoding a clip (an ffmpeg process) and its
        log-mel are slow next to a cache read, and every worker process and restart would otherwise repeat them."""
        from dash_app.figures import Spectrogram, spectrogram_image

        def make():
            path = self.clip_path(self.clip_row(clip_id))
            try:
                stat = path.stat()
            except OSError:
                raise ClipNotFound(clip_id) from None
            # the file's identity is part of the key: a replaced clip gets a new image
            key = hashlib.sha1(f"{clip_id}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.n_mels}".encode())
            cached = self._spectrogram_dir() / f"{key.hexdigest()}.json"
            try:
                return Spectrogram(**json.loads(cached.read_text()))
            except (OSError, ValueError, TypeError):
                pass
            spec = spectrogram_image(self.clip_audio(clip_id).mel)
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
                tmp.write_text(json.dumps(dataclasses.asdict(spec)))
                os.replace(tmp, cached)  # atomic: another worker reads a whole file or none
            except OSError:
                log.warning("cannot write the spectrogram cache under %s", cached.parent)
            return spec

        return self._spectrograms.get_or_make(clip_id, make)

    def _spectrogram_dir(self) -> Path:
        return self.cache_dir("spectrograms")

    def cache_dir(self, name: str) -> Path:
        """`<data dir>/cache/<name>`: files the app's worker processes share. With an index handed in and no data
        directory (as in tests), a temporary directory of this IndexAccess instead."""
        if self.data_dir is not None:
            return self.data_dir / "cache" / name
        if self._index_given:
            with self._lock:
                if self._own_cache is None:
                    self._own_cache = tempfile.TemporaryDirectory(prefix="freud-app-cache-")
            return Path(self._own_cache.name) / name
        from freud_pipeline.settings import data_dir

        return data_dir() / "cache" / name

    def clip_wav(self, clip_id: str) -> bytes:
        return self._wavs.get_or_make(clip_id, lambda: wav_bytes(self.clip_audio(clip_id).audio))


def audio_url(clip_id: str, download: bool = False) -> str:
    return f"/audio/{quote(str(clip_id), safe='')}" + ("?download=1" if download else "")


def spectrogram_url(clip_id: str, version: str) -> str:
    """The app's URL of a manifest clip's spectrogram PNG; `version` (the image's hash) lets browsers keep it."""
    return f"/spectrogram/{quote(str(clip_id), safe='')}.png?v={version}"


def feature_effects(access: IndexAccess, set_id: str, features: list[int]) -> tuple[dict | None, dict[int, dict]]:
    """(the set's stored effect summary with its chance level, or None when none was computed; {feature: its
    stored effect}) through the FeatureIndex. (None, {}) for an index without a LanceDB location (a stub) or when
    the effects cannot be read."""
    if access._index_uri() is None:
        return None, {}
    try:
        summary = access.index.effect_summary(str(set_id))
        rows = access.index.feature_effects(str(set_id), [int(f) for f in features]) if summary else []
    except Exception:  # noqa: BLE001 - effects are extra information: the page works without them
        log.exception("cannot read the feature effects of %s", set_id)
        return None, {}
    return summary, {int(r["feature"]): r for r in rows}


def features_by_effect(access: IndexAccess, set_id: str, limit: int = 50, descending: bool = True) -> list[dict]:
    """The set's measured features ranked by stored ΔCE when ablated, rows as `feature_effects` gives them; [] for
    an index without a LanceDB location or when nothing was computed."""
    if access._index_uri() is None:
        return []
    return access.index.features_by_effect(str(set_id), limit, descending=descending)
