"""Incremental index: a set built on clips A and merged with clips B equals the set built on A+B.

Real tiny.en MLP activations of recorded Asterisk prompts and Festival sentences (exact phone timings), two
speakers so labels are held out by speaker; a real LanceDB directory per build. The SAE case encodes the same
activations with a small random-weight TopK SAE: it checks the plumbing of an SAE set's merge (latents, no bottom
lists, decoder vectors carried over), not what an SAE learns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from freud_pipeline.features import FeatureIndex
from freud_pipeline.features import coverage as cov
from freud_pipeline.features import store
from freud_pipeline.features.build import build_feature_set, merge_into_feature_set
from freud_pipeline.features.labels import heldout_split
from freud_pipeline.features.mining import encoded_clips
from freud_pipeline.validation import check_coverage
import test_features
from test_features import HOOK

corpus = test_features.corpus  # the module-scoped fixture of real tiny.en activations, reused here

TOP_K = 8
LABEL_FIELDS = ("label", "label_kind", "label_precision", "label_recall", "label_lift", "label_p_value",
                "label_base_rate", "label_n_peaks", "label_heldout_precision", "label_heldout_n", "label_reason",
                "word_label", "word_precision")
STAT_FIELDS = ("density", "mean", "max", "min", "quantiles")


@pytest.fixture(scope="module")
def halves(corpus):
    """A: the first half of each source's clips, B: the rest (the order a merge sees them in: A, then B)."""
    manifest = corpus["manifest"].assign(speaker=lambda m: np.where(m["source"] == "asterisk", "allison", "slt"))
    ids = list(corpus["acts"])
    a = [c for i, c in enumerate(ids) if i % 2 == 0]
    b = [c for i, c in enumerate(ids) if i % 2 == 1]
    aligned_a = sorted(set(corpus["alignments"]["clip_id"]) & set(a))
    split = heldout_split(aligned_a, manifest)[1]
    return {"manifest": manifest, "a": a, "b": b, "split": split}


def _clips(corpus, ids, encode=None):
    clips = ((c, corpus["acts"][c]) for c in ids)
    return encoded_clips(clips, encode) if encode else clips


def _build(corpus, halves, uri, ids, kind="neuron", encode=None, decoder=None, set_id="s"):
    manifest = halves["manifest"][halves["manifest"]["clip_id"].isin(ids)]
    return build_feature_set(
        _clips(corpus, ids, encode), set_id=set_id, model="tiny.en", hook=HOOK, kind=kind, manifest_df=manifest,
        alignments_df=corpus["alignments"][corpus["alignments"]["clip_id"].isin(ids)], index_uri=uri,
        top_k=TOP_K, label_split=halves["split"], decoder=decoder,
        coverage=cov.extended(None, [cov.partition_entry("corpus", "A" if ids[0] in halves["a"] else "AB",
                                                         len(ids), sum(len(corpus["acts"][c]) for c in ids))]))


def _merge(corpus, halves, uri, ids, encode=None, set_id="s", partition="B"):
    manifest = halves["manifest"][halves["manifest"]["clip_id"].isin(ids)]
    return merge_into_feature_set(
        _clips(corpus, ids, encode), set_id=set_id, manifest_df=manifest,
        alignments_df=corpus["alignments"][corpus["alignments"]["clip_id"].isin(ids)], index_uri=uri,
        coverage_entries=[cov.partition_entry("corpus", partition, len(ids),
                                              sum(len(corpus["acts"][c]) for c in ids))])


