"""Sharded, tiled k-means in JAX: Lloyd iterations, exact greedy k-means++, k-means||.

Rows are sharded over every axis of the mesh (default: a 1-D mesh named ``'data'`` over
``jax.devices()``, which spans all processes). Each device scans its rows in tiles of
``tile`` rows: distances ``||c||^2 - 2 x.c`` for one tile against all centroids, argmin,
and a scatter-add of the tile into per-device centroid sums; the sums, counts and inertia
are then ``psum``-ed across devices. No N x k matrix and no N-length gather ever exists
during the iterations (only the final assignment, the function's output, is fetched).

When the centroid table exceeds ``max_replicated_centroid_bytes``, centroids are sharded
along k instead of replicated: each device holds k / n_dev centroids, blocks travel round a
ring (``ppermute``), each device keeps a running per-row (min, argmin) over the blocks it
sees, and the per-block sums travel with their block back to its owner.

Data that is a ``numpy.memmap`` larger than ``chunk_rows`` rows is streamed: each Lloyd
iteration is one pass over chunks, each chunk sharded over the mesh; k-means|| (a few
streamed oversampling rounds, then weighted k-means++ on the candidates) initialises it.

Accumulation is float32 by default; ``dtype=np.float64`` runs everything in float64 inside
a scoped ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "assign",
    "assigner",
    "default_mesh",
    "default_tile",
    "kmeans",
    "kmeans_plusplus",
    "kmeanspp_draws",
    "KMeansResult",
]

log = logging.getLogger(__name__)

# Rows per Lloyd distance tile on CPU (see default_tile). Seconds per Lloyd iteration on
# 2 XLA:CPU devices, same run, tile 256 vs 512: 300k x 32, k = 2000: 0.222 vs 0.243;
# 200k x 128, k = 1024: 0.184 vs 0.193; 80k x 32, k = 2000: 0.056 vs 0.057 (128: slower).
DEFAULT_TILE = 256
# On GPU/TPU larger tiles amortise per-tile loop overhead: measured on an H100 (1M x 128,
# k = 1024, seconds per Lloyd iteration): tile 512 -> 0.077, 4096 -> 0.049, 32768 -> 0.042.
ACCEL_MAX_TILE = 32768
ACCEL_TILE_BYTES = 256 << 20  # bound on one [tile, k] distance block on an accelerator
KPP_TILE = 16384  # rows per tile of the k-means++ candidate-distance pass
PICK_TILE = 512  # rows per tile of k-means++'s two-level inverse-CDF sampling
# Rows processed at once when streaming a memmap (and the in-memory limit for memmaps).
DEFAULT_CHUNK_ROWS = 1 << 20
# Above this many bytes the centroid table is sharded along k instead of replicated.
MAX_REPLICATED_CENTROID_BYTES = 1 << 30
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def default_mesh(devices=None) -> Mesh:
    """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


# With mesh=None, inputs of at most this many elements run on one device (sharding tiny
# inputs over many devices only adds overhead).
SMALL_INPUT_ELEMENTS = 1 << 20


# With mesh=None, problems with n * k * max(d, 16) at most this run in numpy on the host.
HOST_MAX_WORK = 1 << 26


def _use_host(mesh, x, k, streamed=False) -> bool:
    return mesh is None and not streamed and x.shape[0] * k * max(x.shape[1], 16) <= HOST_MAX_WORK


def _pick_mesh(mesh, x) -> Mesh:
    if mesh is not None:
        return mesh
    if x.shape[0] * x.shape[1] <= SMALL_INPUT_ELEMENTS:
        return default_mesh(jax.devices()[:1])
    return default_mesh()


def _axes(mesh: Mesh):
    return tuple(mesh.axis_names)


