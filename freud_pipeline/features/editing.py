"""Feature editing: splice an SAE into Whisper's encoder, scale chosen latents, and see what the model hears.

`edit_clip(audio, target, edits)` transcribes one clip three ways with greedy decoding (language en, no
timestamps, fp32) on its padded 30 s log-mel:

- original: Whisper as it is;
- spliced: the SAE's reconstruction x̂ replaces the activation at the hook (how much the SAE alone loses);
- edited: the chosen latents multiplied by their factors (0 ablates, negative flips, > 1 amplifies; a factor
  acts only where its latent is active, as in the original FREUD), decoded, and spliced in. With
  `keep_error=True` the SAE's error term x − x̂ is added back, so the edit is the only change to the model.

It also returns each edited latent's per-frame trace before/after the edit and the per-frame norm of the change
of the hook activation (‖decode(edited latents) − decode(latents)‖, the same with or without the error term).
The splice itself is `freud_pipeline.sae.splice` (splice + sae_replacement); this module only wires it to a
feature set and records what went through it. No Dash here: the app calls `edit_clip(audio, set_id,
edits, index=FeatureIndex)`.

Threads: the app serves several users at once. Splicing registers a forward hook on the model, which would
fire in any other forward pass of the same model object, so an edit holds the model's lock (`model_lock`) from
its first encoder pass to the end of its decode. Editing has its own cached Whisper instance, not the one
`FeatureIndex.clip_features` uses, only so that an upload's analysis need not wait for a running edit.
"""

from __future__ import annotations

import math
import re
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from freud_pipeline import objectstore
from freud_pipeline.errors import EmptyAudioError, FeatureSetError, FreudError
from freud_pipeline.frames import FRAME_SECONDS, SAMPLE_RATE

MAX_EDITS = 64
_LOAD_LOCK = threading.Lock()
_STAGE_NAMES = {"original": "original", "spliced": "SAE reconstruction", "edited": "edited"}


class EditError(FreudError, ValueError):
    """A feature edit cannot be made: bad feature list or factor, or a set without an SAE checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Parsing "12:0, 40:1.5"
# ----------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"^(\d+)(?:[:=x×*]([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?$")


def parse_factor(text: Any) -> float:
    """A finite number (the default factor of features listed without one)."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        raise EditError(f"factor must be a number (0 ablates, -1 flips, 2 doubles), not {text!r}") from None
    if not math.isfinite(value):
        raise EditError(f"factor must be finite, not {text!r}")
    return value


def parse_edits(text: str | None, default_factor: float = 0.0, n_latents: int | None = None) -> dict[int, float]:
    """'12:0, 40:1.5' -> {12: 0.0, 40: 1.5}. A feature without a factor gets `default_factor`; `12=1.5` and
    `12x1.5` are accepted too, separators are commas, semicolons or spaces."""
    raw = re.sub(r"\s*([:=x×*])\s*", r"\1", (text or "").strip())
    tokens = [t for t in re.split(r"[,;\s]+", raw) if t]
    if not tokens:
        raise EditError("list at least one feature to edit, e.g. '12' or '12:0, 40:1.5'")
    edits: dict[int, float] = {}
    for token in tokens:
        match = _TOKEN.match(token)
        if not match:
            raise EditError(f"cannot read {token!r}: write feature[:factor], e.g. '12:0, 40:1.5'")
        index = int(match.group(1))
        factor = parse_factor(match.group(2)) if match.group(2) is not None else float(default_factor)
        if index in edits:
            raise EditError(f"feature {index} is listed twice")
        if n_latents is not None and not 0 <= index < n_latents:
            raise EditError(f"feature {index} is out of range: this SAE has features 0 to {n_latents - 1}")
        edits[index] = factor
    if len(edits) > MAX_EDITS:
        raise EditError(f"at most {MAX_EDITS} features can be edited at once, not {len(edits)}")
    return edits


def format_edits(edits: Mapping[int, float]) -> str:
    return ", ".join(f"{int(j)}:{float(f):g}" for j, f in edits.items())


# ----------------------------------------------------------------------------------------------------------------
# Which SAE: a feature set of the index, or (checkpoint_dir, model, hook)
# ----------------------------------------------------------------------------------------------------------------


def sae_sets(index: Any) -> list[dict]:
    """The index's SAE feature sets (the ones that can be edited), newest first."""
    rows = [dict(s) for s in index.sets() if s.get("kind") == "sae"]
    return sorted(rows, key=lambda s: str(s.get("created_at") or ""), reverse=True)


