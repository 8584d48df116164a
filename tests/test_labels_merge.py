"""Mergeable labels: a label collector built on clips A, saved, and merged with one built on clips B gives exactly
the labels of one collector that saw A's clips, then B's (B built with A's split), without A's activations.

Synthetic clips of several speakers: random phone and word alignments (with pauses and phones shorter than a
frame), activations with a planted "n" detector (on 70% of the n's: recall depends on the sample), an s/z detector
whose peaks tie exactly (the clip order decides which are kept), a fixed-frame feature whose commonest peak frame
ties (20 and 30, as often), a clip-onset artefact, a loudness follower, ties at random and a dead feature. Some
clips have no alignments. The recall sample (3 occurrences per phone) overflows, so its priorities decide.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest

from freud_pipeline.features.labels import (
    AlignmentError, LabelCollector, LabelResult, clip_heldout, heldout_split, interval_frames,
)

N_FEATURES, TOP_K, PER_PHONE, SEED = 7, 10, 3, 7
ONSET, N_DETECTOR, S_OR_Z, TIED_RANDOM, LOUD, DEAD, FIXED = range(N_FEATURES)
PHONES = ["aa", "iy", "n", "s", "z", "t", "d", "sh", "m"]
WORDS = ["one", "two", "three", "four", "five", "six"]
A_SPEAKERS = {"ann": 12, "bob": 5, "cat": 5}  # by speaker: bob (second by clip count) is held out
B_SPEAKERS = {"ann": 8, "bob": 2, "dan": 4}


def _clip(rng: np.random.Generator, clip_id: str, phones: list[str], words: list[str], fixed: int | None):
    n_frames = int(rng.integers(60, 120))
    rows, t, run = [], 0.12, []  # speech after the onset
    while t < n_frames * 0.02 - 0.1:
        if rng.uniform() < 0.15:
            d = rng.uniform(0.05, 0.15)
            rows.append((clip_id, "phone", "sil", t, t + d))
        else:
            d = 0.01 if rng.uniform() < 0.05 else rng.uniform(0.03, 0.15)  # some shorter than a frame
            rows.append((clip_id, "phone", str(rng.choice(phones)), t, t + d))
            run.append((t, t + d))
            if len(run) == 3:
                rows.append((clip_id, "word", str(rng.choice(words)), run[0][0], run[-1][1]))
                run = []
        t += d
    acts = rng.uniform(-0.1, 0.0, (n_frames, N_FEATURES)).astype(np.float32)
    acts[:3, ONSET] = 2 + rng.uniform()
    for _, tier, label, start, end in rows:
        a, b = interval_frames(start, end)
        if label == "n" and rng.uniform() < 0.7:
            acts[a:b, N_DETECTOR] = 1 + rng.uniform()
        if label in ("s", "z"):
            acts[a:b, S_OR_Z] = 1.0  # every peak ties
    acts[:, TIED_RANDOM] = np.round(rng.uniform(0, 1, n_frames), 1)
    level = rng.uniform(-60, -20, n_frames)
    level[5 + rng.choice(n_frames - 10, 8, replace=False)] = -3.0  # loud frames away from the edges
    acts[:, LOUD] = level + 60
    acts[:, DEAD] = -0.1
    if fixed is not None:
        acts[fixed, FIXED] = 1.0
    return rows, acts, level


@pytest.fixture(scope="module")
def clips():
    """Two batches: (clip id, activations) in order, their alignments and the manifest; loudness per clip."""
    rng = np.random.default_rng(3)
    batches, rows, manifest, levels, fixed = {}, [], [], {}, []
    for batch, speakers in (("a", A_SPEAKERS), ("b", B_SPEAKERS)):
        vocabulary = PHONES + (["zh"] if batch == "b" else [])  # a phone and a word only B's clips have
        words = WORDS + (["zebra"] if batch == "b" else [])
        order, batch_rows = [], []
        for speaker, n in speakers.items():
            for i in range(n + 1):
                clip_id = f"{batch}/{speaker}{i}"
                # The fixed-frame feature fires in 10 aligned clips that train under both splits, 5 at frame 20.
                fires = i < n and speaker != "bob" and not clip_heldout(clip_id) and len(fixed) < TOP_K
                fixed += [clip_id] if fires else []
                frame = (20, 30)[len(fixed) % 2] if fires else None
                clip_rows, acts, levels[clip_id] = _clip(rng, clip_id, vocabulary, words, frame)
                manifest.append((clip_id, speaker))
                order.append((clip_id, acts))
                if i < n:  # the last clip of each speaker has no alignments
                    batch_rows += clip_rows
        rng.shuffle(order)
        batches[batch] = order
        rows.append(pd.DataFrame(batch_rows, columns=["clip_id", "tier", "label", "start_s", "end_s"]))
    assert len(fixed) == TOP_K
    return {"a": batches["a"], "b": batches["b"], "align_a": rows[0], "align_b": rows[1],
            "manifest": pd.DataFrame(manifest, columns=["clip_id", "speaker"]), "loudness": levels.get}


def _collect(clips, alignments, batches, manifest, **kwargs) -> LabelCollector:
    kwargs = {"seed": SEED, "loudness": clips["loudness"], **kwargs}
    collector = LabelCollector(alignments, N_FEATURES, TOP_K, PER_PHONE, manifest=manifest, **kwargs)
    for batch in batches:
        for clip_id, acts in clips[batch]:
            collector.observe(clip_id, acts)
    return collector


def assert_same(got: LabelResult, want: LabelResult) -> None:
    for field in dataclasses.fields(LabelResult):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype, field.name
            np.testing.assert_array_equal(a, b, err_msg=field.name)  # NaN == NaN here
        else:
            assert a == b, field.name


@pytest.fixture(scope="module", params=["speaker", "clip"])
def built(clips, request):
    """A alone (its own split), B with A's split, and one collector over A's clips, then B's, with A's split.
    By speaker: the manifest names them; by clip: no manifest."""
    manifest = clips["manifest"] if request.param == "speaker" else None
    a = _collect(clips, clips["align_a"], ["a"], manifest)
    b = _collect(clips, clips["align_b"], ["b"], manifest, split=a.split_info)
    both = _collect(clips, pd.concat([clips["align_a"], clips["align_b"]]), ["a", "b"], manifest,
                    split=a.split_info)
    return {"a": a, "b": b, "both": both, "manifest": manifest, "by": request.param}


def test_the_planted_features_get_their_labels_and_the_samples_overflow(built):
    """The comparisons below are not vacuous: labels of each kind, exact ties, full recall samples."""
    a, both = built["a"], built["both"]
    want = both.result()
    assert a.split_info["heldout_by"] == built["by"]
    assert want.label[ONSET] == "clip onset" and want.label[N_DETECTOR] == "n"
    assert want.label[S_OR_Z] == "alveolar sibilant" and want.label[LOUD] == "loudness"
    assert want.label[FIXED] in ("fixed frame 20", "fixed frame 30") and want.label[DEAD] is None
    frames = both.train.frame[FIXED][both.train.valid[FIXED]]
    assert (frames == 20).sum() == (frames == 30).sum() == TOP_K / 2  # the commonest frame ties
    assert 0 < want.recall[N_DETECTOR] <= 1 and want.heldout_n[N_DETECTOR] > 0
    assert "zh" in want.phones and "zebra" in both.words and "zh" not in a.phones
    assert (both.seen > PER_PHONE).all()
    assert len(np.unique(both.train.peak[S_OR_Z])) == 1  # equal peaks, of more clips than kept


def test_merged_labels_equal_labels_built_on_all_the_clips(built):
    a, b, both = built["a"], built["b"], built["both"]
    want, before = both.result(), (a.result(), b.result())
    merged = a.merge(b)
    assert_same(merged.result(), want)
    assert merged.split_info == both.split_info and merged.phones == both.phones and merged.words == both.words
    assert merged.n_aligned_clips == both.n_aligned_clips == a.n_aligned_clips + b.n_aligned_clips
    np.testing.assert_array_equal(merged.seen, both.seen)
    assert merged.reservoir.keys() == both.reservoir.keys()
    for phone in both.reservoir:  # the same occurrences sampled, in whatever slots
        rank, want_rank = np.argsort(merged.priority[phone]), np.argsort(both.priority[phone])
        np.testing.assert_array_equal(merged.priority[phone][rank], both.priority[phone][want_rank])
        np.testing.assert_array_equal(merged.reservoir[phone][rank], both.reservoir[phone][want_rank])
    assert_same(a.result(), before[0])  # neither input changed
    assert_same(b.result(), before[1])


def test_the_result_does_not_depend_on_where_each_peak_sits(built):
    """A collector's slots fill as clips come; merged ones come in rank order. The result reads ranks only."""
    state = built["both"].state()
    for side in ("train", "held"):
        for key in [k for k in state if k.startswith(f"{side}_")]:
            state[key] = state[key][:, ::-1]
    assert_same(LabelCollector.from_state(state).result(), built["both"].result())


