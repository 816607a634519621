"""Lloyd engines: ``_Engine`` runs the steps chunk by chunk on the mesh, ``_HostEngine``
the same steps in numpy for small problems."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from herd.curation.kmeans.kernels import _assign_dev, _farthest_dev, _stats, _update
from herd.curation.kmeans.layout import _axes, _Data, _n_dev, _to_host

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
