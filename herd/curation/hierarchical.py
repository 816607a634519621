"""Hierarchical k-means with resampling (Vo et al. 2024) and the ClusterTree format.

Level 0 clusters the points; level i > 0 clusters the centroids of level i - 1. Each level
is stored as flat CSR arrays (``offsets``/``members``), so that a tree with millions of
clusters needs no Python objects per cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ClusterLevel",
    "ClusterTree",
    "build_level",
    "hierarchical_kmeans",
]

_FORMAT_VERSION = 1


@dataclasses.dataclass
class ClusterLevel:
    """One level of a cluster tree.

    Attributes:
      centroids: [k, d] float centroids of this level's clusters.
      assignment: [n_items] int32 cluster of each item of the level below (at level 0 the
        items are the points). Items excluded from clustering (NaN/inf rows) have -1.
      offsets: [k + 1] int64 CSR offsets: members of cluster c are
        ``members[offsets[c]:offsets[c + 1]]``.
      members: [n_valid] int64 item indices grouped by cluster, each group sorted by
        distance to its centroid, closest first (ties by item index). Excluded items
        (assignment -1) are not listed, so ``offsets[-1] == (assignment >= 0).sum()``.
      sq_distance: [n_items] float squared distance of each item to its centroid
        (NaN for excluded items).
    """

    centroids: np.ndarray
    assignment: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    sq_distance: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.assignment.shape[0])

    def sizes(self) -> np.ndarray:
        """[k] int64 number of members of each cluster."""
        return np.diff(self.offsets)

    def cluster(self, c: int) -> np.ndarray:
        """Item indices of cluster c, closest to its centroid first."""
        return self.members[self.offsets[c] : self.offsets[c + 1]]

    def save(self, path: str) -> None:
        """Writes ``path`` (an .npz file), atomically (write to a temporary, then rename)."""
        tmp = path + ".tmp.npz"
        arrays = dict(
            centroids=self.centroids,
            assignment=self.assignment,
            offsets=self.offsets,
            members=self.members,
        )
        if self.sq_distance is not None:
            arrays["sq_distance"] = self.sq_distance
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> ClusterLevel:
        with np.load(path) as z:
            return cls(
                centroids=z["centroids"],
                assignment=z["assignment"],
                offsets=z["offsets"],
                members=z["members"],
                sq_distance=z["sq_distance"] if "sq_distance" in z.files else None,
            )


def build_level(centroids, assignment, sq_distance) -> ClusterLevel:
    """Builds the CSR arrays of a level from an assignment and per-item distances."""
    centroids = np.asarray(centroids)
    assignment = np.asarray(assignment, dtype=np.int32)
    sq_distance = np.asarray(sq_distance)
    k = centroids.shape[0]
    valid = assignment >= 0
    idx = np.nonzero(valid)[0].astype(np.int64)
    a = assignment[idx]
    dist = sq_distance[idx]
    # Primary key: cluster; then distance; then item index (lexsort's last key is primary).
    order = np.lexsort((idx, dist, a))
    members = idx[order]
    counts = np.bincount(a, minlength=k).astype(np.int64)
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    sq = np.where(valid, sq_distance, np.nan)
    return ClusterLevel(centroids, assignment, offsets, members, sq)


@dataclasses.dataclass
class ClusterTree:
    """A hierarchy of clusters: ``levels[0]`` clusters the points, ``levels[i]`` clusters
    the centroids of ``levels[i - 1]``."""

    levels: list[ClusterLevel]
    n_points: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def save(self, directory: str) -> None:
        """Writes ``level_<i>.npz`` per level and ``tree.json`` (written last)."""
        os.makedirs(directory, exist_ok=True)
        for i, level in enumerate(self.levels):
            level.save(os.path.join(directory, f"level_{i}.npz"))
        info = dict(
            format_version=_FORMAT_VERSION,
            n_points=int(self.n_points),
            n_levels=len(self.levels),
            ks=[lv.k for lv in self.levels],
            meta=self.meta,
        )
        _write_json(os.path.join(directory, "tree.json"), info)

    @classmethod
    def load(cls, directory: str) -> ClusterTree:
        with open(os.path.join(directory, "tree.json")) as f:
            info = json.load(f)
        levels = [
            ClusterLevel.load(os.path.join(directory, f"level_{i}.npz"))
            for i in range(info["n_levels"])
        ]
        return cls(levels=levels, n_points=info["n_points"], meta=info.get("meta", {}))


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def hierarchical_kmeans(*args, **kwargs):  # replaced below once written
    raise NotImplementedError


_ = (math, Sequence)