def _assert_same_set(merged: FeatureIndex, rebuilt: FeatureIndex, set_id: str, n_features: int, signs=("+", "-")):
    a, b = ({s["set_id"]: s for s in index.sets()}[set_id] for index in (merged, rebuilt))
    assert a["n_clips"] == b["n_clips"] and a["n_frames"] == b["n_frames"]
    assert a["label_summary"] == b["label_summary"]
    for index in range(n_features):
        fa, fb = merged.feature(set_id, index, histogram=True), rebuilt.feature(set_id, index, histogram=True)
        for name in STAT_FIELDS:  # sums in another order: float32 rounding at most
            va, vb = (f["density"] if name == "density" else f["stats"][name] for f in (fa, fb))
            if isinstance(va, dict):
                assert va.keys() == vb.keys()
                va, vb = list(va.values()), list(vb.values())
            np.testing.assert_allclose(np.asarray(va, float), np.asarray(vb, float), rtol=1e-5, atol=1e-6,
                                       err_msg=f"feature {index} {name}")
        assert fa["histogram"] == fb["histogram"], index  # counts of per-clip maxima: exact
        for name in LABEL_FIELDS:
            assert fa.get(name) == fb.get(name) or (fa.get(name) != fa.get(name) and fb.get(name) != fb.get(name)), \
                (index, name, fa.get(name), fb.get(name))
        for negative in ([False, True] if "-" in signs else [False]):
            ea = merged.top_examples(set_id, index, n=TOP_K, negative=negative)
            eb = rebuilt.top_examples(set_id, index, n=TOP_K, negative=negative)
            assert [(e["clip_id"], e["value"], e["peak_time_s"]) for e in ea] == \
                   [(e["clip_id"], e["value"], e["peak_time_s"]) for e in eb], (index, negative)
            for x, y in zip(ea, eb):
                np.testing.assert_array_equal(np.asarray(x["trace"]), np.asarray(y["trace"]))


def test_neuron_set_built_on_a_then_merged_with_b_equals_the_set_built_on_a_and_b(corpus, halves, tmp_path):
    merged_uri, rebuilt_uri = str(tmp_path / "merged" / "lancedb"), str(tmp_path / "rebuilt" / "lancedb")
    _build(corpus, halves, merged_uri, halves["a"])
    summary = _merge(corpus, halves, merged_uri, halves["b"])
    assert summary["merged"] and summary["n_new_clips"] == len(halves["b"])
    _build(corpus, halves, rebuilt_uri, halves["a"] + halves["b"])
    merged, rebuilt = FeatureIndex(merged_uri), FeatureIndex(rebuilt_uri)
    _assert_same_set(merged, rebuilt, "s", 1536)
    # Similarity (random-projection signatures, per-clip draws): the same neighbours.
    for index in (0, 7, 100):
        assert [n["index"] for n in merged.similar_features("s", index, n=5)] == \
               [n["index"] for n in rebuilt.similar_features("s", index, n=5)]
    # Coverage records both parts; the merged set passes its consistency check; B's clips are searchable.
    info = {s["set_id"]: s for s in merged.sets()}["s"]
    assert [p["partition"] for p in info["coverage"]["partitions"]] == ["A", "B"]
    assert info["coverage"]["n_clips"] == len(corpus["acts"]) == info["n_clips"]
    outcome = check_coverage(merged_uri, "s")
    assert outcome.passed, outcome.problems
    b_transcript = halves["manifest"].set_index("clip_id").loc[halves["b"][0], "transcript"]
    assert halves["b"][0] in {c["clip_id"] for c in merged.search_clips(b_transcript.split()[0])}


