"""Mergeable mining: mine(A) merged with mine(B) equals one pass over A's clips then B's.

Real arrays with what breaks naive merges: exact ties (an SAE-like sparse feature that is 0.0 in most clips, a
constant feature, integer-valued peaks), negative values for the bottom lists, clips of different lengths (one
longer than 2 x trace_radius, so a trace window is kept) and float16 clips.

Exact: clip ids, ranked examples (values, clips, frames, trace windows, traces in rank order), counts, density,
max, min, peak histograms, log counts. To float32 rounding (sums added in another order): mean, quantiles,
signature. Trace buffers may differ in width (they grow with the clips seen): compared zero-padded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from freud_pipeline.features import store
from freud_pipeline.features.mining import (
    ExampleLists,
    MiningError,
    MiningResult,
    MiningState,
    merge_mining,
    mine_features,
)

F, TOP_K, RADIUS = 9, 4, 40  # traces keep at most 80 frames


def _clips(seed: int, prefix: str, lengths: list[int]) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    clips = []
    for i, n in enumerate(lengths):
        acts = np.empty((n, F), np.float32)
        acts[:, 0] = 0.5  # constant: every clip ties
        acts[:, 1] = np.maximum(rng.standard_normal(n) - 2, 0) * (i % 5 == 3)  # SAE-like: peaks tie at 0.0
        acts[:, 2] = 0.0  # dead latent
        acts[:, 3] = np.round(rng.standard_normal(n))  # integer peaks and troughs: ties at non-zero values
        acts[:, 4:] = rng.standard_normal((n, F - 4)) * [1, 3, 0.1, 10, 1]  # dense, signed
        clips.append((f"{prefix}/{i:02d}", acts.astype(np.float16) if i % 3 == 1 else acts))
    return clips


A = _clips(1, "a", [5, 30, 64, 200, 12, 90, 7, 33, 1, 64, 150])
B = _clips(2, "b", [64, 3, 41, 300, 9, 18, 77, 65])
C = _clips(3, "c", [11, 170, 2, 60, 64, 25])


def _mine(clips, **kw) -> MiningResult:
    return mine_features(iter(clips), top_k=TOP_K, trace_radius=RADIUS, **kw)


def _ranked(lists: ExampleLists, clip_ids: list[str]) -> dict[str, np.ndarray]:
    rows = lists.rows(0, lists.values.shape[0])
    rows["clip_id"] = np.where(rows["clip_index"] >= 0, np.asarray(clip_ids + [""])[rows["clip_index"]], "")
    del rows["clip_index"]
    return rows


def _assert_same(got: MiningResult, want: MiningResult) -> None:
    assert got.clip_ids == want.clip_ids and got.n_frames == want.n_frames
    for name in ("top", "bottom"):
        g, w = _ranked(getattr(got, name), got.clip_ids), _ranked(getattr(want, name), want.clip_ids)
        width = max(g["traces"].shape[2], w["traces"].shape[2])
        for rows in (g, w):
            rows["traces"] = np.pad(rows["traces"], ((0, 0), (0, 0), (0, width - rows["traces"].shape[2])))
        for key in w:
            assert np.array_equal(g[key], w[key]), f"{name}.{key}"
    for key in ("density", "max", "min", "peak_hist_width", "peak_hist_counts"):
        assert np.array_equal(getattr(got, key), getattr(want, key)), key
    for key in ("n_fire", "log_counts", "sig_n"):
        assert np.array_equal(getattr(got.state, key), getattr(want.state, key)), key
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.quantiles, want.quantiles, rtol=1e-6, atol=1e-7)
    scale = np.abs(want.state.sig).max()
    np.testing.assert_allclose(got.signature, want.signature, rtol=1e-5, atol=1e-5 * scale)


def test_merge_equals_one_pass_and_is_associative(tmp_path):
    whole = _mine(A + B)
    # Trace buffers spilled to disk (trace_ram_bytes=0) on one side: the merge reads memmaps.
    a, b = _mine(A, trace_ram_bytes=0, spill_dir=tmp_path), _mine(B)
    merged = merge_mining(a, b, spill_dir=tmp_path, trace_ram_bytes=0)
    _assert_same(merged, whole)
    assert isinstance(merged.top.traces, np.memmap)
    # The ties resolve to the earliest clips, whichever side they came from.
    top = merged.top.rows(0, F)
    assert top["clip_index"][0].tolist() == [0, 1, 2, 3]  # constant feature
    assert top["clip_index"][2].tolist() == [0, 1, 2, 3] and (top["values"][2] == 0).all()
    sparse = top["values"][1]
    assert (sparse == 0).any() and (np.diff(top["clip_index"][1][sparse == 0]) > 0).all()
    # A trace window: a clip longer than 2 x trace_radius keeps 80 frames around its peak.
    assert top["trace_len"].max() == 2 * RADIUS and top["trace_offset"].max() > 0
    for result in (a, merged):
        result.close()

    c = _mine(C)
    three = _mine(A + B + C)
    _assert_same(merge_mining(merge_mining(_mine(A), _mine(B)), c), three)
    _assert_same(merge_mining(_mine(A), merge_mining(_mine(B), c)), three)
    # SAE sets: no bottom lists.
    _assert_same(merge_mining(_mine(A, bottom_k=0), _mine(B, bottom_k=0)), _mine(A + B, bottom_k=0))


def test_a_pass_mined_after_a_result_merges_the_same_and_keeps_fewer_traces(tmp_path):
    """A merge mines its batch with after=the set: clips that cannot enter the merged lists (ties included: the
    earlier clip keeps its place) are not kept, the peak histograms start at the set's widths, and the merge is
    unchanged."""
    a = _mine(A)
    after, plain = _mine(B, after=a), _mine(B)
    _assert_same(merge_mining(a, after), merge_mining(a, plain))
    _assert_same(merge_mining(a, after), _mine(A + B))
    assert after.top.count.sum() < plain.top.count.sum() and after.bottom.count.sum() < plain.bottom.count.sum()
    assert after.top.count[0] == 0  # the constant feature: every B clip ties with A's and ranks after them
    assert (after.peak_hist_width >= a.peak_hist_width).all()
    assert after.peak_hist_counts.sum() == plain.peak_hist_counts.sum()
    sae = _mine(A, bottom_k=0)  # no bottom lists: nothing enters them
    _assert_same(merge_mining(sae, _mine(B, bottom_k=0, after=sae)), _mine(A + B, bottom_k=0))
    # As a merge into a set does it: the sums added into the batch's arrays (not used again); the set's untouched.
    before = {k: np.array(v) for k, v in a.state.to_arrays().items()}
    batch = _mine(B, after=a)
    log_counts = batch.state.log_counts
    into = merge_mining(a, batch, into_b=True)
    _assert_same(into, _mine(A + B))
    assert into.state.log_counts is log_counts
    assert all(np.array_equal(v, before[k]) for k, v in a.state.to_arrays().items())
    # made only to be merged: no statistics of its own (the merge computes them), and it cannot be written as a set
    assert after.quantiles is None and after.density is None and after.signature is None and after.mean is None
    from freud_pipeline.features import store

    with pytest.raises(ValueError, match="only to be merged"):
        store.write_feature_set(set_id="s", model="m", hook="h", kind="neuron", mining=after, uri=str(tmp_path))


def test_merge_from_saved_state_and_ranked_lists(tmp_path):
    """What a later merge starts from: the state saved with np.savez, and lists rebuilt in rank order, the
    bottom list holding only its strictly negative entries (as the index stores them)."""
    a, b, whole = _mine(A), _mine(B), _mine(A + B)
    np.savez(tmp_path / "state.npz", **a.state.to_arrays())
    with np.load(tmp_path / "state.npz") as saved:
        state = MiningState.from_arrays(saved)
    assert state.clip_ids == a.clip_ids and state.seed == 0 and state.max_frames == 2 * RADIUS

    def rebuilt(lists: ExampleLists, negative_only: bool) -> ExampleLists:
        rows = lists.rows(0, F)
        del rows["count"]
        if negative_only:
            drop = rows["values"] >= 0
            for key, array in rows.items():
                array[drop] = -1 if key == "clip_index" else 0
        return ExampleLists.ranked(**rows)

    reread = dataclasses.replace(a, state=state, top=rebuilt(a.top, False), bottom=rebuilt(a.bottom, True))
    merged = merge_mining(reread, b)
    _assert_same(dataclasses.replace(merged, bottom=whole.bottom), whole)
    got, want = _ranked(merged.bottom, merged.clip_ids), _ranked(whole.bottom, whole.clip_ids)
    negative = want["values"] < 0
    assert negative.any() and not negative.all()
    n = store._kept_counts(whole.bottom, "-")
    assert np.array_equal(store._kept_counts(merged.bottom, "-"), n)
    kept = np.arange(TOP_K)[None, :] < n[:, None]
    for key in set(want) - {"count"}:
        assert np.array_equal(got[key][kept], want[key][kept]), key


def test_merged_result_writes_like_a_mined_one(tmp_path):
    whole, merged = _mine(A + B), merge_mining(_mine(A), _mine(B))
    tables = []
    for name, mining in (("whole", whole), ("merged", merged)):
        uri = str(tmp_path / name)
        store.write_feature_set(set_id="s", model="m", hook="h", kind="neuron", mining=mining, uri=uri)
        db = store.connect(uri)
        tables.append({t: db.open_table(t).to_pandas().drop(columns=["key", "build_id"]).sort_values(
            ["feature", "sign"] if t == store.EXAMPLES else "index").reset_index(drop=True)
            for t in (store.EXAMPLES, store.FEATURES)})
    examples = [t[store.EXAMPLES] for t in tables]
    assert examples[0].drop(columns="traces").to_json() == examples[1].drop(columns="traces").to_json()
    for x, y in zip(examples[0]["traces"], examples[1]["traces"]):
        assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
    features = [t[store.FEATURES].drop(columns=["mean", "quantiles"]) for t in tables]
    assert features[0].to_json() == features[1].to_json()


def test_clip_draws_do_not_depend_on_earlier_clips():
    """A clip's sampled frames and projection rows come from its own RNG: mined after other clips or alone,
    it adds the same signature sums."""
    alone, after = _mine(B[3:4]), _mine(A + B[3:4])
    minus = merge_mining(_mine(A), alone)
    assert np.array_equal(after.state.sig_r, minus.state.sig_r)
    np.testing.assert_allclose(after.state.sig, minus.state.sig, rtol=1e-5, atol=1e-4)


def test_merge_refuses_overlaps_and_mismatched_parameters():
    a = _mine(A)
    with pytest.raises(MiningError, match=r"share 2 clip\(s\), e.g. 'a/00'"):
        merge_mining(a, _mine(A[:2]))
    for kw, name in (({"top_k": 3}, "top_k"), ({"bottom_k": 0}, "bottom_k"), ({"seed": 1}, "seed"),
                     ({"fire_threshold": 0.5}, "fire_threshold"), ({"sample_frames": 8}, "sample_frames"),
                     ({"signature_dim": 16}, "signature_dim"), ({"trace_radius": 10}, "max_frames"),
                     ({"n_features": F + 1}, "n_features")):
        clips = [(c, np.pad(x, ((0, 0), (0, 1)))) for c, x in B] if name == "n_features" else B
        other = mine_features(iter(clips), **{"top_k": TOP_K, "trace_radius": RADIUS, **kw})
        with pytest.raises(MiningError, match=f"different {name}"):
            merge_mining(a, other)
    with pytest.raises(MiningError, match="MiningState"):
        merge_mining(dataclasses.replace(a, state=None), _mine(B))
