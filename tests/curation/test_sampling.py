"""Balanced hierarchical sampling on hand-built cluster trees (no k-means needed)."""

import numpy as np
import pytest

from herd.curation.hierarchical import ClusterTree, build_level
from herd.curation.sampling import allocate, balanced_sample, points_per_cluster


def _level(assignment, k, sq=None, dim=2):
    assignment = np.asarray(assignment, np.int32)
    if sq is None:
        sq = np.arange(assignment.shape[0], dtype=np.float64)[::-1].copy()
    return build_level(np.zeros((k, dim)), assignment, sq)


def _two_level_tree(seed=0):
    """30 leaf clusters of uneven sizes over 1000 points, grouped into 4 top clusters."""
    rng = np.random.default_rng(seed)
    sizes = np.array([1, 2, 3, 5, 8] * 6)
    sizes[-1] += 1000 - sizes.sum()
    a0 = rng.permutation(np.repeat(np.arange(30), sizes))
    sq0 = rng.random(1000)
    a1 = np.array([0] * 3 + [1] * 7 + [2] * 10 + [3] * 10)
    tree = ClusterTree([_level(a0, 30, sq0), _level(a1, 4)], n_points=1000)
    return tree, a0, a1, sq0


def test_allocate_equal_shares_capped_and_remainder():
    rng = np.random.default_rng(0)
    sizes = np.array([2, 100, 100, 100, 1, 50])
    out = allocate(np.array([100]), np.array([0, 6]), sizes, rng)
    # cap 24: 2 + 24*3 + 1 + 24 = 99; remainder 1 goes to one of the four clusters > 24.
    assert out.sum() == 100
    assert out[0] == 2 and out[4] == 1
    big = out[[1, 2, 3, 5]]
    assert sorted(big.tolist()) == [24, 24, 24, 25]
    assert np.all(out <= sizes)


def test_allocate_many_segments_at_once():
    rng = np.random.default_rng(1)
    n_seg = 500
    counts = rng.integers(1, 20, n_seg)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    sizes = rng.integers(1, 50, counts.sum())
    totals = np.add.reduceat(sizes, offsets[:-1])
    quota = (rng.random(n_seg) * (totals + 1)).astype(np.int64)
    out = allocate(quota, offsets, sizes, rng)
    for c in range(n_seg):
        s, o = sizes[offsets[c] : offsets[c + 1]], out[offsets[c] : offsets[c + 1]]
        assert o.sum() == quota[c]
        assert np.all(o <= s) and np.all(o >= 0)
        # Balanced: every child not at its size gets within 1 of the largest quota.
        unsat = o < s
        if unsat.any():
            assert o[unsat].min() >= o.max() - 1


def test_points_per_cluster():
    tree, a0, a1, _ = _two_level_tree()
    pts = points_per_cluster(tree)
    np.testing.assert_array_equal(pts[0], np.bincount(a0, minlength=30))
    np.testing.assert_array_equal(pts[1], np.bincount(a1, weights=pts[0], minlength=4))


@pytest.mark.parametrize("strategy", ["random", "closest"])
@pytest.mark.parametrize("target", [0, 1, 7, 100, 333, 999, 1000])
def test_exact_size_distinct_and_capped(strategy, target):
    tree, a0, a1, _ = _two_level_tree()
    idx = balanced_sample(tree, target, strategy=strategy, seed=3)
    assert idx.shape == (target,)
    assert np.unique(idx).shape == (target,)
    assert idx.dtype == np.int64
    assert target == 0 or (idx.min() >= 0 and idx.max() < 1000)
    per_leaf = np.bincount(a0[idx], minlength=30)
    assert np.all(per_leaf <= np.bincount(a0, minlength=30))


def test_equal_shares_where_sizes_allow():
    tree, a0, a1, _ = _two_level_tree()
    pts = points_per_cluster(tree)
    # Top clusters hold 6, 32, 38, 924 points; target 20 -> 5 each.
    np.testing.assert_array_equal(pts[1], [6, 32, 38, 924])
    idx = balanced_sample(tree, 20, seed=0)
    np.testing.assert_array_equal(np.bincount(a1[a0[idx]], minlength=4), [5] * 4)
    # 22 -> two clusters chosen at random get 6; which ones depends on the seed.
    seen = set()
    for seed in range(20):
        counts = np.bincount(a1[a0[balanced_sample(tree, 22, seed=seed)]], minlength=4)
        assert sorted(counts.tolist()) == [5, 5, 6, 6]
        seen.add(tuple(counts))
    assert len(seen) > 1