def test_freud_sets_shows_what_a_set_covers(corpus, halves, tmp_path, capsys):
    from freud_pipeline.cli import main

    uri = str(tmp_path / "lancedb")
    _build(corpus, halves, uri, halves["a"])
    _merge(corpus, halves, uri, halves["b"])
    assert main(["sets", "--index-uri", uri, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["coverage"]["n_clips"] == len(corpus["acts"]) and row["coverage"]["updated_at"]
    assert [p["partition"] for p in row["coverage"]["partitions"]] == ["A", "B"]
    assert main(["sets", "--index-uri", uri]) == 0
    assert "corpus (" in capsys.readouterr().out  # the "covers" column


def test_merging_the_same_clips_again_changes_nothing(corpus, halves, tmp_path):
    uri = str(tmp_path / "lancedb")
    _build(corpus, halves, uri, halves["a"])
    first = _merge(corpus, halves, uri, halves["b"])
    again = _merge(corpus, halves, uri, halves["b"])
    assert not again["merged"] and again["n_skipped_clips"] == len(halves["b"])
    assert store.current_set("s", uri)["build_id"] == first["build_id"]
    assert check_coverage(uri, "s").passed


def _rows_and_tables(uri: str) -> tuple:
    db = store.connect(uri)
    return ({name: db.open_table(name).count_rows() for name in (store.FEATURES, store.EXAMPLES)},
            sorted(store.table_names(db)))


def test_a_merge_that_fails_before_its_flip_leaves_the_set_and_no_stray_state(corpus, halves, tmp_path,
                                                                              monkeypatch):
    """The merged state is saved, the batch's clips upserted and the rewritten example rows written in threads
    while the batch is mined, the labels judged and the other rows written; when the build fails before the pointer
    flips (the vectors table, the examples or the clips cannot be written, or judging the labels fails), the merge
    raises that error once its threads are done, the set stays on its build, and the rows, vectors table and state
    file of the failed build are removed.
    Merging again then succeeds and equals the rebuild."""
    from freud_pipeline.features.build import LabelCollector

    uri = str(tmp_path / "lancedb")
    _build(corpus, halves, uri, halves["a"])
    before = store.current_set("s", uri)
    states = Path(store.state_dir(uri))
    files = sorted(states.iterdir())
    rows_and_tables = _rows_and_tables(uri)

    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")

    write_examples, finished = store._write_examples, []

    def slow_examples(*args, **kwargs):  # still writing when the labels fail
        time.sleep(0.5)
        write_examples(*args, **kwargs)
        finished.append(True)

    for owner, name in ((store, "_write_vectors"), (store, "_write_examples"), (store, "upsert_clips"),
                        (LabelCollector, "result")):
        with monkeypatch.context() as patched:
            patched.setattr(owner, name, broken)
            if name == "result":
                patched.setattr(store, "_write_examples", slow_examples)
            with pytest.raises(OSError, match="injected"):
                _merge(corpus, halves, uri, halves["b"])
        assert store.current_set("s", uri)["build_id"] == before["build_id"], name
        assert sorted(states.iterdir()) == files, name
        assert _rows_and_tables(uri) == rows_and_tables, name  # no row or vectors table of the failed build
    assert finished == [True]  # the merge raised only once its writer thread was done
    assert _merge(corpus, halves, uri, halves["b"])["merged"]
    rebuilt_uri = str(tmp_path / "rebuilt" / "lancedb")
    _build(corpus, halves, rebuilt_uri, halves["a"] + halves["b"])
    _assert_same_set(FeatureIndex(uri), FeatureIndex(rebuilt_uri), "s", 1536)


def test_sae_set_merge_equals_rebuild(corpus, halves, tmp_path):
    from freud_pipeline.features.build import decoder_directions
    from freud_pipeline.sae import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(1536, 256, k=16).eval()  # random weights: plumbing only

    def encode(acts):
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(acts)).numpy()

    decoder = decoder_directions(sae)
    merged_uri, rebuilt_uri = str(tmp_path / "m" / "lancedb"), str(tmp_path / "r" / "lancedb")
    _build(corpus, halves, merged_uri, halves["a"], kind="sae", encode=encode, decoder=decoder, set_id="sae")
    _merge(corpus, halves, merged_uri, halves["b"], encode=encode, set_id="sae")
    _build(corpus, halves, rebuilt_uri, halves["a"] + halves["b"], kind="sae", encode=encode, decoder=decoder,
           set_id="sae")
    merged, rebuilt = FeatureIndex(merged_uri), FeatureIndex(rebuilt_uri)
    _assert_same_set(merged, rebuilt, "sae", 256, signs=("+",))
    for index in (0, 5):  # decoder directions carried over from the old build
        assert [n["index"] for n in merged.similar_features("sae", index, n=5)] == \
               [n["index"] for n in rebuilt.similar_features("sae", index, n=5)]


def test_a_changed_merge_state_is_refused(corpus, halves, tmp_path):
    uri = str(tmp_path / "lancedb")
    _build(corpus, halves, uri, halves["a"])
    row = store.current_set("s", uri)
    with open(row["merge_state"], "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(store.StateError, match="does not match its recorded sha256"):
        _merge(corpus, halves, uri, halves["b"])
    assert store.current_set("s", uri)["build_id"] == row["build_id"]  # nothing written
    assert json.loads(row["coverage"])["partitions"][0]["partition"] == "A"


def test_a_merge_state_keeps_every_array_exactly_and_states_saved_as_npz_still_load(tmp_path):
    """The state file (safetensors, strings and 0-d shapes in its metadata) gives back every array with its dtype
    and shape, writable (a merge may update them); the .npz states of earlier versions load too."""
    import hashlib

    from freud_pipeline.features import state_file

    arrays = {"f64": np.linspace(0, 1, 12).reshape(3, 4), "f16": np.arange(6, dtype=np.float16), "i16": np.int16([-3]),
              "u64": np.uint64([2**64 - 1, 0]), "flag": np.array(True), "n": np.array(1536), "x": np.array(0.25),
              "ids": np.array(["clip/é", "b"]), "none": np.array([], dtype=str), "json": np.array('{"a": [1]}'),
              "empty": np.zeros((0, 5), np.int32),
              "stacked": state_file.Stacked([np.full((2, 3), i, np.float16) for i in range(4)], (2, 3), np.float16)}
    path, digest = store.save_state(str(tmp_path / "lancedb"), "s@1", arrays)
    assert path.endswith(".safetensors") and hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    loaded = store.load_state({"set_id": "s", "build_id": "s@1", "merge_state": path, "merge_state_sha256": digest})
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        got = loaded[name]
        assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array), name
        assert got.flags.writeable, name
    # The file is safetensors as the library reads it (0-d arrays as [1]), and states the library wrote load here.
    import safetensors.numpy

    by_library = safetensors.numpy.load_file(path)
    numeric = {k: v for k, v in arrays.items() if v.dtype.kind in "biuf"}
    assert set(by_library) == set(numeric)
    assert all(np.array_equal(by_library[k], v.reshape(-1) if v.ndim == 0 else v) for k, v in numeric.items())
    written = tmp_path / "by_library.safetensors"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in numeric.items()}, str(written), metadata={
        state_file.STRINGS: '{"ids": ["clip/é", "b"]}', state_file.SCALARS: '["flag", "n", "x"]'})
    row = {"set_id": "s", "build_id": "s@2", "merge_state": str(written),
           "merge_state_sha256": hashlib.sha256(written.read_bytes()).hexdigest()}
    again = store.load_state(row)
    assert all(again[k].shape == v.shape and np.array_equal(again[k], v) for k, v in numeric.items())
    assert again["ids"].tolist() == ["clip/é", "b"]
    legacy = tmp_path / "old.npz"
    np.savez(legacy, **arrays)
    row = {"set_id": "s", "build_id": "s@0", "merge_state": str(legacy),
           "merge_state_sha256": hashlib.sha256(legacy.read_bytes()).hexdigest()}
    assert all(np.array_equal(store.load_state(row)[k], v) for k, v in arrays.items())


