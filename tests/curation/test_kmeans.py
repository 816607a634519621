"""k-means: parity with a direct numpy Lloyd, sharding, determinism, streaming, k-means++."""

import importlib
import math

import jax
import numpy as np
import pytest

from herd.curation import kmeans as kmeans_fn
from herd.curation.kmeans import layout

km = importlib.import_module("herd.curation.kmeans")

MESH8 = km.default_mesh()
MESH1 = km.default_mesh(jax.devices()[:1])


def _blobs(n=2000, d=8, centers=16, seed=0, scale=0.6):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    lab = rng.integers(centers, size=n)
    return (c[lab] + scale * rng.normal(size=(n, d))).astype(np.float32)


def _np_lloyd(x, c, n_iters):
    """Direct float64 Lloyd; empty clusters keep their centroid. Returns (c, a, inertia)."""
    x = x.astype(np.float64)
    c = c.astype(np.float64).copy()

    def nearest(c):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        return d.argmin(1), d.min(1)

    for _ in range(n_iters):
        a, _ = nearest(c)
        for j in range(len(c)):
            m = a == j
            if m.any():
                c[j] = x[m].mean(0)
    a, d = nearest(c)
    return c, a, d.sum()


@pytest.mark.parametrize(
    "mesh,ring",
    [(MESH8, False), (MESH1, False), (MESH8, True)],
    ids=["8dev", "1dev", "8dev-ring"],
)
def test_lloyd_matches_numpy(mesh, ring):
    x = _blobs()
    init = x[:: len(x) // 24][:24].copy()
    c_ref, a_ref, i_ref = _np_lloyd(x, init, 6)
    kw = dict(max_replicated_centroid_bytes=0) if ring else {}
    res = km.kmeans(x, 24, 6, 0, init=init, mesh=mesh, tile=64, return_inertia=True, **kw)
    c, a, inertia = res
    assert abs(inertia - i_ref) / i_ref <= 1e-4
    np.testing.assert_allclose(c, c_ref, atol=1e-4)
    assert (a == a_ref).mean() > 0.999
    assert len(res.inertia_history) == 6


def test_onehot_update_matches_scatter():
    x = _blobs(n=800)
    init = x[:10].copy()
    a = km.kmeans(x, 10, 3, 0, init=init, mesh=MESH8, update="scatter", return_inertia=True)
    b = km.kmeans(x, 10, 3, 0, init=init, mesh=MESH8, update="onehot", return_inertia=True)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert abs(a[2] - b[2]) / a[2] < 1e-5


def test_float64_matches_numpy_tightly():
    x = _blobs(n=1000).astype(np.float64)
    init = x[:12].copy()
    c_ref, a_ref, i_ref = _np_lloyd(x, init, 5)
    c, a, inertia = km.kmeans(
        x, 12, 5, 0, init=init, mesh=MESH8, dtype=np.float64, return_inertia=True
    )
    assert c.dtype == np.float64
    np.testing.assert_allclose(c, c_ref, rtol=1e-10, atol=1e-10)
    assert abs(inertia - i_ref) / i_ref < 1e-12
    np.testing.assert_array_equal(a, a_ref)


@pytest.mark.parametrize("mesh", [MESH8, MESH1], ids=["8dev", "1dev"])
def test_empty_cluster_is_reseeded(mesh):
    x = _blobs(n=600, centers=6)
    init = x[:8].copy()
    init[3] = 1e3  # far from everything: empty after the first assignment
    init[5] = init[4]  # duplicate centroid: argmin picks one, the other is empty
    res = km.kmeans(x, 8, 4, 0, init=init, mesh=mesh)
    c, a = res
    assert res.n_reseeded >= 2
    assert np.bincount(a, minlength=8).min() > 0
    assert np.isfinite(c).all()


def test_same_seed_same_result_1_and_8_devices():
    x = _blobs(n=1600, centers=12, scale=0.3)
    r8 = km.kmeans(x, 12, 5, seed=3, mesh=MESH8, return_inertia=True)
    r1 = km.kmeans(x, 12, 5, seed=3, mesh=MESH1, return_inertia=True)
    r8b = km.kmeans(x, 12, 5, seed=3, mesh=MESH8, return_inertia=True)
    np.testing.assert_array_equal(r8[1], r1[1])
    np.testing.assert_allclose(r8[0], r1[0], atol=1e-5)
    np.testing.assert_array_equal(r8[0], r8b[0])
    np.testing.assert_array_equal(r8[1], r8b[1])
    other = km.kmeans(x, 12, 0, seed=4, mesh=MESH8)
    assert not np.array_equal(other[0], km.kmeans(x, 12, 0, seed=3, mesh=MESH8)[0])


def test_memmap_streaming_equals_in_memory(tmp_path):
    x = _blobs(n=3000)
    path = tmp_path / "x.npy"
    np.save(path, x)
    xm = np.load(path, mmap_mode="r")
    init = x[:20].copy()
    ref = km.kmeans(x, 20, 4, 0, init=init, mesh=MESH8, return_inertia=True)
    got = km.kmeans(xm, 20, 4, 0, init=init, mesh=MESH8, chunk_rows=700, return_inertia=True)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    np.testing.assert_array_equal(got[1], ref[1])
    assert abs(got[2] - ref[2]) / ref[2] < 1e-5
    # Streamed default init is k-means||; its result is as good as k-means++ here.
    par = km.kmeans(xm, 16, 5, 0, mesh=MESH8, chunk_rows=700, return_inertia=True)
    pp = km.kmeans(x, 16, 5, 0, mesh=MESH8, return_inertia=True)
    assert par[2] < 1.3 * pp[2]
    with pytest.raises(ValueError, match="k-means\\|\\|"):
        km.kmeans(xm, 16, 1, 0, mesh=MESH8, chunk_rows=700, init_method="k-means++")


def test_bad_inputs():
    x = _blobs(n=100)
    with pytest.raises(ValueError, match="2-D"):
        km.kmeans(x[:, 0], 3, 1)
    with pytest.raises(ValueError, match="int64"):
        km.kmeans(np.ones((10, 2), np.int64), 3, 1)
    with pytest.raises(ValueError, match="k=101"):
        km.kmeans(x, 101, 1)
    with pytest.raises(ValueError, match="init must have shape"):
        km.kmeans(x, 3, 1, init=np.zeros((4, 8)))
    with pytest.raises(ValueError, match="init_method"):
        km.kmeans(x, 3, 1, init_method="forgy")


def test_non_finite_rows_excluded_and_counted():
    x = _blobs(n=400)
    x[[5, 17, 300]] = np.nan
    x[42, 3] = np.inf
    res = km.kmeans(x, 6, 3, 0, mesh=MESH8)
    c, a = res
    assert res.n_invalid == 4
    assert (a[[5, 17, 42, 300]] == -1).all()
    assert (a[np.isfinite(x).all(1)] >= 0).all()
    assert np.isfinite(c).all()
    with pytest.raises(ValueError, match="k=397"):
        km.kmeans(x, 397, 1)


def _np_kpp(x, k, draws):
    """numpy greedy k-means++ consuming the same uniform draws as herd's."""
    x = x.astype(np.float64)
    n = len(x)
    w = np.ones(n)

    def pick(weights, u):
        cs = np.cumsum(weights)
        return np.clip(np.searchsorted(cs, u * cs[-1], side="right"), 0, n - 1)

    idx = [int(pick(w, draws[0, :1])[0])]
    closest = ((x - x[idx[0]]) ** 2).sum(1)
    for i in range(1, k):
        cand = pick(closest, draws[i])
        dc = ((x[None, :, :] - x[cand][:, None, :]) ** 2).sum(-1)  # [T, n]
        pots = np.minimum(closest[None], dc).sum(1)
        b = int(np.argmin(pots))
        idx.append(int(cand[b]))
        closest = np.minimum(closest, dc[b])
    return np.array(idx), closest.sum()


@pytest.mark.parametrize("mesh", [MESH8, MESH1], ids=["8dev", "1dev"])
def test_kmeanspp_is_exactly_greedy(mesh):
    x = _blobs(n=300, d=3, centers=5, seed=1).astype(np.float64)
    k, trials = 9, 3
    draws = km.kmeanspp_draws(7, k, trials, np.float64)
    ref_idx, ref_pot = _np_kpp(x, k, draws)
    c, idx, pot = km.kmeans_plusplus(x, k, 7, trials, mesh=mesh, dtype=np.float64, return_info=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(c, x[ref_idx])
    assert abs(pot - ref_pot) / ref_pot < 1e-10


def test_kmeanspp_potential_comparable_to_sklearn():
    sk = pytest.importorskip("sklearn.cluster")
    x = _blobs(n=3000, d=8, centers=40, seed=2, scale=1.0)
    k = 32
    ours, theirs, rand = [], [], []
    for s in range(5):
        _, _, pot = km.kmeans_plusplus(x, k, s, return_info=True)
        ours.append(pot)
        c, _ = sk.kmeans_plusplus(x.astype(np.float64), k, random_state=s)
        theirs.append(((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum())
        c = x[np.random.default_rng(s).choice(len(x), k, replace=False)]
        rand.append(((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum())
    ratio = np.mean(ours) / np.mean(theirs)
    assert 0.85 < ratio < 1.15, (ours, theirs)
    assert np.mean(ours) < 0.8 * np.mean(rand)


@pytest.mark.parametrize("mesh", [None, MESH8], ids=["host", "8dev"])
def test_kmeanspp_default_local_trials_is_sklearns(mesh):
    """With n_local_trials=None herd draws 2 + int(ln k) candidates per centre, as
    scikit-learn's kmeans_plusplus: the same centres as the numpy greedy reference fed
    [k, 2 + int(ln k)] draws, and not those of one trial fewer or more."""
    x = _blobs(n=300, d=3, centers=5, seed=1).astype(np.float64)
    k = 9  # 2 + int(ln 9) = 4
    _, idx, _ = km.kmeans_plusplus(x, k, 7, mesh=mesh, dtype=np.float64, return_info=True)
    ref_idx, _ = _np_kpp(x, k, km.kmeanspp_draws(7, k, 2 + int(math.log(k)), np.float64))
    np.testing.assert_array_equal(idx, ref_idx)
    for trials in (3, 5):
        other, _ = _np_kpp(x, k, km.kmeanspp_draws(7, k, trials, np.float64))
        assert not np.array_equal(idx, other)


def test_package_exports_the_function():
    assert kmeans_fn is km.kmeans


def test_assign_matches_bruteforce():
    x = _blobs(n=500)
    c = x[:7]
    a, d = km.assign(x, c, mesh=MESH8)
    dd = ((x[:, None] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a, dd.argmin(1))
    np.testing.assert_allclose(d, dd.min(1), rtol=1e-4, atol=1e-3)


def test_host_path_matches_device_path():
    # mesh=None on a small problem runs in numpy on the host: same draws, same algorithm.
    x = _blobs(n=700, d=5, centers=8, seed=4).astype(np.float64)
    assert layout._use_host(None, x, 10)
    ci, ii, pi = km.kmeans_plusplus(x, 10, 3, dtype=np.float64, return_info=True)
    cd, idd, pd = km.kmeans_plusplus(x, 10, 3, mesh=MESH8, dtype=np.float64, return_info=True)
    np.testing.assert_array_equal(ii, idd)
    assert abs(pi - pd) / pd < 1e-10
    init = x[:10].copy()
    init[2] = 1e3  # forces a re-seed on both paths
    h = km.kmeans(x, 10, 4, 0, init=init, dtype=np.float64, return_inertia=True)
    dv = km.kmeans(x, 10, 4, 0, init=init, mesh=MESH1, dtype=np.float64, return_inertia=True)
    np.testing.assert_allclose(h[0], dv[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(h[1], dv[1])
    assert h.n_reseeded == dv.n_reseeded >= 1


def test_default_tile_by_platform():
    # CPU keeps DEFAULT_TILE whatever k; accelerators get the largest power of two
    # <= ACCEL_MAX_TILE whose [tile, k] block fits ACCEL_TILE_BYTES.
    for k in (1, 1024, 100_000, 10_000_000):
        assert km.default_tile("cpu", k) == km.DEFAULT_TILE == 256
    assert km.default_tile("gpu", 1024) == 32768
    assert km.default_tile("tpu", 2048) == 32768  # exactly 256 MiB
    assert km.default_tile("gpu", 2049) == 16384
    assert km.default_tile("gpu", 2048, itemsize=8) == 16384
    assert km.default_tile("gpu", 100_000) == 512
    assert km.default_tile("gpu", 10**9) == 64
    mesh = km.default_mesh(jax.devices()[:1])
    assert layout._resolve_tile(None, mesh, 10**6, np.float32) == 256  # the test mesh is CPU
    assert layout._resolve_tile(128, mesh, 10, np.float32) == 128  # explicit tiles honoured


def test_row_bucket_bounds_padding_and_shapes():
    for n in list(range(1, 300)) + [586, 1000, 4097, 20_000, 123_457]:
        b = layout._bucket(n)
        assert n <= b <= max(n + km.BUCKET_MAX_STEP - 1, n * 1.25 + 1)
        if n >= 512:
            assert b <= n * (1 + 1 / 32) + 1
    # 300k rows of 512: 586 tiles -> 592 (the old 2^e / 4 step gave 640)
    assert layout._row_layout(300_000, 1, 512) == (512, 592 * 512)
    # nearby sizes (resampling runs) share one shape
    assert layout._row_layout(77_182, 1, 512) == layout._row_layout(79_221, 1, 512)


def test_assigner_keeps_rows_on_device_and_matches_assign():
    # The resampling steps of a hierarchy level assign the same rows to several tables.
    x = _blobs(n=900, seed=6)
    f = km.assigner(x, 7, mesh=MESH8)
    for c in (x[:7], x[100:107] + 0.5):
        a, d = f(c)
        ra, rd = km.assign(x, c, mesh=MESH8)
        np.testing.assert_array_equal(a, ra)
        np.testing.assert_array_equal(d, rd)
        dd = ((x[:, None] - c[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(a, dd.argmin(1))
    with pytest.raises(ValueError, match=r"centroids must be \[7, 8\], got \(6, 8\)"):
        f(x[:6])


def test_final_assignment_can_be_skipped():
    x = _blobs(n=800, seed=7)
    init = x[:6].copy()
    full = km.kmeans(x, 6, 3, init=init, mesh=MESH8)
    lean = km.kmeans(x, 6, 3, init=init, mesh=MESH8, final_assignment=False)
    np.testing.assert_array_equal(full[0], lean[0])
    assert lean[1] is None and lean.inertia is None
    assert lean.inertia_history == full.inertia_history
    with pytest.raises(ValueError, match="need final_assignment=True"):
        km.kmeans(x, 6, 3, final_assignment=False, return_inertia=True)
