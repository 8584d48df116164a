"""SAE checkpoints on disk: `sae_weights.safetensors` + `cfg.json`, loadable as saved by SAELens' `SAE.load_from_disk`;
plus the original FREUD's `.pth`. The format is described in docs/SAE_FORMAT.md.

sae_weights.safetensors holds W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (JumpReLU adds
its per-latent `threshold` [d_sae]; BatchTopK and Matryoshka BatchTopK their one threshold, repeated, as SAELens'
JumpReLU SAE wants it; the tied L1 SAE stores its one matrix both ways and a zero b_dec). Weights always take raw
activations (any training-time input scaling is folded in), hence normalize_activations "none". cfg.json's
`architecture` is SAELens' name for the equations (topk, standard, jumprelu); ours is `freud_architecture`.

Checkpoints written before that layout (`sae.safetensors`, our architecture names in `architecture`, a scalar
threshold) still load.

A checkpoint is identified by the sha256 of its weights file (`checkpoint_sha256`): a feature set records it, and
`load_verified` — the one cached loader the app and the feature index use — refuses weights with another digest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from freud_pipeline import objectstore
from freud_pipeline.devices import resolve_device
from freud_pipeline.errors import FreudError
from freud_pipeline.sae.architectures import architecture_class
from freud_pipeline.sae.base import SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens' name
LEGACY_WEIGHTS_FILE = "sae.safetensors"  # checkpoints written before the SAELens layout
CFG_FILE = "cfg.json"

# Our architecture -> the SAELens architecture with the same inference equations (docs/SAE_FORMAT.md).
SAELENS_ARCHITECTURE = {"topk": "topk", "l1": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                        "matryoshka_batchtopk": "jumprelu"}
# What a cfg.json without freud_architecture (written before the SAELens layout) can name in `architecture`.
_LEGACY_ARCHITECTURES = ("topk", "l1", "batchtopk")
# Keys describing the file format rather than the SAE: always written by save_checkpoint, never kept as metadata.
_FORMAT_KEYS = (
    "architecture", "freud_architecture", "d_in", "d_sae", "dtype", "normalize_activations", "apply_b_dec_to_input",
    "reshape_activations",
)  # fmt: skip


class CheckpointError(FreudError, ValueError):
    """An SAE checkpoint is missing, incomplete or in a format this version cannot read."""


class CheckpointDigestError(CheckpointError):
    """An SAE checkpoint's weights are not the ones that were recorded (their sha256 differs)."""


def weights_path(directory: str | Path) -> Path | None:
    """The weights file of a checkpoint directory (the SAELens name, else the legacy one); None if neither exists."""
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def save_checkpoint(sae: SparseAutoencoder, directory: str | Path, extra_cfg: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # clone(): safetensors refuses tensors sharing storage (the tied SAE exports W and Wᵀ).
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in sae.export_tensors().items()}
    dtype = str(tensors["W_dec"].dtype).removeprefix("torch.")
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():  # overwriting a checkpoint of the old layout: do not leave stale weights beside the new
        legacy.unlink()
    cfg = {"k": None}
    cfg.update(sae.cfg)
    cfg.update(extra_cfg or {})
    cfg.update({
        "architecture": SAELENS_ARCHITECTURE[sae.architecture],
        "freud_architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": dtype,
        "normalize_activations": "none",
        "apply_b_dec_to_input": True,
        "reshape_activations": "none",
    })  # fmt: skip
    # SAELens reads a cfg.json without sae_lens_version as its pre-6.0 flat format, and that path fails on a null
    # hook_name: unknown placement keys are left out rather than written as null.
    for key in ("hook_name", "model_name"):
        if cfg.get(key) is None:
            cfg.pop(key, None)
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return directory


def checkpoint_architecture(cfg: dict) -> str:
    """Our architecture name of a checkpoint's cfg.json (either layout)."""
    if "freud_architecture" in cfg:
        return cfg["freud_architecture"]
    architecture = cfg.get("architecture", "topk")
    if architecture not in _LEGACY_ARCHITECTURES:  # e.g. "standard" or "jumprelu" without freud_architecture
        raise ValueError(
            f"architecture {architecture!r} without freud_architecture: not a FREUD checkpoint (SAELens' own SAEs "
            f"are not tied L1 or BatchTopK SAEs in general)"
        )
    return architecture


def checkpoint_sha256(directory: str | Path) -> str:
    """sha256 (hex) of a checkpoint's weights file: what a feature set records and `load_verified` checks."""
    weights = weights_path(directory)
    if weights is None:
        raise CheckpointError(f"{directory} is not an SAE checkpoint: no {WEIGHTS_FILE}")
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    sha256: str | None = None) -> SparseAutoencoder:
    """The SAE of a checkpoint directory. With `sha256`, the weights must have that digest (checked on the very
    bytes that are loaded), else CheckpointDigestError."""
    directory = objectstore.resolve(directory)
    weights, cfg_path = weights_path(directory), directory / CFG_FILE
    if weights is None or not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not an SAE checkpoint: it needs both {WEIGHTS_FILE} and {CFG_FILE}")
    data = weights.read_bytes()
    if sha256 and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise CheckpointDigestError(
            f"{weights}: the weights' sha256 is {actual[:16]}…, not the {sha256[:16]}… recorded when the feature "
            f"set was built: this checkpoint was changed since; rebuild the feature set from an intact SAE run")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("normalize_activations", "none") != "none":
        raise CheckpointError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported; only 'none'"
        )
    if not cfg.get("apply_b_dec_to_input", True):
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input=false is not supported")
    try:
        sae = architecture_class(checkpoint_architecture(cfg)).from_cfg(cfg)
        sae.load_exported(load_bytes(data))
    except ValueError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc
    sae.metadata = {k: v for k, v in cfg.items() if k not in sae.cfg and k not in _FORMAT_KEYS}
    return sae.to(resolve_device(device)).eval()