def test_a_state_changed_in_place_while_it_is_read_is_refused(tmp_path):
    """A local state is mapped, not copied: if its file is rewritten in place before the merge has checked it, the
    merge refuses it (what was hashed might not be what was parsed) and the file's pages never reach a build."""
    import os

    path, digest = store.save_state(str(tmp_path / "lancedb"), "s@1", {"a": np.arange(100_000, dtype=np.int64)})
    row = {"set_id": "s", "build_id": "s@1", "merge_state": path, "merge_state_sha256": digest}
    arrays, verified = store.open_state(row)
    assert not arrays["a"].flags.writeable
    with open(path, "r+b") as handle:  # same size, other bytes, later modification time
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(store.StateError, match="changed while it was read"):
        verified()
    with pytest.raises(store.StateError, match="does not match its recorded sha256"):
        store.load_state(row)


def test_file_digests_equal_hashlib_over_the_bytes(tmp_path):
    """file_sha256 hashes the file's mapped pages in one call: the same digest as over its bytes, empty file too."""
    import hashlib
    import os

    from freud_pipeline.digests import file_sha256

    for size in (0, 1, 3 << 20):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_many_small_merges_carry_unchanged_examples_over_and_equal_the_rebuild(corpus, halves, tmp_path):
    """B merged a few clips at a time: each merge writes example rows only for the features whose lists took a
    new clip and reads the others' rows from the builds before (`example_builds`), until the chain is full and a
    merge rewrites every row. After each merge the set equals the build of the clips so far."""
    merged_uri = str(tmp_path / "m" / "lancedb")
    _build(corpus, halves, merged_uri, halves["a"])
    pieces = [list(p) for p in np.array_split(np.array(halves["b"], dtype=object), store.MAX_EXAMPLE_BUILDS + 1)]
    chains, changed = [], []
    for i, piece in enumerate(pieces):
        summary = _merge(corpus, halves, merged_uri, piece, partition=f"B{i}")
        changed.append(summary["n_changed_features"])
        row = store.current_set("s", merged_uri)
        chains.append(store.example_builds(row))
        assert len(chains[-1]) <= store.MAX_EXAMPLE_BUILDS
        assert check_coverage(merged_uri, "s").passed
        from freud_pipeline.validation import check_feature_set

        assert check_feature_set(merged_uri, "s", 1536).passed, check_feature_set(merged_uri, "s", 1536).problems
        if i in (0, len(pieces) - 1):  # equal to the rebuild of the clips so far, rows carried over or not
            so_far = halves["a"] + [c for p in pieces[: i + 1] for c in p]
            rebuilt_uri = str(tmp_path / f"r{i}" / "lancedb")
            _build(corpus, halves, rebuilt_uri, so_far)
            _assert_same_set(FeatureIndex(merged_uri), FeatureIndex(rebuilt_uri), "s", 1536)
    assert any(0 < c < 1536 for c in changed[:-1]), changed  # some merges rewrote a minority of the features
    assert [len(c) for c in chains[: store.MAX_EXAMPLE_BUILDS - 1]] == list(range(2, store.MAX_EXAMPLE_BUILDS + 1))
    full = store.MAX_EXAMPLE_BUILDS - 1  # the merge that found the chain full rewrote every row and began anew
    assert len(chains[full]) == 1 and changed[full] == 1536 and len(chains[-1]) == 2
    # Retired builds leave nothing behind but what the kept builds read
    db = store.connect(merged_uri)
    stored = set(db.open_table(store.EXAMPLES).search().where("set_id = 's'").select(["build_id"]).limit(None)
                 .to_pandas()["build_id"])
    previous = row["previous_builds"][0]
    assert stored == {*chains[-1], *chains[-2]} and previous in chains[-2]


