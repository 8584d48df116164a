"""Feature matching by decoder cosine (freud_pipeline.sae.matching) and its LanceDB store
(freud_pipeline.features.matches): real arrays, a real LanceDB in a temporary directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freud_pipeline.sae.matching import (
    MAX_ASSIGNMENT_ENTRIES,
    chance_level,
    chance_match,
    closest_counterparts,
    match_dictionaries,
    random_dictionary,
    seed_stability,
    unit_rows,
)

N, D = 400, 64


def noisy_permuted(a: np.ndarray, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """B = A's rows permuted (B[j] = A[perm[j]]), rescaled and perturbed: (B, perm)."""
    perm = rng.permutation(len(a))
    scale = rng.uniform(0.5, 3.0, (len(a), 1)).astype(np.float32)  # lengths do not matter, directions do
    return (a[perm] + noise * rng.standard_normal(a.shape).astype(np.float32)) * scale, perm


def test_a_permuted_noisy_copy_is_matched_back_one_to_one():
    rng = np.random.default_rng(0)
    a = random_dictionary(N, D, rng)
    b, perm = noisy_permuted(a, 0.03, rng)
    result = match_dictionaries(torch.from_numpy(a), b)  # tensors and arrays alike
    assert (perm[result.counterpart] == np.arange(N)).all()  # the permutation recovered
    assert len(set(result.counterpart.tolist())) == N  # one-to-one
    assert result.cosine.min() > 0.95 and result.share == 1.0
    assert result.shares() == {0.5: 1.0, 0.7: 1.0, 0.9: 1.0}
    indices, cosines = closest_counterparts(a, b, top=3)
    assert (perm[indices[:, 0]] == np.arange(N)).all()
    assert (np.diff(cosines, axis=1) <= 0).all() and np.allclose(cosines[:, 0], result.cosine, atol=1e-5)


