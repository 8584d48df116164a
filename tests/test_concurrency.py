"""Shared models under threads: results from 4 threads at once are bit for bit the sequential ones.

The app analyses uploads and runs edits on background threads that share one cached Whisper (and SAE) per
process. A real small TopK SAE is trained on real tiny.en `encoder.blocks.0.attn` frames (cheap to reach, and
the rest of block 0 still runs after the hook fires, so a hook left exposed to other threads is caught) and
indexed as a feature set next to a neuron set of the same hook. Short recorded Asterisk prompts are analysed
(`clip_features`) and edited (`edit_clip`) one after the other, then from 4 threads at once, each thread on
another clip in each round. Without the per-model lock (docs/ARCHITECTURE.md, "Thread safety") a forward pass
fires another thread's capture hook and results are silently swapped.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import asterisk_audio

try:
    from test_sae import mlflow_uri
except ImportError:  # tests collected as a package
    from tests.test_sae import mlflow_uri

__all__ = ["mlflow_uri"]  # fixtures: used by pytest, not by name

HOOK = "encoder.blocks.0.attn"
CLIPS = ("hello", "goodbye", "auth-thankyou", "cancelled", "im-sorry", "disabled", "you-entered", "vm-saved")
THREADS = 4


@pytest.fixture(scope="module")
def world(tiny_en, mlflow_uri, tmp_path_factory):
    """An index with a neuron set and a real SAE set of one hook, and the short clips to analyse."""
    from freud_pipeline.features import FeatureIndex
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.sae import TrainConfig, train_sae
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    out = tmp_path_factory.mktemp("concurrency")
    audio = {name: asterisk_audio(name) for name in CLIPS}
    capture = EncoderCapture(tiny_en, [HOOK])
    acts = {name: capture.capture(log_mel(a))[HOOK][0, : n_real_frames(len(a))].numpy() for name, a in audio.items()}
    cfg = TrainConfig(hook=HOOK, model_name="tiny.en", expansion_factor=4, k=16, lr=3e-3, warmup_steps=5, steps=40,
                      batch_size=128, log_every=20, eval_every=0, eval_batches=1, dead_after_frames=4096, device="cpu")
    run = train_sae(torch.from_numpy(np.concatenate(list(acts.values()))), cfg, out_dir=out / "sae",
                    mlflow_tracking_uri=mlflow_uri, experiment="test-concurrency")

    def encode(x):
        with torch.inference_mode():
            return run.sae.encode(torch.from_numpy(x)).numpy()

    uri = str(out / "lancedb")
    build_feature_set(iter(acts.items()), set_id="neurons", model="tiny.en", hook=HOOK, kind="neuron",
                      manifest_df=None, index_uri=uri, top_k=4)
    build_feature_set(encoded_clips(acts.items(), encode), set_id="sae", model="tiny.en", hook=HOOK, kind="sae",
                      manifest_df=None, index_uri=uri, sae_run_id=run.run_id, sae_checkpoint=str(run.checkpoint_dir),
                      decoder=decoder_directions(run.sae), top_k=4)
    return {"index": FeatureIndex(uri), "audio": audio}


def _from_threads(work, jobs: list[list]) -> list[list]:
    """jobs[t] are thread t's arguments, one per round; every round starts in all threads at once."""
    barrier = threading.Barrier(len(jobs))

    def thread(args_list):
        out = []
        for args in args_list:
            barrier.wait(timeout=120)
            try:
                out.append(work(*args))
            except BaseException:
                barrier.abort()  # the other threads stop at once; this error is the one reported
                raise
        return out

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(thread, args_list) for args_list in jobs]
        errors = [f.exception() for f in futures]
    for error in sorted(filter(None, errors), key=lambda e: isinstance(e, threading.BrokenBarrierError)):
        raise error
    return [f.result() for f in futures]


def test_clip_features_from_threads_equal_the_sequential_results(world):
    index, audio = world["index"], world["audio"]
    analyse = lambda name, set_id: index.clip_features(audio[name], set_id, n=16)  # noqa: E731
    calls = [(name, set_id) for name in CLIPS for set_id in ("neurons", "sae")]
    reference = {call: analyse(*call) for call in calls}
    assert len({str(r) for r in reference.values()}) == len(calls)  # every clip gives its own answer

    rounds = 20
    jobs = [[calls[(t * 3 + r) % len(calls)] for r in range(rounds)] for t in range(THREADS)]
    results = _from_threads(analyse, jobs)
    wrong = [(call, r) for thread_jobs, got in zip(jobs, results) for r, call in enumerate(thread_jobs)
             if got[r] != reference[call]]
    assert not wrong, f"{len(wrong)} of {THREADS * rounds} results differ from the sequential ones: {wrong[:4]}"


def _comparable(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "seconds"}  # wall time


def test_edits_from_threads_alongside_analyses_equal_the_sequential_results(world):
    """Edits (splice hooks, encoder passes and a decode on one shared model) run beside `clip_features`
    (capture hooks on another shared model): each thread alternates the two."""
    from freud_pipeline.features.editing import edit_clip

    index, audio = world["index"], world["audio"]
    names = CLIPS[:2]
    top = {name: index.clip_features(audio[name], "sae", n=1)[0]["index"] for name in names}

    def work(kind, name):
        if kind == "edit":
            return _comparable(edit_clip(audio[name], "sae", {top[name]: 0.0}, index=index, max_new_tokens=4))
        return index.clip_features(audio[name], "sae", n=16)

    calls = [(kind, name) for name in names for kind in ("edit", "analyse")]
    reference = {call: work(*call) for call in calls}
    assert len({str(reference[("edit", name)]["traces"]) for name in names}) == len(names)

    rounds = 20  # each round: two edits and two analyses at once (an edit runs the whole encoder three times)
    jobs = [[calls[(t + r) % len(calls)] for r in range(rounds)] for t in range(THREADS)]
    results = _from_threads(work, jobs)
    wrong = [(call, r) for thread_jobs, got in zip(jobs, results) for r, call in enumerate(thread_jobs)
             if got[r] != reference[call]]
    assert not wrong, f"{len(wrong)} of {THREADS * rounds} results differ from the sequential ones: {wrong[:4]}"


def test_a_splice_is_invisible_to_captures_in_other_threads(tiny_en):
    """The rule itself, on one model object: a capture in one thread while another thread holds a splice open."""
    from freud_pipeline.sae.splice import splice, zero_replacement
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel

    mel = log_mel(asterisk_audio("hello"))
    capture = EncoderCapture(tiny_en, [HOOK])
    reference = capture.capture(mel)[HOOK]
    opened, captured = threading.Event(), []

    def capture_meanwhile():
        opened.wait(timeout=60)
        captured.append(capture.capture(mel)[HOOK])

    other = threading.Thread(target=capture_meanwhile)
    other.start()
    with torch.inference_mode(), splice(tiny_en, HOOK, zero_replacement()):
        opened.set()
        other.join(timeout=0.5)  # the capture waits for the model instead of running through the splice
        assert other.is_alive()
        spliced = EncoderCapture(tiny_en, [HOOK]).capture(mel)[HOOK]  # this thread holds the lock: sees its splice
    other.join(timeout=60)
    assert not spliced.any()
    assert torch.equal(captured[0], reference)
