"""Feature effects: what ablating one SAE feature does to the transcript.

For each feature, on its top clips (the index's top examples: clips of at most one 30 s window with a manifest
transcript, where the feature fires), teacher-forced decoder cross-entropy of the clip's transcript with the
feature ablated, against the same without the ablation.

Baseline: **the original model.** The SAE is spliced in with its error term kept, so the hook activation becomes
x + (decode(z with z_f = 0) − decode(z)) = x − z_f · d_f, with d_f = decode(e_f) − decode(0) the feature's decoder
direction (every SAE here decodes affinely): only the feature's own contribution is removed, on the frames where
it fires, and the SAE's reconstruction error is not part of the effect. The unablated row is x itself.

- ΔCE of a clip: (CE ablated − CE original) / transcript tokens (nats per token, end-of-text included, as in
  `sae.splice.splice_eval`); a feature's ΔCE is the mean over its clips, with a Student t interval.
- ΔWER (greedy decoding, `whisper.decode`) for the `wer_features` features of largest ΔCE, on the same clips:
  (word errors ablated − word errors original) / reference words.
- Chance level, per set: the same ablation along a random unit direction scaled to ‖d_f‖ (same frames, same
  per-frame magnitudes z_f) for `chance_features` features drawn at random; its mean ΔCE with an interval, and the
  95th percentile of |ΔCE| over those features, which an effect should exceed to be told from noise.

Cost: for a residual-stream hook the encoder blocks up to the hook run once per clip (`sae.splice.original_pass`),
and each (feature, clip) ablation costs the rest of the encoder and one teacher-forced decoder pass, batched
`batch_size` rows per clip. Every batch starts with the clip's unablated row, so a ΔCE is a difference within one
batch: an ablation that changes nothing (a feature silent on the clip) gives exactly 0. The splice machinery is
`sae.splice`'s (`encode_replaced`, `cross_entropy`, `transcript_tokens`, `greedy_options`); results are stored
by `features.effect_store`.

Threads: `feature_effects` holds the model's lock (`model_lock`) from its first encoder pass to its last decode.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from freud_pipeline.errors import FeatureSetError, FreudError

log = logging.getLogger(__name__)

BASELINE = ("original model: SAE spliced in with its error term kept, so ablating feature f sets the hook activation "
            "to x - z_f * d_f (d_f its decoder direction) and the unablated activation is x")
CHANCE = "random unit direction scaled to the feature's decoder norm, on the same frames with the same z_f"


class EffectError(FreudError, ValueError):
    """Feature effects cannot be computed: not an SAE set, no checkpoint, no usable clips, bad arguments."""


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval of the mean; NaN bounds for fewer than two values."""
    from scipy.special import stdtrit

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stdtrit(x.size - 1, 0.5 + confidence / 2) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def feature_effects(
    model,
    sae,
    hook: str,
    clips: Mapping[str, tuple[np.ndarray, str]],
    features: Mapping[int, Sequence[str]],
    *,
    clips_per_feature: int = 4,
    wer_features: int = 8,
    chance_features: int = 32,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """ΔCE (and for a few features ΔWER) of ablating each feature alone on its clips, and the set's chance level.

    `clips`: {clip_id: (float32 mono 16 kHz audio of at most 30 s, reference transcript)}. `features`: {feature:
    its top clip ids, strongest first}; the first `clips_per_feature` that `clips` holds are used. `max_new_tokens`
    caps greedy decoding (default: `editing.default_max_tokens` of each clip). `progress(stage, done, total)` is
    called after each clip with the ablations done. Returns {features: [{feature, delta_ce, ci_low, ci_high, n_clips, clip_ids,
    clip_delta_ce, delta_wer, wer_clips, chance_delta_ce, chance_clip_delta_ce}] by feature, chance: {delta_ce,
    ci_low, ci_high, n_features, abs_p95, method}, share_above_chance, n_clips, n_ablations, n_controls, seconds,
    ce_seconds (the ΔCE pass, of which prefix_seconds: the blocks up to the hook, once per clip), wer_seconds};
    a feature with no usable clip is left out.
    """
    import torch
    import whisper

    from freud_pipeline.audio.text import normalise_transcript, word_errors
    from freud_pipeline.features.build import decoder_directions
    from freud_pipeline.features.editing import default_max_tokens
    from freud_pipeline.frames import SAMPLE_RATE
    from freud_pipeline.sae.splice import (cross_entropy, encode_replaced, encoder_suffix, greedy_options,
                                           original_pass, transcript_tokens)
    from freud_pipeline.whisper.hooks import N_SAMPLES, log_mel, n_real_frames, validate_hooks
    from freud_pipeline.whisper.models import model_lock

    if batch_size < 2:
        raise EffectError(f"batch_size must be at least 2 (the unablated row and one ablation), not {batch_size}")
    bad = [f for f in features if not 0 <= int(f) < sae.n_latents]
    if bad:
        raise EffectError(f"feature {bad[0]} is out of range: this SAE has features 0 to {sae.n_latents - 1}")
    for clip_id, (audio, text) in clips.items():
        if not normalise_transcript(text or ""):
            raise EffectError(f"clip {clip_id!r} has no reference transcript: CE needs one")
        if len(audio) > N_SAMPLES:
            raise EffectError(f"clip {clip_id!r} is longer than Whisper's 30 s window")
    chosen = {int(f): [c for c in dict.fromkeys(ids) if c in clips][:clips_per_feature] for f, ids in features.items()}
    chosen = {f: ids for f, ids in sorted(chosen.items()) if ids}
    rng = np.random.default_rng(seed)
    controls = sorted(int(f) for f in rng.choice(list(chosen), min(chance_features, len(chosen)), replace=False)) \
        if chosen else []
    started = time.perf_counter()
    report = progress or (lambda *_: None)

    with torch.inference_mode(), model_lock(model):
        validate_hooks(model, [hook])
        device = next(model.parameters()).device
        parameter = next(sae.parameters())
        suffix = encoder_suffix(model, hook)
        prompt, tokens_of = transcript_tokens(model)
        rows_of = decoder_directions(sae)[list(chosen)] if chosen else np.zeros((0, sae.d_in), np.float32)
        directions = {f: torch.from_numpy(row).to(parameter.device, parameter.dtype) for f, row in zip(chosen, rows_of)}
        generator = torch.Generator().manual_seed(seed)
        random_dirs = {}
        for f in controls:
            u = torch.randn(sae.d_in, generator=generator, dtype=torch.float64)
            random_dirs[f] = (u / u.norm() * directions[f].double().norm().cpu()).to(parameter.device, parameter.dtype)

        timing = {"prefix": 0.0}

        def run_clip(clip_id: str, jobs: list[tuple[int, str]], decode: bool) -> tuple[list[float], list[str], str]:
            """ΔCE per job (feature, "ablate" | "chance") on one clip; with `decode`, the jobs' greedy transcripts
            and the original's instead."""
            clock = time.perf_counter()
            audio, text = clips[clip_id]
            mel = log_mel(audio, model.dims.n_mels).unsqueeze(0).to(device)
            n = n_real_frames(len(audio))
            _, hooked = original_pass(model, mel, hook)
            if hooked.shape[-1] != sae.d_in:
                raise EffectError(f"the SAE takes {sae.d_in}-wide activations but {hook} gives {hooked.shape[-1]}")
            latents = sae.encode(hooked[0, :n].to(parameter.device, parameter.dtype))
            tokens = tokens_of(text)
            n_tokens = len(tokens) - len(prompt)
            options = greedy_options(max_new_tokens or default_max_tokens(len(audio) / SAMPLE_RATE))
            deltas, texts, original = [], [], ""
            timing["prefix"] += time.perf_counter() - clock
            for start in range(0, len(jobs), batch_size - 1):
                part = jobs[start : start + batch_size - 1]
                shifts = [-latents[:, f : f + 1] * (directions[f] if kind == "ablate" else random_dirs[f])
                          for f, kind in part]
                replace = [lambda a: a] + [lambda a, s=s: a + s.to(a.device, a.dtype) for s in shifts]
                rows = len(replace)
                audio_features = encode_replaced(
                    model, None if suffix is not None else mel.expand(rows, -1, -1), hook, replace, [n] * rows,
                    hooked.expand(rows, -1, -1), suffix)
                if decode:
                    results = whisper.decode(model, audio_features, options)
                    original = results[0].text
                    texts += [r.text for r in results[1:]]
                else:
                    ce = cross_entropy(model, audio_features, [tokens] * rows, len(prompt))
                    deltas += ((ce[1:] - ce[0]) / n_tokens).tolist()
            return deltas, texts, original

        # Pass 1: ΔCE of every feature and control on its clips, one clip at a time.
        jobs: dict[str, list[tuple[int, str]]] = {}
        for f, ids in chosen.items():
            for clip_id in ids:
                jobs.setdefault(clip_id, []).append((f, "ablate"))
                if f in random_dirs:
                    jobs[clip_id].append((f, "chance"))
        measured: dict[tuple[int, str], dict[str, float]] = {}
        total, done = sum(map(len, jobs.values())), 0
        for clip_id, clip_jobs in jobs.items():
            deltas, _, _ = run_clip(clip_id, clip_jobs, decode=False)
            for (f, kind), delta in zip(clip_jobs, deltas):
                measured.setdefault((f, kind), {})[clip_id] = delta
            done += len(clip_jobs)
            report("cross-entropy", done, total)
        ce_seconds, prefix_seconds = time.perf_counter() - started, timing["prefix"]

        rows = {}
        for f, ids in chosen.items():
            per_clip = [measured[(f, "ablate")][c] for c in ids]
            mean, low, high = t_interval(per_clip, confidence)
            chance = measured.get((f, "chance"))
            rows[f] = {"feature": f, "delta_ce": mean, "ci_low": low, "ci_high": high, "n_clips": len(ids),
                       "clip_ids": list(ids), "clip_delta_ce": per_clip, "delta_wer": None, "wer_clips": 0,
                       "chance_delta_ce": float(np.mean([chance[c] for c in ids])) if chance else None,
                       "chance_clip_delta_ce": [chance[c] for c in ids] if chance else None}

        # Pass 2: ΔWER of the features of largest ΔCE (greedy decoding is the costly part).
        wer_started = time.perf_counter()
        ranked = sorted(rows, key=lambda f: (-rows[f]["delta_ce"], f))[: max(0, wer_features)]
        wer_jobs: dict[str, list[tuple[int, str]]] = {}
        for f in ranked:
            for clip_id in chosen[f]:
                wer_jobs.setdefault(clip_id, []).append((f, "ablate"))
        hypotheses: dict[tuple[int, str], str] = {}
        originals: dict[str, str] = {}
        total, done = sum(map(len, wer_jobs.values())), 0
        for clip_id, clip_jobs in wer_jobs.items():
            _, texts, originals[clip_id] = run_clip(clip_id, clip_jobs, decode=True)
            for (f, _kind), text in zip(clip_jobs, texts):
                hypotheses[(f, clip_id)] = text
            done += len(clip_jobs)
            report("word error rate", done, total)
        for f in ranked:
            ids = chosen[f]
            references = [clips[c][1] for c in ids]
            base, words = word_errors(references, [originals[c] for c in ids])
            ablated, _ = word_errors(references, [hypotheses[(f, c)] for c in ids])
            rows[f]["delta_wer"] = float((ablated.sum() - base.sum()) / words.sum()) if words.sum() else None
            rows[f]["wer_clips"] = len(ids)
        wer_seconds = time.perf_counter() - wer_started

    chance_means = [rows[f]["chance_delta_ce"] for f in controls]
    mean, low, high = t_interval(chance_means, confidence)
    chance = {"delta_ce": mean, "ci_low": low, "ci_high": high, "n_features": len(chance_means),
              "abs_p95": float(np.quantile(np.abs(chance_means), 0.95)) if chance_means else float("nan"),
              "method": CHANCE}
    effects = [rows[f] for f in sorted(rows)]
    above = [r for r in effects if np.isfinite(chance["abs_p95"]) and r["delta_ce"] > chance["abs_p95"]]
    return {"features": effects, "chance": chance, "baseline": BASELINE, "confidence": confidence,
            "n_clips": len(jobs), "n_ablations": sum(len(ids) for ids in chosen.values()),
            "n_controls": sum(len(chosen[f]) for f in controls), "share_above_chance": len(above) / len(effects)
            if effects else float("nan"), "ce_seconds": ce_seconds, "prefix_seconds": prefix_seconds,
            "wer_seconds": wer_seconds,
            "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------------
# From a feature set of the index: which features, which clips
# ----------------------------------------------------------------------------------------------------------------


def sae_set_row(set_id: str, uri: str | None = None) -> dict:
    """The pointer row of an SAE set with a checkpoint; FeatureSetError for an unknown set, EffectError else."""
    from freud_pipeline.features import store

    db = store.connect(uri)
    rows = []
    if store.FEATURE_SETS in store.table_names(db):
        rows = db.open_table(store.FEATURE_SETS).search().limit(None).to_list()
    by_id = {row["set_id"]: row for row in rows}
    if set_id not in by_id:
        known = ", ".join(sorted(s for s, r in by_id.items() if r["kind"] == "sae")) or "none yet"
        raise FeatureSetError(f"unknown feature set {set_id!r}; SAE sets: {known}")
    row = by_id[set_id]
    if row["kind"] != "sae":
        raise EffectError(f"feature set {set_id!r} holds {row['kind']}s, not SAE latents: effects are of SAE features")
    if not row.get("sae_checkpoint"):
        raise EffectError(f"SAE set {set_id!r} was built without sae_checkpoint; rebuild it with one")
    return row


def frequent_features(set_row: dict, limit: int | None, uri: str | None = None) -> list[int]:
    """The set's features that fire, most frequently firing first (density, then index); the first `limit`."""
    from freud_pipeline.features import store

    table = (store.connect(uri).open_table(store.FEATURES).search()
             .where(f"build_id = {store.sql_str(set_row['build_id'])}").select(["index", "density"])
             .limit(None).to_arrow())
    index, density = table["index"].to_numpy(), np.nan_to_num(table["density"].to_numpy(zero_copy_only=False))
    order = np.lexsort((index, -density))
    return [int(index[i]) for i in order if density[i] > 0][:limit]


def top_clips(set_row: dict, features: Sequence[int], clips_per_feature: int, uri: str | None = None,
              data_root=None) -> tuple[dict[int, list[str]], dict[str, dict]]:
    """({feature: up to `clips_per_feature` clip ids, strongest first}, {clip_id: manifest row with `audio_path`})
    from the set's top examples: clips where the feature's peak is > 0, of at most 30 s, with a transcript, whose
    audio file exists (`path` resolved against `data_root`, default settings.data_dir())."""
    from pathlib import Path

    from freud_pipeline.audio.text import normalise_transcript
    from freud_pipeline.features import store
    from freud_pipeline.settings import data_dir
    from freud_pipeline.frames import SAMPLE_RATE
    from freud_pipeline.whisper.hooks import N_SAMPLES

    features = [int(f) for f in features]
    if not features:
        return {}, {}
    where = f"sign = '+' AND feature IN ({', '.join(map(str, features))})"
    examples = store.example_rows(set_row, where, ["feature", "clip_ids", "values"], uri).to_pylist()
    wanted = list(dict.fromkeys(c for row in examples for c, v in zip(row["clip_ids"], row["values"]) if v > 0))
    db, rows = store.connect(uri), {}
    for start in range(0, len(wanted), 500):
        part = ", ".join(map(store.sql_str, wanted[start : start + 500]))
        for row in db.open_table(store.CLIPS).search().where(f"clip_id IN ({part})").limit(None).to_list():
            rows[row["clip_id"]] = row
    root = Path(data_root) if data_root is not None else data_dir()
    usable = {}
    for clip_id in wanted:
        row = rows.get(clip_id)
        if row is None or not normalise_transcript(row.get("transcript") or "") or not row.get("path"):
            continue
        if (row.get("duration_s") or 0) > N_SAMPLES / SAMPLE_RATE:
            continue
        path = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
        if path.is_file():
            usable[clip_id] = {**row, "audio_path": str(path)}
    chosen = {}
    for row in examples:
        ids = [c for c, v in zip(row["clip_ids"], row["values"]) if v > 0 and c in usable][:clips_per_feature]
        if ids:
            chosen[int(row["feature"])] = ids
    return chosen, {c: usable[c] for c in dict.fromkeys(c for ids in chosen.values() for c in ids)}


def compute_feature_effects(
    set_id: str,
    *,
    uri: str | None = None,
    data_root=None,
    device: str = "cpu",
    features: Sequence[int] | None = None,
    max_features: int | None = 256,
    clips_per_feature: int = 4,
    wer_features: int = 8,
    chance_features: int = 32,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    seed: int = 0,
    write: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Effects of an indexed SAE set's features (the given `features`, else the `max_features` most frequently
    firing; None: all that fire) on their top clips, stored in LanceDB (`effect_store.write_effects`) unless
    `write` is False. Returns `feature_effects`' result with set_id, build_id, computation_id (None unwritten)."""
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.devices import resolve_device
    from freud_pipeline.features import effect_store
    from freud_pipeline.features.editing import load_sae
    from freud_pipeline.whisper.models import load_model

    set_row = sae_set_row(set_id, uri)
    n = int(set_row["n_features"])
    if features:
        bad = [f for f in features if not 0 <= int(f) < n]
        if bad:
            raise EffectError(f"feature {bad[0]} is out of range for set {set_id!r}: valid indices are 0..{n - 1}")
        wanted = list(dict.fromkeys(int(f) for f in features))
    else:
        wanted = frequent_features(set_row, max_features, uri)
    started = time.perf_counter()
    chosen, rows = top_clips(set_row, wanted, clips_per_feature, uri, data_root)
    if not chosen:
        raise EffectError(f"no feature of set {set_id!r} has a usable top clip (at most 30 s, with a transcript and "
                          "its audio file): nothing to measure")
    clips = {c: (load_audio(row["audio_path"]), row["transcript"]) for c, row in rows.items()}
    device = str(resolve_device(device))
    sae = load_sae(set_row["sae_checkpoint"], device, set_row.get("sae_sha256"))
    model = load_model(set_row["model"], device=device)
    load_seconds = time.perf_counter() - started
    result = feature_effects(model, sae, set_row["hook"], clips, chosen, clips_per_feature=clips_per_feature,
                             wer_features=wer_features, chance_features=chance_features, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    result |= {"set_id": set_id, "build_id": set_row["build_id"], "sae_sha256": set_row.get("sae_sha256"),
               "device": device, "n_requested": len(wanted), "load_seconds": load_seconds,
               "clips_per_feature": clips_per_feature, "wer_features": wer_features, "computation_id": None}
    if write:
        result["computation_id"] = effect_store.write_effects(set_row, result, uri=uri)
    return result


__all__ = ["BASELINE", "CHANCE", "EffectError", "compute_feature_effects", "feature_effects", "frequent_features",
           "sae_set_row", "t_interval", "top_clips"]
