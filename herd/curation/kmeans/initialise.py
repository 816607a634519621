"""Initialisation: exact greedy k-means++ (device program and its numpy twin) and
k-means|| (Bahmani et al. 2012) for streamed memmaps."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from herd.curation.kmeans.engines import _Engine
from herd.curation.kmeans.kernels import _HIGHEST, _smap
from herd.curation.kmeans.layout import (
    DEFAULT_TILE,
    KPP_TILE,
    MAX_REPLICATED_CENTROID_BYTES,
    PICK_TILE,
    _axes,
    _Data,
    _n_dev,
    _to_host,
)


def _kpp_host(data: _Data, k, draws, sample_weight=None):
    """numpy greedy k-means++ with the same draws and selection rule as the device one."""
    dt = data.dtype
    x = np.where(data.valid[:, None], np.asarray(data.x[:], dtype=dt), 0).astype(dt)
    w = data.valid.astype(dt)
    if sample_weight is not None:
        w = np.where(data.valid, sample_weight, 0).astype(dt)
    n = len(x)
    xn = np.einsum("nd,nd->n", x, x)

    def pick(weights, u):
        cs = np.cumsum(weights)
        return np.clip(np.searchsorted(cs, u * cs[-1], side="right"), 0, n - 1)

    def dist(cands):  # [T, n]
        cn = np.einsum("td,td->t", cands, cands)
        return np.maximum(xn[None, :] + cn[:, None] - 2 * (cands @ x.T), 0)

    index = np.zeros(k, np.int64)
    index[0] = pick(w, draws[0, :1])[0]
    closest = dist(x[index[:1]])[0]
    for i in range(1, k):
        cand = pick(w * closest, draws[i])
        newd = np.minimum(closest[None, :], dist(x[cand]))
        b = int(np.argmin(newd @ w))
        index[i] = cand[b]
        closest = newd[b]
    return x[index].copy(), index.astype(np.int32), float(np.dot(w, closest))


# ------------------------------------------------------------------- k-means++


def kmeanspp_draws(seed: int, k: int, n_local_trials: int, dtype=np.float32) -> np.ndarray:
    """The uniform draws [k, n_local_trials] in [0, 1) used by :func:`kmeans_plusplus`:
    row 0 column 0 picks the first centre; row i picks the candidates of centre i."""
    rng = np.random.default_rng([int(seed), 0x6B2B])
    return rng.random((k, n_local_trials), dtype=np.dtype(dtype))


def _local_kpp(x, w, draws, *, axes, n_dev, tile):
    """Exact greedy k-means++ over rows sharded on `axes` (whole loop in one program).

    Per centre: sample the candidates by inverse CDF on weight * closest (global across
    devices), then one tiled pass computing each row's distance to the candidates and,
    in the same pass, the potential each candidate would give; keep the best. The rows
    are held transposed ([d, tile] per tile) so the distance step is a [T, d] x [d, tile]
    dot: at d = 32 XLA:CPU runs it 1.3-1.7x faster than [tile, d] x [d, T] (which needed
    T padded to a multiple of 8, i.e. 16 for k = 2000's 9 trials).
    """
    n_loc, d = x.shape
    k = draws.shape[0]
    nt = n_loc // tile
    rank = lax.axis_index(axes)
    xt = x.reshape(nt, tile, d)
    xn = jnp.sum(xt * xt, axis=2)  # [nt, tile]
    xtt = jnp.swapaxes(xt, 1, 2)  # [nt, d, tile]: candidates x rows, a wide dot
    wt = w.reshape(nt, tile)
    last = n_dev - 1
    pt = math.gcd(tile, PICK_TILE)
    npt = n_loc // pt

    itype = jnp.int64 if x.dtype == jnp.float64 else jnp.int32

    def pick(weights, u, tots):
        """Global inverse-CDF sampling: rows with cumulative weight just above u * total.

        tots [n_dev]: every device's total weight, the same array on all devices, so
        that exactly one device owns each target. Two levels (XLA:CPU's cumsum over all
        rows cost ~30 ns per row per centre): sums of PICK_TILE-row tiles and their cumsum
        locate the tile, a cumsum inside that tile the row (for each candidate:
        T x PICK_TILE, so PICK_TILE stays small). The owner's rows reach every device in
        one psum of their bits (the others add zeros), with their global indices.
        """
        weights = weights.reshape(npt, pt)  # pick tiles: small, the in-tile cumsum is cheap
        tsum = jnp.sum(weights, axis=1)  # [nt]
        tcs = jnp.cumsum(tsum)
        loc_tot = tcs[-1]
        start = jnp.cumsum(tots)[rank] - tots[rank]
        target = u * jnp.sum(tots) - start
        mine = (target >= 0) & ((target < tots[rank]) | (rank == last))
        # Past the local total (u * total rounding up on the last device): the last row
        # with positive weight, never a zero-weight row.
        over = target >= loc_tot
        ti = jnp.clip(jnp.searchsorted(tcs, target, side="right"), 0, npt - 1)
        ti = jnp.where(over, jnp.argmax(tcs), ti)
        rem = target - (tcs[ti] - tsum[ti])
        rcs = jnp.cumsum(weights[ti], axis=1)  # [T, tile]
        j = jnp.minimum(jnp.sum(rcs <= rem[:, None], axis=1), pt - 1)
        j = jnp.where(over, jnp.argmax(rcs, axis=1), j)
        li = ti * pt + j
        bits = lax.bitcast_convert_type(x[li], itype)  # [T, d]
        payload = jnp.concatenate([bits, (rank * n_loc + li).astype(itype)[:, None]], axis=1)
        payload = lax.psum(jnp.where(mine[:, None], payload, 0), axes)
        return lax.bitcast_convert_type(payload[:, :d], x.dtype), payload[:, d]

    def dists(cands, closest):
        """Per tile: min(closest, distance to each candidate) [nt, T, tile] and the
        weighted sum of it, i.e. the tile's share of each candidate's potential [nt, T]."""
        cn = jnp.sum(cands * cands, axis=1)

        def f(args):
            xb, xnb, clb, wb = args  # xb [d, tile]
            dots = jnp.dot(cands, xb, precision=_HIGHEST)  # [T, tile]
            dc = jnp.maximum(xnb[None, :] + cn[:, None] - 2 * dots, 0)
            nd = jnp.minimum(clb[None, :], dc)
            return nd, jnp.sum(wb[None, :] * nd, axis=1)

        return lax.map(f, (xtt, xn, closest, wt))

    # Two collectives per centre: the psum in pick, and one all_gather of every device's
    # share of each candidate's potential, which gives both the potentials (summed) and,
    # for the chosen candidate, each device's total weight for the next pick. (Four
    # before: the totals and the potentials separately, the rows and indices separately;
    # dropping two rendezvous saved 0.32 ms per centre at 80k x 32 on 2 XLA:CPU devices.)
    #
    # The first centre (one uniform draw) runs through the same loop body, so that the
    # program holds one copy of pick and of the distance pass (XLA:CPU compile time
    # grows with each copy; ~1 s per k-means++ program): at i = 0 every row still
    # has closest = inf and weight w, and the first candidate is taken.
    def body(i, carry):
        centers, index, closest, tots = carry
        first = i == 0
        cands, gidx = pick(jnp.where(first, wt, wt * closest), draws[i], tots)
        newd, tpot = dists(cands, closest)
        shares = lax.all_gather(jnp.sum(tpot, axis=0), axes)  # [n_dev, T]
        best = jnp.where(first, 0, jnp.argmin(jnp.sum(shares, axis=0)))
        closest = lax.dynamic_index_in_dim(newd, best, axis=1, keepdims=False)
        centers = centers.at[i].set(cands[best])
        index = index.at[i].set(gidx[best].astype(jnp.int32))
        return centers, index, closest, shares[:, best]

    init = (
        jnp.zeros((k, d), x.dtype),
        jnp.zeros((k,), jnp.int32),
        jnp.full((nt, tile), jnp.inf, x.dtype),
        lax.all_gather(jnp.sum(w), axes),
    )
    centers, index, closest, _ = lax.fori_loop(0, k, body, init)
    pot = lax.psum(jnp.sum(wt * closest), axes)
    return centers, index, pot


@functools.partial(jax.jit, static_argnames=("mesh", "tile"))
def _kpp_dev(xs, ws, draws, *, mesh, tile):
    axes = _axes(mesh)
    f = functools.partial(_local_kpp, axes=axes, n_dev=_n_dev(mesh), tile=tile)
    return _smap(f, mesh, (P(axes), P(axes), P()), (P(), P(), P()))(xs, ws, draws)


def _kpp_on(data: _Data, k, seed, n_local_trials, sample_weight=None, host=False):
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(k))
    draws = kmeanspp_draws(seed, k, n_local_trials, data.dtype)
    if host:
        return _kpp_host(data, k, draws, sample_weight)
    xs, ws = data.get(0)
    if sample_weight is not None:
        wpad = np.zeros(data.padded, data.dtype)
        wpad[: data.n] = np.where(data.valid, sample_weight, 0)
        ws = jax.device_put(wpad, data.sharding)
    n_tiles = data.padded // _n_dev(data.mesh) // data.tile
    tile = data.tile * math.gcd(n_tiles, KPP_TILE // data.tile if data.tile < KPP_TILE else 1)
    centers, index, pot = _kpp_dev(xs, ws, jnp.asarray(draws), mesh=data.mesh, tile=tile)
    return _to_host(centers), _to_host(index), float(pot)


def _kmeans_parallel(eng: _Engine, k, seed, oversampling=None, rounds=5, n_local_trials=None):
    """k-means|| (Bahmani et al. 2012) over streamed chunks, then weighted k-means++ on the
    candidates (weighted by the number of points nearest to each)."""
    data = eng.data
    rng = np.random.default_rng([seed, 1234])
    ell = float(oversampling if oversampling is not None else 2 * k)
    valid_idx = np.nonzero(data.valid)[0]
    first = int(valid_idx[rng.integers(len(valid_idx))])
    cand = [np.asarray(data.x[first : first + 1], dtype=data.dtype)]
    closest = np.full(data.n, np.inf, data.dtype)

    def update_closest(new):
        sub = _Engine(data, len(new), eng.mesh, MAX_REPLICATED_CENTROID_BYTES, eng.update)
        _, md = sub.assign(sub.put_centroids(new))
        np.minimum(closest, np.where(data.valid, md, 0), out=closest)

    update_closest(cand[0])
    for r in range(rounds):
        phi = float(closest.sum())
        if phi <= 0:
            break
        picked = []
        for i in range(data.n_chunks):
            s, e = data.rows(i)
            u = np.random.default_rng([seed, 77, r, i]).random(e - s)
            p = np.minimum(1.0, ell * closest[s:e] / phi)
            picked.append(np.nonzero((u < p) & data.valid[s:e])[0] + s)
        rows = np.concatenate(picked)
        if rows.size == 0:
            continue
        new = np.asarray(data.x[rows], dtype=data.dtype)
        cand.append(new)
        update_closest(new)
    cands = np.concatenate(cand)
    if len(cands) < k:  # too few: top up with random points
        extra = rng.choice(valid_idx, size=k - len(cands), replace=False)
        cands = np.concatenate([cands, np.asarray(data.x[np.sort(extra)], dtype=data.dtype)])
    sub = _Engine(data, len(cands), eng.mesh, MAX_REPLICATED_CENTROID_BYTES, eng.update)
    a, _ = sub.assign(sub.put_centroids(cands))
    weight = np.bincount(a[a >= 0], minlength=len(cands)).astype(data.dtype)
    cdata = _Data(cands, eng.mesh, data.dtype, DEFAULT_TILE, len(cands))
    centers, _, _ = _kpp_on(cdata, k, seed, n_local_trials, sample_weight=weight)
    return centers