def test_a_merge_stores_only_the_new_clips_traces_and_readers_resolve_the_others(corpus, halves, tmp_path,
                                                                                 monkeypatch):
    """Traces by reference: a small merge reads no example row back, writes the traces of its new clips only (the
    other entries name the build whose row holds theirs), and both read paths of FeatureIndex (all examples held
    in memory, and one query per feature) give the rebuild's traces."""
    merged_uri, rebuilt_uri = str(tmp_path / "m" / "lancedb"), str(tmp_path / "r" / "lancedb")
    _build(corpus, halves, merged_uri, halves["a"])
    base = store.current_set("s", merged_uri)["build_id"]

    def no_read_back(*args, **kwargs):
        raise AssertionError("a merge that carries rows over must not read examples back")

    piece = halves["b"][:3]
    with monkeypatch.context() as patch:
        patch.setattr(store, "read_ranked_examples", no_read_back)
        summary = _merge(corpus, halves, merged_uri, piece)
    assert 0 < summary["n_changed_features"] < 1536
    build = summary["build_id"]
    rows = store.connect(merged_uri).open_table(store.EXAMPLES).search().where(
        f"build_id = {store.sql_str(build)}").limit(None).to_arrow().to_pylist()
    # One row per list the batch entered: a feature whose top list changed and bottom list did not keeps its
    # bottom row where it was.
    per_sign = summary["n_changed_lists"]
    assert len(rows) == per_sign["+"] + per_sign["-"] and per_sign["+"] != per_sign["-"]
    assert sorted((r["feature"], r["sign"]) for r in rows) == sorted(set((r["feature"], r["sign"]) for r in rows))
    n_new = n_old = 0
    for row in rows:
        for clip, trace, holder, slot in zip(row["clip_ids"], row["traces"], row["trace_builds"], row["trace_slots"]):
            if clip in piece:
                assert holder == build and len(trace) > 0 and slot == row["clip_ids"].index(clip)
                n_new += 1
            else:
                assert holder == base and trace == []  # the base build's row holds it
                n_old += 1
    assert n_new and n_old

    _build(corpus, halves, rebuilt_uri, halves["a"] + piece)
    rebuilt, held, queried = FeatureIndex(rebuilt_uri), FeatureIndex(merged_uri), FeatureIndex(merged_uri)
    queried.EXAMPLES_IN_MEMORY_BYTES = 0  # one query per feature, as for sets too large to hold
    changed = sorted({row["feature"] for row in rows})
    for index in [*changed[:40], 0, 1, 2, 1535]:
        for negative in (False, True):
            want = rebuilt.top_examples("s", index, n=TOP_K, negative=negative)
            for index_ in (held, queried):
                got = index_.top_examples("s", index, n=TOP_K, negative=negative)
                assert [(e["clip_id"], e["value"]) for e in got] == [(e["clip_id"], e["value"]) for e in want]
                for x, y in zip(got, want):
                    np.testing.assert_array_equal(np.asarray(x["trace"]), np.asarray(y["trace"]))
    assert check_coverage(merged_uri, "s").passed, check_coverage(merged_uri, "s").problems

    # A holder row that disappeared (a damaged index): the check says so, and readers refuse rather than guess.
    lost = next(row["feature"] for row in rows if row["sign"] == "+" and base in row["trace_builds"])
    store.connect(merged_uri).open_table(store.EXAMPLES).delete(f"key = {store.sql_str(store.example_key(base, lost, '+'))}")
    outcome = check_coverage(merged_uri, "s")
    assert not outcome.passed and any("missing from the build" in p for p in outcome.problems), outcome.problems
    with pytest.raises(store.StateError, match="rebuild the set"):
        FeatureIndex(merged_uri).top_examples("s", lost, n=TOP_K)


