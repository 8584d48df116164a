"""Mine, label and publish one feature set."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from freud_pipeline.audio.decode import load_audio
from freud_pipeline.errors import FreudError
from freud_pipeline.features import store
from freud_pipeline.features.labels import LabelCollector
from freud_pipeline.features.mining import MiningError, mine_features
from freud_pipeline.frames import frame_loudness_db

log = logging.getLogger(__name__)


def build_feature_set(
    clips_iter: Iterable[tuple[str, Any]],
    *,
    set_id: str,
    model: str,
    hook: str,
    kind: str,
    manifest_df: pd.DataFrame | None,
    alignments_df: pd.DataFrame | None = None,
    index_uri: str | None = None,
    sae_run_id: str | None = None,
    sae_checkpoint: str | None = None,
    sae_sha256: str | None = None,
    shard_dir: str | None = None,
    decoder: np.ndarray | None = None,
    top_k: int = 32,
    n_features: int | None = None,
    fire_threshold: float = 0.0,
    trace_radius: int = 750,
    occurrences_per_phone: int = 64,
    heldout_speakers: list[str] | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Mine `clips_iter` ((clip_id, acts[frames, n_features]); SAE sets pass latents, see
    `mining.encoded_clips`), label against `alignments_df` when given, and publish as `set_id`.

    decoder: SAE decoder directions [n_features, d_in] (similarity = decoder cosine); neuron sets use the
    activation signature. sae_run_id / sae_checkpoint / sae_sha256: the SAE run an SAE set's latents come from,
    its checkpoint directory and the weights' sha256 (`sae.checkpoint.checkpoint_sha256`), which every later
    load of the set's SAE is verified against. fire_threshold: a frame "fires" above it (density); 0 suits SAE
    latents and GELU neurons (positive exactly when the pre-activation is), signed hooks may want a larger one.
    Labels are learned on some aligned clips and validated on the others (`labels.heldout_split`: by the
    manifest's `speaker` column when it names several, or `heldout_speakers`; else a fixed half of the clips).
    data_root: the root the manifest's `path` column is relative to; with it, each aligned clip's audio is read
    once more during the pass for its per-frame loudness (the loudness artefact test; an unreadable clip has no
    loud frames). Returns a summary (set_id, build_id, n_features, n_clips, n_frames, label_summary, seconds).
    """
    if kind not in store.KINDS:
        raise MiningError(f"kind must be one of {store.KINDS}, got {kind!r}")
    started = time.monotonic()
    clips_iter = iter(clips_iter)
    first = next(clips_iter, None)
    if first is None:
        raise MiningError(f"no clips given for feature set {set_id!r}")
    n_features = int(n_features or first[1].shape[1])
    if decoder is not None:
        decoder = np.asarray(decoder, dtype=np.float32)
        if decoder.ndim != 2 or decoder.shape[0] != n_features:
            raise MiningError(f"decoder must be [n_features={n_features}, d_in], got {decoder.shape}; "
                              f"transpose a [d_in, n_latents] weight")
    collector = (LabelCollector(alignments_df, n_features, top_k, occurrences_per_phone, seed, manifest=manifest_df,
                                heldout_speakers=heldout_speakers, fire_threshold=fire_threshold,
                                loudness=clip_loudness(manifest_df, data_root))
                 if alignments_df is not None and len(alignments_df) else None)

    def all_clips():
        yield first
        yield from clips_iter

    mining = mine_features(
        all_clips(), n_features, top_k, trace_radius,
        bottom_k=0 if kind == "sae" else top_k,  # SAE latents are never negative: no bottom lists
        fire_threshold=fire_threshold, observers=[collector] if collector else [], seed=seed)
    mined = time.monotonic()
    try:
        labels = collector.result() if collector else None
        row = store.write_feature_set(
            set_id=set_id, model=model, hook=hook, kind=kind, mining=mining, labels=labels,
            manifest=manifest_df, vectors=decoder, vector_kind="decoder" if decoder is not None else "signature",
            sae_run_id=sae_run_id, sae_checkpoint=sae_checkpoint, sae_sha256=sae_sha256, shard_dir=shard_dir,
            uri=index_uri)
    finally:
        mining.close()
    summary = {
        "set_id": set_id,
        "build_id": row["build_id"],
        "uri": index_uri or store.lancedb_uri(),
        "kind": kind,
        "n_features": mining.n_features,
        "n_clips": mining.n_clips,
        "n_frames": mining.n_frames,
        "label_summary": labels.summary if labels else {},
        "mining_seconds": round(mined - started, 2),
        "write_seconds": round(time.monotonic() - mined, 2),
    }
    log.info("feature set %s: %s", set_id, summary)
    return summary


def clip_loudness(manifest_df: pd.DataFrame | None,
                  data_root: str | Path | None) -> Callable[[str], np.ndarray | None] | None:
    """clip id -> `frames.frame_loudness_db` of the clip's audio (data_root / the manifest's `path`), decoded on
    each call and kept nowhere; None for a clip not in the manifest or whose audio cannot be read. None without a
    data root or a manifest with paths."""
    if data_root is None or manifest_df is None or not {"clip_id", "path"} <= set(manifest_df.columns):
        return None
    known = manifest_df.dropna(subset=["path"])
    paths = dict(zip(known["clip_id"].astype(str), known["path"].astype(str)))
    root = Path(data_root)

    def loudness(clip_id: str) -> np.ndarray | None:
        if clip_id not in paths:
            return None
        try:
            return frame_loudness_db(load_audio(root / paths[clip_id]))
        except (FreudError, OSError, ValueError) as error:  # no loud frames for this clip, the build goes on
            log.warning("no loudness for clip %s (%s): %s", clip_id, root / paths[clip_id], error)
            return None

    return loudness


def decoder_directions(sae, batch: int = 2048) -> np.ndarray:
    """[n_latents, d_in] decoder direction of every latent of any SAE (decode(e_i) - decode(0)), to pass as
    `decoder=`; batched so 24,576 latents never need a dense identity matrix."""
    import torch

    n_latents = sae.n_latents
    device = next(sae.parameters()).device
    with torch.inference_mode():
        origin = sae.decode(torch.zeros(1, n_latents, device=device))
        rows = []
        for start in range(0, n_latents, batch):
            size = min(batch, n_latents - start)
            basis = torch.zeros(size, n_latents, device=device)
            basis[torch.arange(size), start + torch.arange(size)] = 1.0
            rows.append((sae.decode(basis) - origin).float().cpu().numpy())
    return np.concatenate(rows)