def resolve_target(target: Any, index: Any | None = None) -> dict:
    """{set_id, sae_checkpoint, sae_sha256, model, hook} of a set id (looked up in `index.sets()`), a set row
    (dict), or a (checkpoint_dir, model, hook) tuple (sae_sha256 None: nothing to verify against)."""
    if isinstance(target, (tuple, list)):
        if len(target) != 3:
            raise EditError("give a feature set id or a (checkpoint_dir, model, hook) tuple")
        checkpoint, model, hook = target
        return {"set_id": None, "sae_checkpoint": str(checkpoint), "sae_sha256": None, "model": str(model),
                "hook": str(hook)}
    if isinstance(target, Mapping):
        row = dict(target)
    else:
        if index is None:
            raise EditError(f"feature set {target!r} needs the FeatureIndex that holds it (index=...)")
        sets = {str(s["set_id"]): s for s in index.sets()}
        if str(target) not in sets:
            known = ", ".join(sorted(k for k, s in sets.items() if s.get("kind") == "sae")) or "none"
            raise FeatureSetError(f"unknown feature set {target!r}; SAE sets: {known}")
        row = dict(sets[str(target)])
    if row.get("kind") not in (None, "sae"):
        raise EditError(f"feature set {row.get('set_id')!r} holds {row.get('kind')}s, not SAE latents: "
                        "only SAE feature sets can be edited")
    if not row.get("sae_checkpoint"):
        raise EditError(f"SAE set {row.get('set_id')!r} was built without sae_checkpoint; rebuild it with one")
    return {"set_id": row.get("set_id"), "sae_checkpoint": str(row["sae_checkpoint"]),
            "sae_sha256": row.get("sae_sha256"), "model": str(row["model"]),
            "hook": str(row["hook"])}


# ----------------------------------------------------------------------------------------------------------------
# Models (cached; editing has its own Whisper instance, see the module doc)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _edit_whisper(model: str, device: str):
    from freud_pipeline.whisper.models import load_model

    return load_model(model, device=device)


def load_sae(checkpoint: str | Path, device: str = "cpu", sha256: str | None = None):
    """The SAE of a checkpoint directory through the one cached loader uploads use too
    (`sae.checkpoint.load_verified`): verified against `sha256`, the digest its feature set recorded."""
    from freud_pipeline.sae.checkpoint import WEIGHTS_FILE, CheckpointError, load_verified, weights_path

    path = objectstore.resolve(checkpoint)  # '@data/...' as a cluster stores it: this machine's copy
    if weights_path(path) is None:  # either layout: sae_weights.safetensors, or the legacy sae.safetensors
        raise EditError(f"the SAE checkpoint {path} is missing ({WEIGHTS_FILE} not found); retrain or rebuild the set")
    try:
        return load_verified(path, sha256, device)
    except CheckpointError as exc:
        raise EditError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------------
# The edit
# ----------------------------------------------------------------------------------------------------------------


def _floats(values) -> list[float]:
    return [float(v) for v in np.round(np.asarray(values, dtype=np.float64), 6)]


def default_max_tokens(duration_s: float) -> int:
    """Greedy decoding cap: generous for speech (~3 tokens/s) but it stops a damaged reconstruction's
    repetition loop well before Whisper's 224."""
    return int(min(224, max(32, 8 * duration_s + 24)))


