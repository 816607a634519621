"""Hierarchical k-means: tree invariants, split level, resampling, resume after a kill."""

import importlib
import json
import os

import numpy as np
import pytest

from herd.curation import ClusterTree, hierarchical, hierarchical_kmeans
from herd.curation.kmeans import default_mesh


def _data(n=1500, d=4, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(30, d)) * 3
    sizes = rng.zipf(1.6, size=n) % 30  # long-tailed concept sizes
    return (c[sizes] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def _check_tree(tree, x):
    n_items = x.shape[0]
    valid = np.isfinite(x).all(1)
    for i, lv in enumerate(tree.levels):
        assert lv.assignment.shape == (n_items,)
        assert lv.offsets.shape == (lv.k + 1,) and lv.offsets[0] == 0
        assert np.all(np.diff(lv.offsets) >= 0)
        n_valid = int(valid.sum()) if i == 0 else n_items
        assert lv.offsets[-1] == n_valid == lv.members.shape[0]
        # members partition the valid items
        expect = np.nonzero(valid)[0] if i == 0 else np.arange(n_items)
        np.testing.assert_array_equal(np.sort(lv.members), expect)
        items = x if i == 0 else tree.levels[i - 1].centroids
        for c in range(lv.k):
            mem = lv.cluster(c)
            assert (lv.assignment[mem] == c).all()
            dist = ((items[mem] - lv.centroids[c]) ** 2).sum(1)
            assert np.all(np.diff(dist) >= -1e-4 * (1 + dist[1:]))
            np.testing.assert_allclose(lv.sq_distance[mem], dist, rtol=1e-3, atol=1e-3)
        assert lv.sizes().min() > 0  # no empty cluster
        n_items = lv.k
        valid = np.ones(n_items, bool)


def test_tree_invariants_with_resampling_and_nan_rows():
    x = _data()
    x[[3, 99]] = np.nan
    # An explicit mesh forces the sharded device path (mesh=None runs small problems in numpy).
    tree = hierarchical_kmeans(
        x, [60, 20, 6], [1, 3, 2], [1, 3, 2], n_iters=8, seed=1, mesh=default_mesh()
    )
    assert [lv.k for lv in tree.levels] == [60, 20, 6]
    assert tree.n_points == len(x)
    assert (tree.levels[0].assignment[[3, 99]] == -1).all()
    _check_tree(tree, x)


def test_random_strategy_and_determinism():
    x = _data(n=800)
    kw = dict(n_iters=5, seed=2, sample_strategy="random")
    a = hierarchical_kmeans(x, [40, 10], [2, 2], [3, 2], **kw)
    b = hierarchical_kmeans(x, [40, 10], [2, 2], [3, 2], **kw)
    _check_tree(a, x)
    for la, lb in zip(a.levels, b.levels, strict=True):
        np.testing.assert_array_equal(la.centroids, lb.centroids)
        np.testing.assert_array_equal(la.members, lb.members)


def test_split_first_level():
    x = _data(n=1200)
    tree = hierarchical_kmeans(x, [48, 10], [1, 2], [1, 3], n_iters=5, split_first=6)
    lv0 = tree.levels[0]
    assert lv0.k == 48  # 8 coarse clusters x 6, every coarse cluster has >= 6 points
    _check_tree(tree, x)
    with pytest.raises(ValueError, match="split_first=5"):
        hierarchical_kmeans(x, [48, 10], split_first=5)


def test_resampling_step_count_includes_first_run(monkeypatch):
    calls = []
    km_mod = importlib.import_module("herd.curation.kmeans")  # the level runner's import
    orig = km_mod.kmeans

    def counting(x, k, *a, **kw):
        calls.append((len(x), k))
        return orig(x, k, *a, **kw)

    monkeypatch.setattr(km_mod, "kmeans", counting)
    x = _data(n=600)
    tree = hierarchical_kmeans(x, [30, 8], [3, 4], [4, 1], n_iters=3)
    # level 0: 1 run + 2 resampling runs on <= 30 * 4 points; level 1: r = 1 -> one run.
    assert [k for _, k in calls] == [30, 30, 30, 8]
    assert calls[0][0] == 600 and all(n <= 120 for n, _ in calls[1:3])
    # The tree records what ran (4 steps asked at level 1, but r = 1: no round ran).
    assert tree.meta["level_runs"] == [
        dict(resampling_rounds=2, kmeans_runs=3),
        dict(resampling_rounds=0, kmeans_runs=1),
    ]
    assert [hierarchical.resampling_rounds(s, r) for s, r in ((3, 4), (4, 1))] == [2, 0]


def test_bad_inputs():
    x = _data(n=100)
    with pytest.raises(ValueError, match="level 1: k=60"):
        hierarchical_kmeans(x, [50, 60], n_iters=2)
    with pytest.raises(ValueError, match="resampling_steps"):
        hierarchical_kmeans(x, [10, 5], [1, 1, 1], n_iters=2)
    with pytest.raises(ValueError, match="2-D"):
        hierarchical_kmeans(x[:, 0], [10], n_iters=2)
    with pytest.raises(ValueError, match="sample_strategy"):
        hierarchical_kmeans(x, [10], sample_strategy="far")


def test_killed_run_resumes_and_matches(tmp_path, monkeypatch):
    x = _data(n=900)
    args = ([40, 15, 5], [2, 2, 2], [3, 2, 2])
    kw = dict(n_iters=4, seed=5, mesh=default_mesh())
    full = hierarchical_kmeans(x, *args, **kw)

    real = hierarchical._run_level
    calls = []

    def dies_at_level_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(hierarchical, "_run_level", dies_at_level_3)
    with pytest.raises(KeyboardInterrupt):
        hierarchical_kmeans(x, *args, workdir=str(tmp_path), **kw)
    info = json.loads((tmp_path / "tree.json").read_text())
    assert info["n_levels"] == 2 and info["meta"]["complete"] is False

    calls.clear()
    monkeypatch.setattr(
        hierarchical, "_run_level", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    resumed = hierarchical_kmeans(x, *args, workdir=str(tmp_path), **kw)
    assert len(calls) == 1  # only the third level ran
    for a, b in zip(full.levels, resumed.levels, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.assignment, b.assignment)
        np.testing.assert_array_equal(a.members, b.members)
        np.testing.assert_array_equal(a.offsets, b.offsets)
    loaded = ClusterTree.load(str(tmp_path))
    assert loaded.meta["complete"] is True and loaded.n_points == len(x)
    np.testing.assert_array_equal(loaded.levels[2].centroids, full.levels[2].centroids)
    with pytest.raises(
        ValueError, match=r"other arguments \(ks \[40, 15, 5\] there, \[40, 15, 6\]"
    ):
        hierarchical_kmeans(x, [40, 15, 6], [2, 2, 2], [3, 2, 2], workdir=str(tmp_path), **kw)


def _counting_kmeans(monkeypatch):
    """Counts the k-means runs of the level runner (what a resumed run must not redo)."""
    calls = []
    km_mod = importlib.import_module("herd.curation.kmeans")
    orig = km_mod.kmeans
    monkeypatch.setattr(km_mod, "kmeans", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def test_resume_says_so_and_recomputes_nothing(tmp_path, monkeypatch):
    x = _data(n=500)
    path = tmp_path / "x.npy"
    np.save(path, x)
    args = ([20, 5], [2, 2], [3, 2])
    work = str(tmp_path / "tree")
    first = hierarchical_kmeans(np.load(path, mmap_mode="r"), *args, n_iters=3, workdir=work)
    calls = _counting_kmeans(monkeypatch)
    said = []
    again = hierarchical_kmeans(
        np.load(path, mmap_mode="r"), *args, n_iters=3, workdir=work, say=said.append
    )
    assert calls == []  # no k-means ran: both levels came from the workdir
    assert said == [f"resuming level 2 from {work} (2 of 2 levels already done)"]
    assert again.meta["level_runs"] == first.meta["level_runs"]
    for a, b in zip(first.levels, again.levels, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
    assert hierarchical.check_resume(work, np.load(path, mmap_mode="r"), *args, n_iters=3) == 2
    assert hierarchical.check_resume(str(tmp_path / "none"), x, *args, n_iters=3) == 0


def test_resume_refuses_other_input_of_the_same_shape(tmp_path, monkeypatch):
    """The user's report: other embeddings of the same shape in the same workdir reused
    the old tree. Each difference is named; nothing is clustered."""
    x = _data(n=500)
    args = ([20, 5], [2, 2], [3, 2])
    work = str(tmp_path / "tree")
    path = tmp_path / "x.npy"
    np.save(path, x)
    hierarchical_kmeans(np.load(path, mmap_mode="r"), *args, n_iters=3, workdir=work)
    calls = _counting_kmeans(monkeypatch)

    def refused(xx, match):
        with pytest.raises(ValueError, match=match) as e:
            hierarchical_kmeans(xx, *args, n_iters=3, workdir=work)
        assert f"use a new workdir, or delete {work}" in str(e.value)
        with pytest.raises(ValueError, match=match):
            hierarchical.check_resume(work, xx, *args, n_iters=3)
        return str(e.value)

    st = os.stat(path)
    # Other rows in the same file (same path and size): mtime and content differ (the
    # mtime set explicitly: some file systems keep whole seconds).
    np.save(path, _data(n=500, seed=9))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    msg = refused(np.load(path, mmap_mode="r"), "other input: the modification time differs")
    assert "the content differs" in msg
    assert "the path differs" not in msg and "the size differs" not in msg
    # The same bytes and mtime under another path: only the path differs.
    np.save(path, x)
    moved = tmp_path / "moved.npy"
    os.replace(path, moved)
    os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = refused(np.load(moved, mmap_mode="r"), r"the path differs \(.*x\.npy there, .*moved")
    for what in ("size", "modification time", "content"):
        assert f"the {what} differs" not in msg
    # In memory, other rows: no file, and other content.
    msg = refused(_data(n=500, seed=9), "the path differs")
    for what in ("size", "modification time", "content"):
        assert f"the {what} differs" in msg
    assert calls == []


def test_level0_k_too_large_names_level_and_value():
    x = _data(n=100)
    x[:5] = np.nan
    with pytest.raises(ValueError, match="level 0: k=96 .*95 finite rows"):
        hierarchical_kmeans(x, [96, 5], n_iters=2)
