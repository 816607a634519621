"""Data layout of the k-means package: tile sizes, meshes, row padding, and ``_Data``
(rows of an array or memmap as fixed-shape chunks sharded over the mesh)."""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
        # this process's own first device: in a multi-process job every process then
        # computes the same result alone (jax.devices()[0] is process 0's, which the
        # others cannot address)
        return default_mesh(jax.local_devices()[:1])
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
    if getattr(arr, "is_fully_addressable", True):  # one process, or this process's devices
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


def _check_k(k, data: _Data):
    n_valid = data.n - data.n_invalid
    if k > n_valid:
        raise ValueError(
            f"k={k} is larger than the number of points ({n_valid} finite rows"
            + (f"; {data.n_invalid} non-finite rows excluded)" if data.n_invalid else ")")
        )
