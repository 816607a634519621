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

The package, one module per seam (each imports only those before it):

  layout.py      constants, meshes, tile sizes, row padding, ``_Data`` (rows as chunks)
  kernels.py     per-device kernels (distance tiles, Lloyd statistics, assignment, ring
                 variants) and their jitted shard_map wrappers
  engines.py     ``_Engine`` (on the mesh) and ``_HostEngine`` (numpy, small problems)
  initialise.py  exact greedy k-means++ and k-means||
  api.py         kmeans, kmeans_plusplus, assigner, assign, KMeansResult
"""

from herd.curation.kmeans.api import KMeansResult, assign, assigner, kmeans, kmeans_plusplus
from herd.curation.kmeans.initialise import kmeanspp_draws
from herd.curation.kmeans.layout import (
    ACCEL_MAX_TILE,
    ACCEL_TILE_BYTES,
    BUCKET_MAX_STEP,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_TILE,
    HOST_MAX_WORK,
    KPP_TILE,
    MAX_REPLICATED_CENTROID_BYTES,
    PICK_TILE,
    SMALL_INPUT_ELEMENTS,
    default_mesh,
    default_tile,
)

__all__ = [
    "assign",
    "assigner",
    "default_mesh",
    "default_tile",
    "kmeans",
    "kmeans_plusplus",
    "kmeanspp_draws",
    "KMeansResult",
    "ACCEL_MAX_TILE",
    "ACCEL_TILE_BYTES",
    "BUCKET_MAX_STEP",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_TILE",
    "HOST_MAX_WORK",
    "KPP_TILE",
    "MAX_REPLICATED_CENTROID_BYTES",
    "PICK_TILE",
    "SMALL_INPUT_ELEMENTS",
]