def _n_dev(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def _x64(dtype):
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


# Tile counts are rounded up to a multiple of at most this many tiles (see _bucket).
BUCKET_MAX_STEP = 16


def _bucket(n: int) -> int:
    """Rounds n (tiles) up to a multiple of a step: few distinct shapes (each one costs
    XLA compilations, ~1 s), bounded padding (each padded row costs as much as a real one).

    The step is 2^e / 4 for n in [2^e, 2^(e+1)) (<= 25% padding, as few shapes as
    possible for small n), but at most BUCKET_MAX_STEP tiles (8192 rows of 512) and at
    least 2^e / 32 (<= ~3% padding for huge n). At 300k rows the old 2^e / 4 step padded
    586 tiles to 640 (9% wasted work); now 592 (1%). The resampling runs of a level
    (n within a few % of each other) still mostly share one shape.
    """
    if n <= 4:
        return max(n, 1)
    top = 2 ** int(math.log2(n))
    step = max(min(top // 4, BUCKET_MAX_STEP), top // 32)
    return -(-n // step) * step


def default_tile(platform: str, k: int, itemsize: int = 4) -> int:
    """Rows per Lloyd distance tile when the caller passes none: DEFAULT_TILE on CPU
    (fastest there: the [tile, k] block stays in cache); on an accelerator the largest
    power of two <= ACCEL_MAX_TILE whose [tile, k] block fits ACCEL_TILE_BYTES (so a
    huge k still gets a small tile), but not below 64."""
    if platform == "cpu":
        return DEFAULT_TILE
    tile = ACCEL_MAX_TILE
    while tile > 64 and tile * max(k, 1) * itemsize > ACCEL_TILE_BYTES:
        tile //= 2
    return tile


def _resolve_tile(tile, mesh: Mesh, k: int, dtype) -> int:
    if tile is not None:
        return int(tile)
    return default_tile(mesh.devices.flat[0].platform, k, np.dtype(dtype).itemsize)


def _row_layout(n: int, n_dev: int, tile: int) -> tuple[int, int]:
    """(tile, padded rows): rows per device is a multiple of tile."""
    per_dev = -(-n // n_dev)
    if per_dev < tile:  # one tile per device, its size a power of two (few shapes)
        tile = max(64, 1 << (per_dev - 1).bit_length())
    n_tiles = _bucket(-(-per_dev // tile))
    return tile, n_tiles * tile * n_dev


def _validate(x, k: int | None):
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return x


def _to_host(arr) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(arr)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


class _Data:
    """Rows of x (in memory or a memmap) as fixed-shape chunks sharded over the mesh.

    Non-finite rows get weight 0 (and zeros as values); padding rows get weight 0.
    With a single chunk the device arrays are cached (in-memory mode).
    """

    def __init__(self, x, mesh, dtype, tile, chunk_rows):
        self.x = x
        self.mesh = mesh
        self.dtype = np.dtype(dtype)
        self.n, self.d = x.shape
        n_dev = _n_dev(mesh)
        if isinstance(x, np.memmap) and self.n > chunk_rows:
            self.chunk = int(chunk_rows)
        else:
            self.chunk = self.n
        self.starts = list(range(0, self.n, self.chunk))
        self.tile, self.padded = _row_layout(self.chunk, n_dev, tile)
        self.sharding = NamedSharding(mesh, P(_axes(mesh)))
        # Validity of every row (one host pass; N bytes).
        valid = np.empty(self.n, bool)
        for s in self.starts:
            valid[s : s + self.chunk] = np.isfinite(np.asarray(x[s : s + self.chunk])).all(1)
        self.valid = valid
        self.n_invalid = int(self.n - valid.sum())
        self._cache = None

    @property
    def n_chunks(self) -> int:
        return len(self.starts)

    @property
    def streamed(self) -> bool:
        return self.n_chunks > 1

    def rows(self, i):
        """(start, stop) rows of chunk i in x."""
        s = self.starts[i]
        return s, min(s + self.chunk, self.n)

    def get(self, i):
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        s, e = self.rows(i)
        m = e - s

        def xcb(index):
            sl = index[0]
            a, b = sl.start or 0, sl.stop if sl.stop is not None else self.padded
            hi = min(b, m)
            blk = np.asarray(self.x[s + a : s + max(hi, a)], dtype=self.dtype)
            ok = self.valid[s + a : s + max(hi, a)]
            if hi == b and ok.all():
                # No padding and no non-finite row in this shard: the rows as they are
                # (no host copy: at 1M x 128 the zero-filled copy cost ~2 s per call).
                return blk
            out = np.zeros((b - a, self.d), self.dtype)
            if hi > a:
                out[: hi - a] = blk
                out[: hi - a][~ok] = 0  # (np.where over a broadcast mask: ~30x slower)
            return out

        def wcb(index):
            sl = index[0]
            a, b = sl.start or 0, sl.stop if sl.stop is not None else self.padded
            out = np.zeros(b - a, self.dtype)
            hi = min(b, m)
            if hi > a:
                out[: hi - a] = self.valid[s + a : s + hi]
            return out

        xs = jax.make_array_from_callback((self.padded, self.d), self.sharding, xcb)
        ws = jax.make_array_from_callback((self.padded,), self.sharding, wcb)
        if not self.streamed:
            self._cache = (i, (xs, ws))
        return xs, ws


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


# ------------------------------------------------------------------ the engine


class _Engine:
    """Holds data, mesh, layout; runs Lloyd statistics and assignments chunk by chunk."""

    def __init__(self, data: _Data, k: int, mesh, max_replicated_centroid_bytes, update):
        self.data = data
        self.mesh = mesh
        self.k = k
        self.n_dev = _n_dev(mesh)
        nbytes = k * data.d * data.dtype.itemsize
        self.ring = self.n_dev > 1 and nbytes > max_replicated_centroid_bytes
        mult = self.n_dev if self.ring else 1
        self.k_pad = -(-k // mult) * mult
        self.update = update
        csh = NamedSharding(mesh, P(_axes(mesh)) if self.ring else P())
        self.csharding = csh
        pen = np.zeros(self.k_pad, data.dtype)
        pen[k:] = np.inf
        self.cpen = jax.device_put(pen, csh)

    def put_centroids(self, c: np.ndarray):
        cp = np.zeros((self.k_pad, self.data.d), self.data.dtype)
        cp[: self.k] = c
        return jax.device_put(cp, self.csharding)

    def step(self, c_dev):
        """One Lloyd step: returns (new centroids, counts [k], inertia before update)."""
        sums = counts = inertia = None
        for i in range(self.data.n_chunks):
            xs, ws = self.data.get(i)
            s, n, t = _stats(
                xs, ws, c_dev, self.cpen, mesh=self.mesh, tile=self.data.tile,
                ring=self.ring, update=self.update,
            )  # fmt: skip
            if sums is None:
                sums, counts, inertia = s, n, t
            else:
                sums, counts, inertia = sums + s, counts + n, inertia + t
        return _update(c_dev, sums, counts), counts, inertia

    def assign(self, c_dev, want_rows=True):
        """(assignment int32 [n] with -1 for invalid rows, sq distance [n]) on the host."""
        d = self.data
        a_out = np.empty(d.n, np.int32)
        md_out = np.empty(d.n, d.dtype)
        for i in range(d.n_chunks):
            xs, ws = d.get(i)
            a, md = _assign_dev(xs, c_dev, self.cpen, mesh=self.mesh, tile=d.tile, ring=self.ring)
            s, e = d.rows(i)
            a_out[s:e] = _to_host(a)[: e - s]
            md_out[s:e] = _to_host(md)[: e - s]
        a_out[~d.valid] = -1
        md_out[~d.valid] = np.nan
        return a_out, md_out

    def farthest(self, c_dev, m):
        """Global row indices and distances of the m valid rows farthest from their
        centroid, farthest first (ties: lower row index first)."""
        d = self.data
        vals, idxs = [], []
        for i in range(d.n_chunks):
            xs, ws = d.get(i)
            _, md = _assign_dev(xs, c_dev, self.cpen, mesh=self.mesh, tile=d.tile, ring=self.ring)
            mm = min(m, d.padded)
            v, j = _farthest_dev(md, ws, mm)
            s, e = d.rows(i)
            v, j = _to_host(v), _to_host(j).astype(np.int64)
            keep = (j < e - s) & np.isfinite(v)
            vals.append(v[keep])
            idxs.append(j[keep] + s)
        v = np.concatenate(vals)
        j = np.concatenate(idxs)
        order = np.lexsort((j, -v))[:m]
        return j[order], v[order]

    def reseed_empty(self, c_dev, counts):
        """Moves each empty cluster's centroid onto one of the points farthest from their
        centroid (distinct points, farthest first). Returns (centroids, n_reseeded)."""
        counts = _to_host(counts)[: self.k]
        empty = np.nonzero(counts == 0)[0]
        if empty.size == 0:
            return c_dev, 0
        rows, _ = self.farthest(c_dev, int(empty.size))
        c = _to_host(c_dev)[: self.k].copy()
        rows_x = np.asarray(self.data.x[np.sort(rows)], dtype=self.data.dtype)
        rows_x = rows_x[np.argsort(np.argsort(rows))]  # back to farthest-first order
        n = min(len(rows), empty.size)
        c[empty[:n]] = rows_x[:n]
        return self.put_centroids(c), n


class _HostEngine:
    """The same Lloyd step, assignment and re-seeding in numpy, for small problems (XLA's
    per-shape compilation, ~1 s per function, dominates below HOST_MAX_WORK)."""

    def __init__(self, data: _Data, k: int):
        self.data = data
        self.k = k
        dt = data.dtype
        x = np.asarray(data.x[:], dtype=dt)
        self.x = np.where(data.valid[:, None], x, 0).astype(dt)
        self.w = data.valid.astype(dt)
        self.xn = np.einsum("nd,nd->n", self.x, self.x)

    def put_centroids(self, c):
        return np.array(c, dtype=self.data.dtype)

    def _nearest(self, c):
        dist = np.einsum("kd,kd->k", c, c)[None, :] - 2 * (self.x @ c.T)
        a = dist.argmin(1).astype(np.int32)
        mn = np.take_along_axis(dist, a[:, None].astype(np.int64), 1)[:, 0]
        return a, np.maximum(mn + self.xn, 0)

    def step(self, c):
        a, md = self._nearest(c)
        counts = np.bincount(a, weights=self.w, minlength=self.k)
        xw = self.x * self.w[:, None]
        sums = np.stack([np.bincount(a, xw[:, j], minlength=self.k) for j in range(xw.shape[1])], 1)
        new = np.where((counts > 0)[:, None], sums / np.maximum(counts, 1)[:, None], c).astype(
            self.data.dtype
        )
        return new, counts, float(np.dot(self.w, md))

    def assign(self, c):
        a, md = self._nearest(c)
        a[~self.data.valid] = -1
        md = md.astype(self.data.dtype)
        md[~self.data.valid] = np.nan
        return a, md

    def reseed_empty(self, c, counts):
        empty = np.nonzero(np.asarray(counts)[: self.k] == 0)[0]
        if empty.size == 0:
            return c, 0
        _, md = self._nearest(c)
        score = np.where(self.data.valid, md, -np.inf)
        order = np.lexsort((np.arange(len(score)), -score))[: empty.size]
        order = order[np.isfinite(score[order])]
        c = c.copy()
        c[empty[: len(order)]] = self.x[order]
        return c, len(order)


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


def kmeans_plusplus(
    x,
    k: int,
    seed: int = 0,
    n_local_trials: int | None = None,
    *,
    sample_weight=None,
    mesh: Mesh | None = None,
    dtype=np.float32,
    return_info: bool = False,
):
    """Exact greedy k-means++ (as scikit-learn): each centre samples ``n_local_trials``
    (default ``2 + int(ln k)``) candidates with probability proportional to
    weight * squared distance to the nearest chosen centre, and keeps the candidate that
    lowers the potential most. The whole loop is one jitted program over rows sharded on
    the mesh; per centre it costs one pass of O(n * d * n_local_trials).

    Returns centroids [k, d] (numpy, ``dtype``); with ``return_info`` also
    ``(row indices [k], potential)``.
    """
    x = _validate(x, k)
    host = _use_host(mesh, x, k)
    mesh = _pick_mesh(mesh, x)
    with _x64(dtype):
        data = _Data(x, mesh, dtype, DEFAULT_TILE, max(x.shape[0], 1))
        _check_k(k, data)
        centers, index, pot = _kpp_on(data, k, seed, n_local_trials, sample_weight, host)
    if return_info:
        return centers, index, pot
    return centers


def _check_k(k, data: _Data):
    n_valid = data.n - data.n_invalid
    if k > n_valid:
        raise ValueError(
            f"k={k} is larger than the number of points ({n_valid} finite rows"
            + (f"; {data.n_invalid} non-finite rows excluded)" if data.n_invalid else ")")
        )


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


# ---------------------------------------------------------------------- k-means


class KMeansResult(tuple):
    """(centroids, assignment[, inertia][, distances]) plus attributes inertia,
    inertia_history (per iteration, before its update), iter_seconds (wall time of each
    Lloyd iteration), n_reseeded, n_invalid, init_potential (k-means++ only)."""

    def __new__(cls, items, **info):
        obj = super().__new__(cls, tuple(items))
        obj.__dict__.update(info)
        return obj


def kmeans(
    x,
    k: int,
    n_iters: int = 20,
    seed: int = 0,
    init=None,
    *,
    mesh: Mesh | None = None,
    dtype=np.float32,
    tile: int | None = None,
    init_method: str | None = None,
    n_local_trials: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_replicated_centroid_bytes: int = MAX_REPLICATED_CENTROID_BYTES,
    update: str = "scatter",
    final_assignment: bool = True,
    return_inertia: bool = False,
    return_distances: bool = False,
):
    """Lloyd's k-means over rows sharded on ``mesh``.

    Args:
      x: [n, d] floating array, or a ``numpy.memmap`` (streamed in chunks of ``chunk_rows``
        rows when larger). Non-finite rows are excluded (counted, logged; assignment -1).
      k: number of clusters (<= number of finite rows).
      n_iters: Lloyd iterations (assign + update); a final assignment follows.
      seed: seeds the initialisation (deterministic, independent of the device count).
      init: optional [k, d] initial centroids (then ``init_method`` is ignored).
      mesh: rows are sharded over all its axes. Default (None): all devices; one device
        when x has at most SMALL_INPUT_ELEMENTS elements; numpy on the host when
        n * k * max(d, 16) <= HOST_MAX_WORK (same algorithm and draws; XLA's per-shape
        compile time would dominate). Pass a mesh to force the device path.
      init_method: 'k-means++' (exact greedy, default in memory), 'k-means||' (default for
        streamed memmaps) or 'random' (k distinct random rows).
      dtype: np.float32 (default) or np.float64 (runs under a scoped ``jax.enable_x64``).
      tile: rows per distance tile (the [tile, k] distance block is the largest temporary).
        Default (None): :func:`default_tile` of the mesh's platform, k and dtype.
      max_replicated_centroid_bytes: above this the centroids are sharded along k.
      update: 'scatter' (segment sums by scatter-add) or 'onehot' (one-hot matmul).
      final_assignment: False skips the final assignment pass (assignment and inertia
        are then None; not with return_inertia / return_distances), for callers that only
        need the centroids.
      return_inertia: also return the final inertia (sum of squared distances).
      return_distances: also return the squared distance of each row to its centroid.

    Returns:
      (centroids [k, d] numpy ``dtype``, assignment int32 [n]) [+ inertia] [+ distances].
      The returned tuple also carries ``.inertia_history``, ``.n_reseeded``, ``.n_invalid``.
      Empty clusters are re-seeded at each step from the points farthest from their
      centroid, so none survives unless there are duplicate points.
    """
    x = _validate(x, k)
    if update not in ("scatter", "onehot"):
        raise ValueError(f"update must be 'scatter' or 'onehot', got {update!r}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    if not final_assignment and (return_inertia or return_distances):
        raise ValueError("return_inertia / return_distances need final_assignment=True")
    user_mesh = mesh
    mesh = _pick_mesh(mesh, x)
    tile = _resolve_tile(tile, mesh, k, dtype)
    with _x64(dtype):
        data = _Data(x, mesh, dtype, tile, chunk_rows)
        _check_k(k, data)
        if data.n_invalid:
            log.warning("kmeans: excluding %d non-finite rows of %d", data.n_invalid, data.n)
        host = _use_host(user_mesh, x, k, data.streamed)
        if host:
            eng = _HostEngine(data, k)
        else:
            eng = _Engine(data, k, mesh, max_replicated_centroid_bytes, update)
        init_potential = None
        if init is not None:
            c0 = np.asarray(init, dtype=data.dtype)
            if c0.shape != (k, data.d):
                raise ValueError(f"init must have shape {(k, data.d)}, got {c0.shape}")
        else:
            method = init_method or ("k-means||" if data.streamed else "k-means++")
            if method == "k-means++":
                if data.streamed:
                    raise ValueError(
                        "init_method='k-means++' needs the data in memory; use 'k-means||' "
                        "for a streamed memmap (or raise chunk_rows)"
                    )
                c0, _, init_potential = _kpp_on(data, k, seed, n_local_trials, host=host)
            elif method == "k-means||":
                c0 = _kmeans_parallel(eng, k, seed, n_local_trials=n_local_trials)
            elif method == "random":
                rng = np.random.default_rng(seed)
                rows = np.sort(rng.choice(np.nonzero(data.valid)[0], size=k, replace=False))
                c0 = np.asarray(x[rows], dtype=data.dtype)
            else:
                raise ValueError(
                    f"init_method must be 'k-means++', 'k-means||' or 'random', got {method!r}"
                )
        c = eng.put_centroids(c0)
        history = []
        iter_seconds = []
        n_reseeded = 0
        for _ in range(n_iters):
            t0 = time.perf_counter()
            c, counts, inertia = eng.step(c)
            history.append(float(inertia))
            iter_seconds.append(time.perf_counter() - t0)
            c, nr = eng.reseed_empty(c, counts)
            n_reseeded += nr
        centroids = _to_host(c)[:k]
        a = md = inertia = None
        if final_assignment:
            a, md = eng.assign(c)
            inertia = float(np.sum(md[data.valid], dtype=np.float64))
    out = [centroids, a]
    if return_inertia:
        out.append(inertia)
    if return_distances:
        out.append(md)
    return KMeansResult(
        out,
        inertia=inertia,
        inertia_history=history,
        iter_seconds=iter_seconds,
        n_reseeded=n_reseeded,
        n_invalid=data.n_invalid,
        init_potential=init_potential,
    )


def assigner(
    x,
    k: int,
    *,
    mesh: Mesh | None = None,
    dtype=np.float32,
    tile: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_replicated_centroid_bytes: int = MAX_REPLICATED_CENTROID_BYTES,
):
    """Puts x on the devices once and returns ``f(centroids [k, d]) -> (assignment,
    squared distance)`` as :func:`assign`; for callers that assign the same rows to
    several centroid tables (the resampling steps of a hierarchy level)."""
    x = _validate(x, k)
    host = _use_host(mesh, x, k, isinstance(x, np.memmap))
    mesh = _pick_mesh(mesh, x)
    tile = _resolve_tile(tile, mesh, k, dtype)
    with _x64(dtype):
        data = _Data(x, mesh, dtype, tile, chunk_rows)
        if host:
            eng = _HostEngine(data, k)
        else:
            eng = _Engine(data, k, mesh, max_replicated_centroid_bytes, "scatter")

    def f(centroids):
        centroids = np.asarray(centroids)
        if centroids.shape != (k, data.d):
            raise ValueError(f"centroids must be [{k}, {data.d}], got {centroids.shape}")
        with _x64(dtype):
            return eng.assign(eng.put_centroids(centroids))

    return f


def assign(
    x,
    centroids,
    *,
    mesh: Mesh | None = None,
    dtype=np.float32,
    tile: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_replicated_centroid_bytes: int = MAX_REPLICATED_CENTROID_BYTES,
):
    """Nearest centroid of each row: (assignment int32 [n] (-1 for non-finite rows),
    squared distance [n] (NaN for non-finite rows))."""
    x = _validate(x, None)
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must be [k, {x.shape[1]}], got {centroids.shape}")
    f = assigner(
        x, centroids.shape[0], mesh=mesh, dtype=dtype, tile=tile, chunk_rows=chunk_rows,
        max_replicated_centroid_bytes=max_replicated_centroid_bytes,
    )  # fmt: skip
    return f(centroids)