def test_a_saved_state_merges_like_the_collector(built, tmp_path):
    a, b, both = built["a"], built["b"], built["both"]
    np.savez(tmp_path / "a.npz", **a.state())
    with np.load(tmp_path / "a.npz", allow_pickle=False) as saved:
        restored = LabelCollector.from_state(saved)
    state, again = a.state(), restored.state()
    assert state.keys() == again.keys() and all(v.dtype.kind in "biufU" for v in state.values())
    for key in state:
        np.testing.assert_array_equal(again[key], state[key], err_msg=key)
    assert_same(restored.result(), a.result())
    want = both.result()
    assert_same(restored.merge(b).result(), want)
    assert_same(LabelCollector.from_state(a.merge(b).state()).result(), want)
    for collector in (restored, a.merge(b)):
        with pytest.raises(RuntimeError, match="observes no clips"):
            collector.observe("a/ann0", np.zeros((10, N_FEATURES), np.float32))


def test_merging_in_steps_equals_one_pass(clips, built):
    """B in two parts, merged one after the other: the clip order of ties carries over."""
    a, manifest = built["a"], built["manifest"]
    first, second = clips["b"][: len(clips["b"]) // 2], clips["b"][len(clips["b"]) // 2:]
    align = clips["align_b"]
    parts = []
    for part in (first, second):
        ids = {c for c, _ in part}
        collector = LabelCollector(align[align.clip_id.isin(ids)], N_FEATURES, TOP_K, PER_PHONE, SEED,
                                   manifest=manifest, loudness=clips["loudness"], split=a.split_info)
        for clip_id, acts in part:
            collector.observe(clip_id, acts)
        parts.append(collector)
    assert_same(a.merge(parts[0]).merge(parts[1]).result(), built["both"].result())


def test_collectors_given_every_clip_s_alignments_merge_alike(clips, built):
    """Each collector may be given the whole corpus's alignments: clip counts are of clips observed."""
    everything = pd.concat([clips["align_a"], clips["align_b"]])
    a = _collect(clips, everything, ["a"], built["manifest"])
    b = _collect(clips, everything, ["b"], built["manifest"], split=a.split_info)
    assert a.split_info["n_train_clips"] + a.split_info["n_heldout_clips"] == a.n_aligned_clips
    assert_same(a.merge(b).result(), built["both"].result())


def test_collectors_that_differ_do_not_merge(clips, built):
    a, manifest = built["a"], built["manifest"]
    for kwargs, what in (({"seed": SEED + 1}, "seed"), ({"loudness": None}, "loudness_tested"),
                         ({"fire_threshold": 0.5}, "fire_threshold")):
        other = _collect(clips, clips["align_b"], [], manifest, split=a.split_info, **kwargs)
        with pytest.raises(AlignmentError, match=f"different {what}"):
            a.merge(other)
    other = LabelCollector(clips["align_b"], N_FEATURES, TOP_K + 1, PER_PHONE, SEED, split=a.split_info)
    with pytest.raises(AlignmentError, match="different top_k"):
        a.merge(other)
    own_split = _collect(clips, clips["align_b"], [], None if built["by"] == "speaker" else clips["manifest"])
    with pytest.raises(AlignmentError, match="different held-out rules"):
        a.merge(own_split)


def test_a_given_split_holds_out_its_speakers_or_its_clips(clips):
    manifest = clips["manifest"]
    ids = manifest.clip_id.tolist()
    held, info = heldout_split(ids, manifest)
    assert info["heldout_by"] == "speaker" and info["heldout_speakers"] == ["bob"]
    only_ann = [c for c in ids if "ann" in c]
    held_ann, info_ann = heldout_split(only_ann, manifest, split=info)  # bob has no clips here: no error
    assert not held_ann and info_ann["heldout_speakers"] == ["bob"] and info_ann["train_speakers"] == ["ann"]
    held, info = heldout_split(ids)  # by clip: each clip on its own
    assert held == {c for c in ids if hashlib.sha1(c.encode()).digest()[0] % 2 == 1}
    assert heldout_split(ids[:7])[0] == held & set(ids[:7]) and 0 < len(held) < len(ids)
    assert all(clip_heldout(c) == (c in held) for c in ids)
    with pytest.raises(AlignmentError, match="not both"):
        heldout_split(ids, manifest, ["bob"], split=info)


def test_peaks_merged_ranks_only_the_rows_the_batch_reached_and_equals_ranking_all():
    """A merge ranks again only the features whose top K took a batch clip; every field of every row equals
    ranking both sides whole (ties between equal peaks go to the earlier clip, empty slots last), whether or not
    the set's own rows were already in rank order."""
    from freud_pipeline.features.labels import _Peaks

    rng = np.random.default_rng(3)
    for trial in range(50):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 8))

        def side(first_order, reach):
            peaks = _Peaks(n, k)
            for clip in range(int(rng.integers(0, 12))):
                score = np.where(rng.random(n) < reach, rng.integers(0, 4, n).astype(np.float32), -np.inf)
                peaks.update(score, first_order + clip, rng.integers(0, 5, n), rng.integers(0, 9, n),
                             rng.integers(0, 50, n), 60, rng.random(n) < 0.5)
            return peaks

        a, b = side(0, 0.8), side(100, float(rng.choice([0.0, 0.1, 0.5, 1.0])))
        if trial % 2:
            a = a.ranked()  # as a merge leaves a set's peaks
        want, got = _Peaks.best(k, a.fields(), b.fields()), _Peaks.merged(k, a.fields(), b.fields())
        for name in _Peaks.FIELDS + ("weakest", "weakest_slot"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (trial, name)
        for name in _Peaks.FIELDS:  # its own arrays: a merge updates them in place, and a's may be a mapped state
            assert not np.shares_memory(getattr(got, name), getattr(a, name))
            assert not np.shares_memory(getattr(got, name), getattr(b, name))