def test_examples_across_activation_levels_are_drawn_per_octave_and_merge_exactly(corpus, halves, tmp_path):
    """Typical examples: per octave of the per-clip peak, clips drawn by a per-clip hash (order-free). Each one's
    stored value is the clip's true peak and lies in its octave; the merged set's draws equal the rebuilt set's;
    a feature whose peaks span several octaves gets examples below its top examples."""
    merged_uri, rebuilt_uri = str(tmp_path / "m" / "lancedb"), str(tmp_path / "r" / "lancedb")
    _build(corpus, halves, merged_uri, halves["a"])
    _merge(corpus, halves, merged_uri, halves["b"])
    _build(corpus, halves, rebuilt_uri, halves["a"] + halves["b"])
    merged, rebuilt = FeatureIndex(merged_uri), FeatureIndex(rebuilt_uri)
    spread = 0
    for index in range(0, 1536, 7):
        typical = merged.typical_examples("s", index)
        assert typical == rebuilt.typical_examples("s", index), index
        for example in typical:
            acts = corpus["acts"][example["clip_id"]][:, index]
            assert example["value"] == pytest.approx(float(acts.max()), rel=1e-6)
            assert example["low"] <= example["value"] < example["high"]
        levels = {e["level"] for e in typical}
        assert all(sum(e["level"] == lv for e in typical) <= 2 for lv in levels)
        top = {e["clip_id"] for e in merged.top_examples("s", index, n=TOP_K)}
        spread += len(levels) >= 3 and any(e["clip_id"] not in top for e in typical)
    assert spread > 20  # most MLP neurons' per-clip peaks span several octaves


