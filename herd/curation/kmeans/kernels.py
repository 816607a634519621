"""Per-device k-means kernels (distance tiles, Lloyd statistics, assignment, the ring
variants for centroids sharded along k) and their jitted shard_map wrappers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from herd.curation.kmeans.layout import _axes, _n_dev

_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------- per-device kernels


def _tile_min(xb, ct, cn):
    """argmin / min over centroids of ||c||^2 - 2 x.c for one tile (x's norm excluded)."""
    dots = jnp.dot(xb, ct, precision=_HIGHEST, preferred_element_type=xb.dtype)
    dist = cn[None, :] - 2 * dots
    # min, then the first index attaining it: two plain reductions, which XLA:CPU
    # vectorises; jnp.argmin (a variadic reduce) measured 2-3x slower here.
    mn = jnp.min(dist, axis=1)
    iota = lax.broadcasted_iota(jnp.int32, dist.shape, 1)
    a = jnp.min(jnp.where(dist == mn[:, None], iota, dist.shape[1]), axis=1)
    return a, mn


# Below this many dimensions the distance tile is computed transposed, [k, d] x [d, tile]
# with the minimum taken across rows: at d = 32, k = 2000 (the curation benchmark's shape,
# 300k rows, tile 512, XLA:CPU) 358 vs 472 ms per pass, the same assignment; at d = 64
# equal (290 ms both), at d = 128, k = 1024 slower (497 vs 433 ms), so only for small d.
_TRANSPOSED_BELOW_D = 64


def _tile_min_t(xbt, c, cn):
    """_tile_min for a transposed tile xbt [d, tile]: the same argmin (first index on
    ties) and min, reduced over the centroid axis 0 of a [k, tile] block."""
    dots = jnp.dot(c, xbt, precision=_HIGHEST, preferred_element_type=xbt.dtype)
    dist = cn[:, None] - 2 * dots
    mn = jnp.min(dist, axis=0)
    iota = lax.broadcasted_iota(jnp.int32, dist.shape, 0)
    a = jnp.min(jnp.where(dist == mn[None, :], iota, dist.shape[0]), axis=0)
    return a, mn


def _tiles(x, tile):
    """Rows as [n_tiles, tile, d] and, for small d, also transposed [n_tiles, d, tile]."""
    n_loc, d = x.shape
    xt = x.reshape(n_loc // tile, tile, d)
    return xt, (jnp.swapaxes(xt, 1, 2) if d < _TRANSPOSED_BELOW_D else None)


def _nearest(xb, xbt, c, ct, cn):
    return _tile_min(xb, ct, cn) if xbt is None else _tile_min_t(xbt, c, cn)


def _local_stats(x, w, c, cpen, *, tile, axes, update):
    """Per-device Lloyd statistics for replicated centroids c [k, d]."""
    k, d = c.shape
    n_loc = x.shape[0]
    ct = c.T
    cn = jnp.sum(c * c, axis=1) + cpen
    xt, xtt = _tiles(x, tile)
    wt = w.reshape(n_loc // tile, tile)

    if update == "scatter":

        def body(carry, inp):
            sums, counts, inertia = carry
            xb, xbt, wb = inp
            a, mn = _nearest(xb, xbt, c, ct, cn)
            md = jnp.maximum(mn + jnp.sum(xb * xb, axis=1), 0)
            sums = sums.at[a].add(xb * wb[:, None])
            counts = counts.at[a].add(wb)
            return (sums, counts, inertia + jnp.sum(wb * md)), None

    else:  # one-hot matmul

        def body(carry, inp):
            sums, counts, inertia = carry
            xb, xbt, wb = inp
            a, mn = _nearest(xb, xbt, c, ct, cn)
            md = jnp.maximum(mn + jnp.sum(xb * xb, axis=1), 0)
            oh = (a[:, None] == jnp.arange(k, dtype=jnp.int32)[None, :]).astype(x.dtype)
            oh = oh * wb[:, None]
            sums = sums + jnp.dot(oh.T, xb, precision=_HIGHEST)
            counts = counts + jnp.sum(oh, axis=0)
            return (sums, counts, inertia + jnp.sum(wb * md)), None

    init = (jnp.zeros((k, d), x.dtype), jnp.zeros((k,), x.dtype), jnp.zeros((), x.dtype))
    (sums, counts, inertia), _ = lax.scan(body, init, (xt, xtt, wt))
    return lax.psum(sums, axes), lax.psum(counts, axes), lax.psum(inertia, axes)


def _ring_min(x, c_loc, cpen_loc, *, tile, axes, n_dev):
    """Per-row (argmin, min of ||c||^2 - 2x.c) with centroids sharded along k (ring)."""
    n_loc, d = x.shape
    k_loc = c_loc.shape[0]
    rank = lax.axis_index(axes)
    perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]
    xt = x.reshape(n_loc // tile, tile, d)
    best_d = jnp.full((n_loc // tile, tile), jnp.inf, x.dtype)
    best_a = jnp.zeros((n_loc // tile, tile), jnp.int32)
    blk, pen = c_loc, cpen_loc
    for s in range(n_dev):
        owner = (rank - s) % n_dev  # block held at step s came from rank - s
        ct = blk.T
        cn = jnp.sum(blk * blk, axis=1) + pen

        def f(xb, ct=ct, cn=cn):
            return _tile_min(xb, ct, cn)

        a, mn = lax.map(f, xt)
        a = a + (owner * k_loc).astype(jnp.int32)
        better = mn < best_d  # strict: ties keep the smaller block id only if seen first
        tie = (mn == best_d) & (a < best_a)
        upd = better | tie
        best_d = jnp.where(upd, mn, best_d)
        best_a = jnp.where(upd, a, best_a)
        if s < n_dev - 1:
            blk = lax.ppermute(blk, axes, perm)
            pen = lax.ppermute(pen, axes, perm)
    return best_a.reshape(n_loc), best_d.reshape(n_loc)


def _local_stats_ring(x, w, c_loc, cpen_loc, *, tile, axes, n_dev):
    n_loc, d = x.shape
    k_loc = c_loc.shape[0]
    a, mn = _ring_min(x, c_loc, cpen_loc, tile=tile, axes=axes, n_dev=n_dev)
    md = jnp.maximum(mn + jnp.sum(x * x, axis=1), 0)
    inertia = lax.psum(jnp.sum(w * md), axes)
    rank = lax.axis_index(axes)
    perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]
    xw = x * w[:, None]
    acc_s = jnp.zeros((k_loc, d), x.dtype)
    acc_c = jnp.zeros((k_loc,), x.dtype)
    # The accumulator for block b starts at its owner b and visits every device; after
    # n_dev steps (n_dev - 1 hops plus one final hop) it is back at b.
    for s in range(n_dev):
        b = (rank - s) % n_dev
        local = a - (b * k_loc).astype(jnp.int32)
        local = jnp.where((local >= 0) & (local < k_loc), local, k_loc)  # k_loc: dropped
        acc_s = acc_s.at[local].add(xw, mode="drop")
        acc_c = acc_c.at[local].add(w, mode="drop")
        acc_s = lax.ppermute(acc_s, axes, perm)
        acc_c = lax.ppermute(acc_c, axes, perm)
    return acc_s, acc_c, inertia


def _local_assign(x, c, cpen, *, tile, axes):
    n_loc, d = x.shape
    ct = c.T
    cn = jnp.sum(c * c, axis=1) + cpen

    def f(inp):
        xb, xbt = inp
        a, mn = _nearest(xb, xbt, c, ct, cn)
        return a, jnp.maximum(mn + jnp.sum(xb * xb, axis=1), 0)

    a, md = lax.map(f, _tiles(x, tile))
    return a.reshape(n_loc), md.reshape(n_loc)


def _local_assign_ring(x, c_loc, cpen_loc, *, tile, axes, n_dev):
    a, mn = _ring_min(x, c_loc, cpen_loc, tile=tile, axes=axes, n_dev=n_dev)
    return a, jnp.maximum(mn + jnp.sum(x * x, axis=1), 0)


# ----------------------------------------------------------------- jitted wrappers


def _smap(f, mesh, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@functools.partial(jax.jit, static_argnames=("mesh", "tile", "ring", "update"))
def _stats(xs, ws, c, cpen, *, mesh, tile, ring, update):
    axes = _axes(mesh)
    if ring:
        f = functools.partial(_local_stats_ring, tile=tile, axes=axes, n_dev=_n_dev(mesh))
        cspec = P(axes)
        out = (P(axes), P(axes), P())
    else:
        f = functools.partial(_local_stats, tile=tile, axes=axes, update=update)
        cspec = P()
        out = (P(), P(), P())
    return _smap(f, mesh, (P(axes), P(axes), cspec, cspec), out)(xs, ws, c, cpen)


@functools.partial(jax.jit, static_argnames=("mesh", "tile", "ring"))
def _assign_dev(xs, c, cpen, *, mesh, tile, ring):
    axes = _axes(mesh)
    if ring:
        f = functools.partial(_local_assign_ring, tile=tile, axes=axes, n_dev=_n_dev(mesh))
        cspec = P(axes)
    else:
        f = functools.partial(_local_assign, tile=tile, axes=axes)
        cspec = P()
    return _smap(f, mesh, (P(axes), cspec, cspec), (P(axes), P(axes)))(xs, c, cpen)


@functools.partial(jax.jit, static_argnames=("m",))
def _farthest_dev(md, ws, m):
    """Top-m rows by distance (weight-0 rows excluded): (values, row indices)."""
    score = jnp.where(ws > 0, md, -jnp.inf)
    return lax.top_k(score, m)


@jax.jit
def _update(c, sums, counts):
    safe = jnp.where(counts > 0, counts, 1)
    return jnp.where((counts > 0)[:, None], sums / safe[:, None], c)
