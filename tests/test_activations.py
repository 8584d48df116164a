"""Activation shards: faithful values, real frames only, memory-mapped reading, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from freud_pipeline.activations import ActivationReader
from freud_pipeline.activations.collect import collect_activations
from freud_pipeline.audio.decode import write_wav
from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

from conftest import asterisk_audio

PROMPTS = ["vm-intro", "vm-goodbye", "auth-thankyou", "vm-options", "conf-enteringno", "vm-password"]
HOOKS = ["encoder.blocks.2", "encoder.blocks.2.mlp.1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for name in PROMPTS:
        audio = asterisk_audio(name)
        write_wav(root / f"{name}.wav", audio)
        rows.append({"clip_id": name, "path": f"{name}.wav", "duration_s": len(audio) / 16000})
    # One clip longer than 30 s: two windows, nothing truncated.
    long = np.concatenate([asterisk_audio("vm-options")] * 4)[: 16000 * 34]
    write_wav(root / "long.wav", long)
    rows.append({"clip_id": "long", "path": "long.wav", "duration_s": len(long) / 16000})
    return pd.DataFrame(rows), root


@pytest.fixture(scope="module")
def collected(corpus, tmp_path_factory, tiny_en) -> Path:
    manifest, root = corpus
    out = tmp_path_factory.mktemp("shards") / "set"
    # Small shards so the set spans several files.
    collect_activations(manifest, out, hooks=HOOKS, batch_size=4, device="cpu", data_root=root, frames_per_shard=800)
    return out


def test_faithful_mode_equals_padded_encoder_forward(collected, corpus, tiny_en):
    manifest, root = corpus
    reader = ActivationReader(collected)
    stored = dict(reader.iter_clips("encoder.blocks.2.mlp.1", dtype=np.float32))
    capture = EncoderCapture(tiny_en, ["encoder.blocks.2.mlp.1"])
    for name in PROMPTS[:3]:
        audio = asterisk_audio(name)
        direct = capture.capture(log_mel(audio).unsqueeze(0))["encoder.blocks.2.mlp.1"][0].numpy()
        n = n_real_frames(len(audio))
        assert stored[name].shape == (n, 1536)
        np.testing.assert_allclose(stored[name], direct[:n], atol=1e-3 * max(1, np.abs(direct[:n]).max()), rtol=1e-3)


def test_only_real_frames_are_stored_and_long_clips_keep_every_window(collected, corpus):
    manifest, _ = corpus
    reader = ActivationReader(collected)
    lengths = {cid: len(a) for cid, a in reader.iter_clips("encoder.blocks.2")}
    for row in manifest.itertuples():
        assert lengths[row.clip_id] == int(np.ceil(row.duration_s / 0.02 - 1e-9)), row.clip_id
    frames = reader.clip_frames("long")
    assert frames[0] == 0 and frames[-1] == 1700 - 1 and np.all(np.diff(frames) == 1)
    assert reader.n_frames == sum(lengths.values())


def test_shards_carry_their_metadata(collected):
    reader = ActivationReader(collected)
    spec = reader.spec
    assert spec.model == "tiny.en" and len(spec.model_sha256) == 64
    assert spec.hooks == tuple(HOOKS) and spec.widths == (384, 1536)
    assert spec.dtype == "float16" and spec.window_mode == "padded"
    manifest = json.loads((collected / "shards.json").read_text())
    assert manifest["complete"] and manifest["n_clips"] == len(PROMPTS) + 1 and len(manifest["shards"]) >= 2


def test_reader_is_zero_copy_over_the_mapped_file(collected):
    reader = ActivationReader(collected)
    _, view = next(reader.iter_clips("encoder.blocks.2"))
    assert view.dtype == np.float16 and not view.flags.owndata and not view.flags.writeable


def test_random_frames_cover_all_shards_once_per_epoch(collected):
    reader = ActivationReader(collected)
    all_frames = np.concatenate([a for _, a in reader.iter_clips("encoder.blocks.2", dtype=np.float32)])
    seen = torch.cat(list(reader.random_frames("encoder.blocks.2", batch_size=64, seed=1, epochs=1))).numpy()
    assert len(seen) == (len(all_frames) // 64) * 64
    # Every sampled row is a stored frame, drawn without repetition, from every shard.
    rows = {r.tobytes() for r in all_frames.astype(np.float32)}
    assert all(r.tobytes() in rows for r in seen)
    assert len({r.tobytes() for r in seen}) == len(seen)
    shard_of = np.searchsorted(reader._starts, np.arange(reader.n_frames), side="right") - 1
    assert len(np.unique(shard_of)) == len(reader.paths) >= 2


def test_rerun_with_same_config_costs_nothing(collected, corpus):
    manifest, root = corpus
    before = {p.name: p.stat().st_mtime_ns for p in collected.glob("shard-*.arrow")}
    started = time.perf_counter()
    result = collect_activations(manifest, collected, hooks=HOOKS, batch_size=4, device="cpu", data_root=root,
                                 frames_per_shard=800)
    assert result["reused"] and time.perf_counter() - started < 10
    assert before == {p.name: p.stat().st_mtime_ns for p in collected.glob("shard-*.arrow")}


KILL_SCRIPT = """
import sys, pandas as pd
from freud_pipeline.activations.collect import collect_activations
manifest = pd.read_parquet(sys.argv[1])
collect_activations(manifest, sys.argv[2], hooks=["encoder.blocks.1"], batch_size=1, device="cpu",
                    data_root=sys.argv[3], frames_per_shard=1)