def edit_clip(
    audio: np.ndarray,
    target: str | tuple | Mapping,
    edits: Mapping[int, float],
    keep_error: bool = True,
    index: Any | None = None,
    *,
    device: str | None = None,
    max_new_tokens: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Transcripts (original / SAE-spliced / edited), the edited latents' traces before/after, and the
    per-frame activation change. `audio`: float32 mono 16 kHz (the first 30 s are edited). `target`: a feature
    set id of `index` (an SAE set), or (checkpoint_dir, model, hook). `edits`: {latent: factor}.
    `progress`, if given, is called with a description of each stage, outside the splices (an exception it
    raises aborts the edit; the app cancels a job this way)."""
    import torch
    import whisper

    from freud_pipeline.sae.splice import sae_replacement, splice
    from freud_pipeline.whisper.hooks import N_SAMPLES, log_mel, n_real_frames, validate_hooks
    from freud_pipeline.whisper.models import model_lock

    started = time.perf_counter()
    info = resolve_target(target, index)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        raise EmptyAudioError("the audio holds no samples; give float32 mono 16 kHz samples")
    if not edits:
        raise EditError("list at least one feature to edit")
    edits = {int(j): parse_factor(f) for j, f in dict(edits).items()}
    if len(edits) > MAX_EDITS:
        raise EditError(f"at most {MAX_EDITS} features can be edited at once, not {len(edits)}")
    device = str(device or getattr(index, "device", None) or "cpu")
    report = progress or (lambda _text: None)

    report("Loading the SAE and Whisper…")
    sae = load_sae(info["sae_checkpoint"], device, info["sae_sha256"])
    bad = [j for j in edits if not 0 <= j < sae.n_latents]
    if bad:
        raise EditError(f"feature {bad[0]} is out of range: this SAE has features 0 to {sae.n_latents - 1}")
    sae_hook = (getattr(sae, "metadata", None) or {}).get("hook_name")
    if sae_hook and sae_hook != info["hook"]:
        raise EditError(f"the SAE at {info['sae_checkpoint']} was trained on {sae_hook!r}, not {info['hook']!r}")

    window = audio[:N_SAMPLES]
    n_frames = n_real_frames(len(window))
    with _LOAD_LOCK:
        model = _edit_whisper(info["model"], device)
    validate_hooks(model, [info["hook"]])
    mel = log_mel(window, model.dims.n_mels).unsqueeze(0).to(next(model.parameters()).device)

    seen: dict[str, tuple] = {}

    def recorded(name, replace):
        def wrapped(x):
            out = replace(x)
            seen[name] = (x.detach().float().cpu(), out.detach().float().cpu())
            return out
        return wrapped

    lock = model_lock(model)  # held from the first encoder pass to the end of the decode
    if not lock.acquire(blocking=False):
        report("Waiting for another edit to finish…")
        lock.acquire()
    try:
        with torch.inference_mode():
            report("Running Whisper's encoder: original…")
            features = {"original": model.embed_audio(mel)}
            conditions = {
                "spliced": sae_replacement(sae),
                "edited": sae_replacement(sae, keep_error=keep_error, edit=edits),
            }
            for name, replace in conditions.items():
                report(f"Running Whisper's encoder: {_STAGE_NAMES[name]}…")
                with splice(model, info["hook"], recorded(name, replace), n_frames):
                    features[name] = model.embed_audio(mel)
            x = seen["spliced"][0]
            if x.shape[-1] != sae.d_in:
                raise EditError(f"the SAE takes {sae.d_in}-wide activations but {info['hook']} gives {x.shape[-1]}")
            limit = max_new_tokens or default_max_tokens(len(window) / SAMPLE_RATE)
            options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=limit)
            order = ["original", "spliced", "edited"]
            report("Transcribing original, SAE reconstruction and edited…")  # one batched decode
            results = whisper.decode(model, torch.cat([features[k] for k in order]).float(), options)
            transcripts = {k: r.text.strip() for k, r in zip(order, results)}

            report("Comparing the activations…")
            parameter = next(sae.parameters())
            latents = sae.encode(x.to(parameter.device, parameter.dtype)).float().cpu()
            x_hat = seen["spliced"][1]
    finally:
        lock.release()
    edited_act = seen["edited"][1]
    reference = x if keep_error else x_hat  # the same activation without the edit
    change = (edited_act - reference).norm(dim=-1).numpy()
    output_change = (features["edited"][0, :n_frames] - (features["original"] if keep_error else features["spliced"])
                     [0, :n_frames]).float().norm(dim=-1).cpu().numpy()
    total = float((x - x.mean(0)).double().pow(2).sum())
    fvu = float((x - x_hat).double().pow(2).sum() / total) if total > 0 else float("nan")

    traces, inactive = {}, []
    for j, factor in edits.items():
        before = latents[:, j].numpy()
        after = before * factor  # what sae_replacement decodes: the factor scales the latent where it is active
        active = int((before != 0).sum())
        if active == 0:
            inactive.append(j)
        peak = int(np.argmax(np.abs(before))) if before.size else 0
        traces[j] = {"factor": factor, "before": _floats(before), "after": _floats(after), "active_frames": active,
                     "peak": float(before[peak]) if before.size else 0.0, "peak_time_s": (peak + 0.5) * FRAME_SECONDS}
    return {
        "set_id": info["set_id"],
        "model": info["model"],
        "hook": info["hook"],
        "sae_checkpoint": info["sae_checkpoint"],
        "n_latents": int(sae.n_latents),
        "keep_error": bool(keep_error),
        "edits": edits,
        "duration_s": len(audio) / SAMPLE_RATE,
        "edited_seconds": len(window) / SAMPLE_RATE,
        "truncated": len(audio) > N_SAMPLES,
        "n_frames": int(n_frames),
        "frame_seconds": FRAME_SECONDS,
        "transcripts": transcripts,
        "changed": transcripts["edited"] != (transcripts["original"] if keep_error else transcripts["spliced"]),
        "traces": traces,
        "inactive": inactive,
        "activation_change": _floats(change),
        "activation_norm": _floats(x.norm(dim=-1).numpy()),
        "max_activation_change": float(change.max()) if change.size else 0.0,
        "encoder_output_change": _floats(output_change),
        "reconstruction_fvu": fvu,
        "max_new_tokens": int(limit),
        "seconds": round(time.perf_counter() - started, 3),
    }


def word_diff(reference: str, other: str) -> list[tuple[str, str]]:
    """[(op, text)] turning `reference` into `other` word by word; op is 'same', 'new' (in `other` only) or
    'gone' (in `reference` only). For highlighting transcript differences."""
    import difflib

    a, b = (reference or "").split(), (other or "").split()
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=[w.lower() for w in a], b=[w.lower() for w in b],
                                                      autojunk=False).get_opcodes():
        if op == "equal":
            out.append(("same", " ".join(b[j1:j2])))
            continue
        if i2 > i1:
            out.append(("gone", " ".join(a[i1:i2])))
        if j2 > j1:
            out.append(("new", " ".join(b[j1:j2])))
    return out


__all__ = ["EditError", "edit_clip", "format_edits", "load_sae", "parse_edits", "parse_factor", "resolve_target",
           "sae_sets", "word_diff"]