def test_thresholds_count_only_pairs_at_or_above_them():
    rng = np.random.default_rng(1)
    a = random_dictionary(N, D, rng)
    # Half of B copies A's first half exactly; the rest are fresh random directions.
    b = np.concatenate([a[: N // 2], random_dictionary(N // 2, D, rng)])
    result = match_dictionaries(a, b, threshold=0.9)
    assert (result.counterpart[: N // 2] == np.arange(N // 2)).all()
    assert np.allclose(result.cosine[: N // 2], 1.0, atol=1e-5)
    assert result.share == pytest.approx(0.5, abs=0.01)
    shares = result.shares((0.1, 0.5, 0.7, 0.99, 1.01))
    assert list(shares.values()) == sorted(shares.values(), reverse=True)  # monotone in the threshold
    assert shares[0.99] == 0.5 and shares[1.01] == 0.0
    assert result.share_matched(0.7) == result.shares()[0.7]
    # An exact cosine equal to the threshold counts as matched.
    assert match_dictionaries(np.eye(2), np.array([[0.6, 0.8], [0.0, 1.0]]), threshold=0.6).share == 1.0


def test_one_to_one_holds_when_several_features_want_the_same_counterpart():
    # Two features of A point almost the same way; B has only one direction near them.
    a = np.array([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 0.0, 1.0]])
    b = np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    result = match_dictionaries(a, b)
    assert sorted(result.counterpart.tolist()) == [0, 1, 2]
    indices, _ = closest_counterparts(a, b, top=1)
    assert indices[0, 0] == indices[1, 0] == 0  # closest counterparts need not be one-to-one
    # The assignment maximises the summed cosine (brute force over all 6 permutations).
    import itertools

    cos = unit_rows(a) @ unit_rows(b).T
    best = max(sum(cos[i, p[i]] for i in range(3)) for p in itertools.permutations(range(3)))
    assert result.cosine.sum() == pytest.approx(best, abs=1e-6)
    # A larger than B: the extra feature has no counterpart and counts as unmatched.
    uneven = match_dictionaries(a, b[:2])
    assert (uneven.counterpart == -1).sum() == 1 and np.isnan(uneven.cosine[uneven.counterpart == -1]).all()
    assert uneven.share_matched(-1.0) == pytest.approx(2 / 3)


def test_random_dictionaries_match_at_the_chance_level():
    rng = np.random.default_rng(2)
    a, b = random_dictionary(N, D, rng), random_dictionary(N, D, rng)
    result = match_dictionaries(a, b)
    chance = chance_match(N, N, D, seed=7)
    # Random directions in 64-d: the best one-to-one partner reaches ~0.3-0.5, never 0.7.
    assert result.share_matched(0.7) == chance.share_matched(0.7) == 0.0
    assert abs(result.share_matched(0.3) - chance.share_matched(0.3)) < 0.1
    assert abs(result.mean_cosine() - chance.mean_cosine()) < 0.03
    assert 0.2 < chance.mean_cosine() < 0.5
    assert chance_level(N, N, D, threshold=0.3, seed=7) == chance.share_matched(0.3)
    # In few dimensions even random dictionaries match well: why the chance level is reported beside the share.
    assert chance_level(N, N, 4, threshold=0.7) > 0.8


def test_seed_stability_reports_every_pair_against_chance():
    rng = np.random.default_rng(3)
    base = random_dictionary(N, D, rng)
    runs = {0: base, 1: noisy_permuted(base, 0.05, rng)[0], 2: random_dictionary(N, D, rng)}
    study = seed_stability(runs, thresholds=(0.5, 0.7))
    assert [(p["seed_a"], p["seed_b"]) for p in study["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    shares = {(p["seed_a"], p["seed_b"]): p["shares"][0.7] for p in study["pairs"]}
    assert shares[(0, 1)] == 1.0 and shares[(0, 2)] == shares[(1, 2)] == 0.0
    assert study["chance"]["shares"][0.7] == 0.0 and study["chance"]["shares"][0.5] < 0.05
    assert study["mean"]["shares"][0.7] == pytest.approx(1 / 3)
    assert (study["n_latents"], study["d_in"]) == (N, D)
    with pytest.raises(ValueError, match="at least two seeds"):
        seed_stability({0: base})


def test_bad_inputs_and_the_size_limit_are_refused():
    with pytest.raises(ValueError, match="different widths"):
        match_dictionaries(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        match_dictionaries(np.ones(4), np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        closest_counterparts(np.full((2, 3), np.nan), np.ones((3, 3)))
    big = np.lib.stride_tricks.as_strided(np.ones(1, np.float32), (MAX_ASSIGNMENT_ENTRIES // 4 + 1, 4), (0, 0))
    with pytest.raises(ValueError, match="closest_counterparts"):  # refused before any matrix is built
        match_dictionaries(big, np.ones((4, 4)))
    # Closest counterparts: top is capped at B's size; a zero row has cosine 0 with everything.
    indices, cosines = closest_counterparts(np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2), top=5)
    assert indices.shape == (2, 2) and indices[0].tolist() == [0, 1] and (cosines[1] == 0).all()


def test_matches_are_stored_flipped_and_read_back(tmp_path):
    """features.matches: a pair's rows under a new match id, the pointer flipped, old rows gone; readers see the
    current rows only; seed-stability rows round-trip."""
    from freud_pipeline.features import matches

    uri = str(tmp_path / "lancedb")
    rng = np.random.default_rng(4)
    a, b = random_dictionary(50, 8, rng), random_dictionary(40, 8, rng)
    indices, cosines = closest_counterparts(a, b, top=3)
    first = matches.write_matches("A", "B", indices, cosines, kind="cross", build_a="a1", build_b="b1", uri=uri)
    second = matches.write_matches("A", "B", indices[:, :2], cosines[:, :2], kind="cross", build_a="a2",
                                   build_b="b1", uri=uri)
    assert first != second
    [pair] = matches.pair_rows(uri)
    assert (pair["match_id"], pair["build_a"], pair["top"], pair["n_features"]) == (second, "a2", 2, 50)
    table = matches.connect(uri).open_table(matches.MATCHES).to_arrow()
    assert set(table["match_id"].to_pylist()) == {second} and table.num_rows == 100
    one = match_dictionaries(a, b)
    matches.write_matches(matches.run_set("r1"), matches.run_set("r2"), one.counterpart, one.cosine, kind="seed",
                          one_to_one=True, uri=uri)
    seeds = matches.counterparts(matches.run_set("r1"), 3, uri=uri, kind="seed")
    assert seeds == [{"set_id": "run:r2", "index": int(one.counterpart[3]), "cosine": pytest.approx(one.cosine[3]),
                      "rank": 0}]
    alone = int(np.flatnonzero(one.counterpart < 0)[0])  # 50 features against 40: ten have no partner
    assert matches.counterparts(matches.run_set("r1"), alone, uri=uri, kind="seed") == []
    assert matches.delete_pairs([("A", "B")], uri) == 1 and [p["kind"] for p in matches.pair_rows(uri)] == ["seed"]
    matches.write_seed_stability([{"study_id": "s", "model": "m", "hook": "h", "architecture": "topk",
                                   "n_latents": 50, "d_in": 8, "steps": 1, "seed_a": 0, "seed_b": 1, "run_a": "r1",
                                   "run_b": "r2", "thresholds": [0.5, 0.7], "share_matched": [0.4, 0.1],
                                   "chance": [0.2, 0.0], "mean_cosine": 0.5, "chance_mean_cosine": 0.4,
                                   "recipe": {"k": 4}}], uri)
    [row] = matches.seed_stability(uri)
    assert row["recipe"] == {"k": 4} and row["curve"] == [
        {"threshold": 0.5, "share_matched": 0.4, "chance": 0.2},
        {"threshold": 0.7, "share_matched": 0.1, "chance": 0.0}]