def test_small_cluster_capped_remainder_spread():
    # Top cluster 0 holds 6 points only (sizes 1, 2, 3); the others split the rest equally.
    tree, a0, a1, _ = _two_level_tree()
    pts = points_per_cluster(tree)
    assert pts[1][0] == 6
    idx = balanced_sample(tree, 100, seed=0)
    top = np.bincount(a1[a0[idx]], minlength=4)
    assert top[0] == 6
    assert sorted(top[1:].tolist()) == [31, 31, 32]
    # Inside top cluster 1 (7 leaves of sizes 5, 8, 1, 2, 3, 5, 8): balanced by leaf.
    leaf = np.bincount(a0[idx], minlength=30)
    sub = leaf[3:10]
    sizes = np.bincount(a0, minlength=30)[3:10]
    unsat = sub < sizes
    assert sub.sum() == top[1]
    assert sub[unsat].min() >= sub.max() - 1


def test_deterministic_by_seed():
    tree, *_ = _two_level_tree()
    a = balanced_sample(tree, 123, seed=5)
    b = balanced_sample(tree, 123, seed=5)
    c = balanced_sample(tree, 123, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_closest_picks_the_closest():
    tree, a0, _, sq0 = _two_level_tree()
    idx = balanced_sample(tree, 200, strategy="closest", seed=0)
    picked = np.zeros(1000, bool)
    picked[idx] = True
    for c in range(30):
        inside = np.nonzero(a0 == c)[0]
        q = picked[inside].sum()
        expect = inside[np.argsort(sq0[inside], kind="stable")[:q]]
        np.testing.assert_array_equal(np.sort(expect), np.sort(inside[picked[inside]]))


def test_random_is_uniform_inside_a_cluster():
    # One leaf of 10 points, pick 3 many times: each point about 30% of the draws.
    tree = ClusterTree([_level(np.zeros(10), 1)], n_points=10)
    hits = np.zeros(10)
    for s in range(400):
        hits[balanced_sample(tree, 3, strategy="random", seed=s)] += 1
    assert np.all(np.abs(hits / 400 - 0.3) < 0.1), hits


def test_excluded_points_are_never_drawn():
    a0 = np.array([0, 0, -1, 1, 1, 1, -1, 2])
    tree = ClusterTree([_level(a0, 3), _level([0, 0, 1], 2)], n_points=8)
    idx = balanced_sample(tree, 6, seed=0)
    assert set(idx.tolist()) == {0, 1, 3, 4, 5, 7}
    with pytest.raises(ValueError, match="target size 7 .* pool of 6"):
        balanced_sample(tree, 7)


def test_bad_arguments():
    tree, *_ = _two_level_tree()
    with pytest.raises(ValueError, match="1001.*1000"):
        balanced_sample(tree, 1001)
    with pytest.raises(ValueError, match="strategy"):
        balanced_sample(tree, 10, strategy="farthest")
    with pytest.raises(ValueError, match=">= 0"):
        balanced_sample(tree, -1)
    with pytest.raises(ValueError, match="integer"):
        balanced_sample(tree, 10.5)
    with pytest.raises(ValueError, match="no levels"):
        balanced_sample(ClusterTree([], 0), 1)
    bad = ClusterTree([tree.levels[0], _level([0, 1, 0], 2)], n_points=1000)
    with pytest.raises(ValueError, match="level 1 .* 3 items .* 30 clusters"):
        balanced_sample(bad, 10)


def test_large_tree_exact_size_and_distinct():
    """10^6 points, 10^5 / 10^4 / 10^3 clusters: the vectorised allocation stays exact at
    scale (speed is measured in tools/bench_curation.py, not here)."""
    rng = np.random.default_rng(0)
    n, ks = 1_000_000, [100_000, 10_000, 1_000]
    levels, items = [], n
    for k in ks:
        a = np.concatenate([np.arange(k), rng.integers(0, k, items - k)]).astype(np.int32)
        levels.append(_level(a, k, rng.random(items)))
        items = k
    tree = ClusterTree(levels, n_points=n)
    idx = balanced_sample(tree, 300_000, strategy="random", seed=0)
    assert idx.shape == (300_000,) and np.unique(idx).shape == (300_000,)
    assert idx.min() >= 0 and idx.max() < n