_VERIFIED_MAX = 4
_verified: OrderedDict[tuple[str, str, str], SparseAutoencoder] = OrderedDict()
_verified_lock = threading.Lock()


def load_verified(directory: str | Path, sha256: str | None, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE of a checkpoint, verified against `sha256` and cached by (directory, sha256, device): the one
    loader behind uploads, edits and the feature index, so every page sees the weights a set was mined with.

    A cached SAE stays valid however the file changes later: its key is the digest it was verified against.
    `sha256` None (sets built before digests were recorded) keys on the weights file's size and modification
    time instead, so a rewritten file is reloaded, never served stale. Returned SAEs are shared: read only."""
    directory = objectstore.resolve(directory).resolve()
    if sha256:
        version = sha256
    else:
        weights = weights_path(directory)
        if weights is None:
            raise CheckpointError(f"{directory} is not an SAE checkpoint: no {WEIGHTS_FILE}")
        stat = weights.stat()
        version = f"unverified:{stat.st_size}:{stat.st_mtime_ns}"
    key = (str(directory), version, str(device))
    with _verified_lock:  # one load per key even when several requests ask at once
        sae = _verified.get(key)
        if sae is None:
            sae = _verified[key] = load_checkpoint(directory, device=device, sha256=sha256)
            while len(_verified) > _VERIFIED_MAX:
                _verified.popitem(last=False)
        _verified.move_to_end(key)
        return sae


def clear_verified_cache() -> None:
    """Forget every SAE `load_verified` holds (the next call reads and verifies the files again)."""
    with _verified_lock:
        _verified.clear()


def load_original_freud_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", trust_pickle: bool = False
) -> SparseAutoencoder:
    """An SAE from the original FREUD project's training checkpoint (`torch.save` of a dict).

    Assumed layout: {"model": state_dict, "optimizer", "scheduler", "step", "best_val_loss",
    "hparams": {"autoencoder_variant": "l1"|"topk", "autoencoder_config": {...}, "activation_size",
    "whisper_config": {"model", "layer_name"}, ...}}, with state-dict keys
      l1   : "decoder.weight" [d_in, n] (tied; columns are latents), "encoder_bias" [n]
      topk : "encoder.weight" [n, d_in], "encoder.bias" [n], "W_dec" [n, d_in], "b_dec" [d_in]  (EleutherAI sae)
    optionally prefixed by "module." (DDP) or "_orig_mod." (torch.compile). Original SAEs took raw activations.
    Only tensors and plain containers are unpickled unless `trust_pickle` (a pickle can run arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no original FREUD checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(
            f"{path} could not be read as a torch checkpoint ({exc}); if it holds custom objects and you trust "
            f"its origin, pass trust_pickle=True"
        ) from exc
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "hparams" not in checkpoint:
        raise CheckpointError(f"{path} is not an original FREUD checkpoint: expected a dict with 'model' and 'hparams'")
    hparams = checkpoint["hparams"]
    variant = hparams.get("autoencoder_variant")
    state = {_strip_prefixes(k): v for k, v in checkpoint["model"].items()}
    config = hparams.get("autoencoder_config") or {}
    if variant == "l1":
        _require(state, ("decoder.weight", "encoder_bias"), path)
        d_in, n_latents = state["decoder.weight"].shape
        sae_cls, kwargs = architecture_class("l1"), {"recon_alpha": float(config.get("recon_alpha", 1.0))}
        if "l1_alpha" in hparams:
            kwargs["l1_alpha"] = float(hparams["l1_alpha"])
    elif variant == "topk":
        _require(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
        n_latents, d_in = state["W_dec"].shape
        sae_cls, kwargs = architecture_class("topk"), {"k": int(config.get("k", 32))}
        if "auxk_alpha" in config:
            kwargs["auxk_alpha"] = float(config["auxk_alpha"])
    else:
        raise CheckpointError(f"{path}: autoencoder_variant {variant!r} is not supported; expected 'l1' or 'topk'")
    sae = sae_cls(int(d_in), int(n_latents), **kwargs)
    names = dict(sae.named_parameters())
    sae.load_state_dict({k: v for k, v in state.items() if k in names}, strict=True)
    whisper_config = hparams.get("whisper_config") or {}
    sae.metadata = {
        "model_name": whisper_config.get("model"),
        "hook_name": whisper_config.get("layer_name"),
        "source": f"original-freud:{path.name}",
        "step": int(checkpoint.get("step", 0) or 0),
    }
    return sae.to(resolve_device(device)).eval()


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def _require(state: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: state dict lacks {', '.join(missing)} (has {', '.join(sorted(state))})")