"""


def test_sigkill_mid_run_then_rerun_stores_every_clip_exactly_once(corpus, tmp_path):
    manifest, root = corpus
    manifest_path = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_path)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(manifest_path), str(out), str(root)],
                            env=os.environ.copy(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.arrow"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("shard-*.arrow")))
    assert 2 <= written < len(manifest), "the kill should land mid-run"
    collect_activations(manifest, out, hooks=["encoder.blocks.1"], batch_size=1, device="cpu", data_root=root,
                        frames_per_shard=1)
    ids = []
    for path in sorted(out.glob("shard-*.arrow")):
        ids += pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("clip_id").unique().to_pylist()
    assert sorted(ids) == sorted(manifest["clip_id"])  # every clip, exactly once
    assert not list(out.glob(".shard-*"))  # no temporary leftovers


def test_topk_sae_latents_are_stored_sparse_and_read_back_exactly(collected, tmp_path):
    from freud_pipeline.activations.latents import collect_sae_latents
    from freud_pipeline.sae.topk import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(384, 1536, k=16).eval()  # untrained weights suffice: this checks storage, not learning
    reader = ActivationReader(collected)
    manifest = collect_sae_latents(reader, sae, tmp_path / "latents", hook="encoder.blocks.2", sae_run_id="r1")
    latents = ActivationReader(tmp_path / "latents")
    assert latents.spec.sparse_k == 16 and latents.spec.source == "sae:r1"
    schema = pa.ipc.open_file(pa.memory_map(str(latents.paths[0]))).schema
    assert schema.field("idx:encoder.blocks.2/latents").type == pa.list_(pa.int32(), 16)
    stored = dict(latents.iter_clips("encoder.blocks.2/latents"))
    for clip_id, acts in list(reader.iter_clips("encoder.blocks.2", dtype=np.float32))[:3]:
        with torch.no_grad():
            expected = sae.encode(torch.from_numpy(acts)).numpy()
        np.testing.assert_allclose(stored[clip_id], expected, atol=2e-2, rtol=1e-2)
        assert ((stored[clip_id] != 0).sum(axis=1) <= 16).all()
    # 16 values + 16 indices per frame instead of 1536 dense values
    assert manifest["bytes"] < 0.1 * reader.n_frames * 1536 * 2


def test_fast_modes_record_their_fidelity_against_the_faithful_mode(corpus, tmp_path):
    manifest, root = corpus
    short = manifest[manifest.duration_s < 30]
    for mode in ("trimmed", "packed"):
        result = collect_activations(short, tmp_path / mode, hooks=["encoder.blocks.1"], window_mode=mode,
                                     batch_size=4, device="cpu", data_root=root)
        fidelity = result["fidelity_vs_padded"]["encoder.blocks.1"]
        assert fidelity["n_clips"] == len(short)
        assert 0 < fidelity["frame_cosine_p01"] <= fidelity["frame_cosine_mean"] <= 1.0
        lengths = {cid: len(a) for cid, a in ActivationReader(tmp_path / mode).iter_clips("encoder.blocks.1")}
        assert lengths == {r.clip_id: int(np.ceil(r.duration_s / 0.02 - 1e-9)) for r in short.itertuples()}


def test_streaming_mode_yields_what_collection_stores(collected, corpus):
    from freud_pipeline.activations.streaming import StreamingActivations

    manifest, root = corpus
    stream = StreamingActivations(manifest.head(3), hooks=["encoder.blocks.2"], device="cpu", data_root=root,
                                  shuffle_buffer_frames=256)
    stored = dict(ActivationReader(collected).iter_clips("encoder.blocks.2", dtype=np.float32))
    for clip_id, acts in stream.iter_clips("encoder.blocks.2"):
        np.testing.assert_allclose(acts, stored[clip_id], atol=2e-2, rtol=1e-2)  # stored in float16
    batches = list(stream.random_frames("encoder.blocks.2", batch_size=64, seed=0, epochs=1))
    total = sum(len(a) for _, a in stream.iter_clips("encoder.blocks.2"))
    assert all(b.shape == (64, 384) for b in batches) and len(batches) == total // 64


def test_random_frames_from_fewer_frames_than_a_batch_gives_whole_batches(collected):
    """A split smaller than one batch (the small demo's dev split against the demo SAE's batch) used to loop
    forever without yielding; now each batch is every stored frame, once per epoch."""
    reader = ActivationReader(collected)
    batches = list(reader.random_frames("encoder.blocks.2", batch_size=reader.n_frames + 1000, seed=0, epochs=2))
    assert [len(b) for b in batches] == [reader.n_frames, reader.n_frames]
    endless = reader.random_frames("encoder.blocks.2", batch_size=10 * reader.n_frames, seed=0)
    assert len(next(endless)) == reader.n_frames