def test_merges_from_threads_equal_the_same_merges_one_after_another(corpus, halves, tmp_path):
    """A merge runs helper threads (the state hashed and saved beside the rows) and sets numpy's BLAS threads
    process-wide while it runs: two sets of one index merged at once from two threads give, row for row and bit for
    bit, the sets merged one after the other (features with statistics and labels, examples with traces)."""
    import concurrent.futures

    uris = {"threads": str(tmp_path / "threads" / "lancedb"), "sequential": str(tmp_path / "sequential" / "lancedb")}
    for uri in uris.values():
        for set_id in ("s1", "s2"):
            _build(corpus, halves, uri, halves["a"], set_id=set_id)
    for set_id in ("s1", "s2"):
        _merge(corpus, halves, uris["sequential"], halves["b"], set_id=set_id)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = [pool.submit(_merge, corpus, halves, uris["threads"], halves["b"], set_id=s) for s in ("s1", "s2")]
        assert all(future.result()["merged"] for future in done)

    def contents(uri: str, set_id: str) -> tuple[list[dict], list[dict]]:
        row = store.current_set(set_id, uri)
        features = (store.connect(uri).open_table(store.FEATURES).search()
                    .where(f"build_id = {store.sql_str(row['build_id'])}").limit(None).to_arrow()
                    .drop_columns(["key", "build_id", "set_id"]).sort_by("index").to_pylist())
        examples = store.example_rows(row, uri=uri).drop_columns(["key", "build_id", "trace_builds", "trace_slots"])
        return features, examples.to_pylist()

    for set_id in ("s1", "s2"):
        threaded, sequential = contents(uris["threads"], set_id), contents(uris["sequential"], set_id)
        assert len(threaded[0]) == 1536 and len(threaded[1]) == 2 * 1536
        for table, a_rows, b_rows in zip(("features", "examples"), threaded, sequential):
            assert len(a_rows) == len(b_rows)
            for a, b in zip(a_rows, b_rows):  # NaN (no label) equals NaN
                diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and not (a[k] != a[k] and b[k] != b[k])}
                assert not diff, (set_id, table, a.get("index", a.get("feature")), str(diff)[:600])


UPSERT_SCRIPT = """
import sys, time
import pandas as pd
from freud_pipeline.features import store
uri, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
db = store.connect(uri)
while time.time() < start:
    pass
for r in range(rounds):
    store.upsert_clips(db, pd.DataFrame({"clip_id": [f"r{r}-{j}" for j in range(6)], "transcript": ["a b"] * 6}))
"""


def test_clips_upserted_by_two_processes_at_once_are_stored_once(tmp_path):
    """The neuron and SAE sets of a batch may be merged by two steps at once, each upserting the batch's clips:
    every clip ends up in `clips` once (LanceDB's merge_insert alone let two writers insert the same new id)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    uri = str(tmp_path / "lancedb")
    store.upsert_clips(store.connect(uri), __import__("pandas").DataFrame({"clip_id": ["seed"], "transcript": ["x"]}))
    script = tmp_path / "upsert.py"
    script.write_text(UPSERT_SCRIPT)
    start = time.time() + 8  # both processes imported and connected by then
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's package
    workers = [subprocess.Popen([sys.executable, str(script), uri, str(start), "10"], env=env) for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    ids = store.connect(uri).open_table(store.CLIPS).to_arrow()["clip_id"].to_pylist()
    assert len(ids) == 61 and len(set(ids)) == 61
