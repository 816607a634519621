"""The public k-means calls: :func:`kmeans`, :func:`kmeans_plusplus`, :func:`assigner`,
:func:`assign` and :class:`KMeansResult`."""

from __future__ import annotations

import logging
import time

import numpy as np
from jax.sharding import Mesh

from herd.curation.kmeans.engines import _Engine, _HostEngine
from herd.curation.kmeans.initialise import _kmeans_parallel, _kpp_on
from herd.curation.kmeans.layout import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_TILE,
    MAX_REPLICATED_CENTROID_BYTES,
    _check_k,
    _Data,
    _pick_mesh,
    _resolve_tile,
    _to_host,
    _use_host,
    _validate,
    _x64,
)

log = logging.getLogger("herd.curation.kmeans")


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
