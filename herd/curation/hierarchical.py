"""Hierarchical k-means with resampling (Vo et al. 2024) and the ClusterTree format.

Level 0 clusters the points; level i > 0 clusters the centroids of level i - 1. Each level
is stored as flat CSR arrays (``offsets``/``members``), so that a tree with millions of
clusters needs no Python objects per cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "ClusterLevel",
    "ClusterTree",
    "build_level",
    "check_resume",
    "hierarchical_kmeans",
    "input_identity",
    "is_main_process",
    "sync_processes",
]

_FORMAT_VERSION = 1
# Rows hashed for a tree's record of its input: evenly spaced, so the hash reads a few
# pages of a memmap however large it is (a 743M x 1024 file: 4 MiB of 3 TB).
IDENTITY_SAMPLE_ROWS = 1024


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

    def save(self, directory: str, levels: Sequence[int] | None = None) -> None:
        """Writes ``level_<i>.npz`` per level (only those in ``levels`` if given: a run
        that resumes rewrites none of the finished ones) and ``tree.json`` (written last)."""
        os.makedirs(directory, exist_ok=True)
        for i, level in enumerate(self.levels):
            if levels is None or i in levels:
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


def is_main_process() -> bool:
    """Whether this process writes files and prints: process 0 of a jax.distributed run
    (every process computes; the collectives need all of them), or the only process."""
    import jax

    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier across the processes of a jax.distributed run (nothing with one process):
    placed where a process > 0 reads what process 0 wrote, or where process 0 may write
    only after every process has read."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def _select_per_cluster(level: ClusterLevel, r: int, strategy: str, rng) -> np.ndarray:
    """Item indices: up to r members of every cluster (closest first, or at random)."""
    sizes = level.sizes()
    n_valid = int(level.offsets[-1])
    pos = np.arange(n_valid) - np.repeat(level.offsets[:-1], sizes)
    if strategy == "closest":
        members = level.members
    else:
        cl = np.repeat(np.arange(level.k), sizes)
        order = np.lexsort((rng.random(n_valid), cl))
        members = level.members[order]
    return np.sort(members[pos < r])


def _run_level(items, k, steps, r, *, n_iters, seed, strategy, kw) -> tuple[ClusterLevel, int]:
    """One level: k-means (k-means++ then Lloyd); then steps - 1 resampling rounds (only
    when r > 1): r items per cluster, a fresh k-means on them, all items reassigned.

    Returns (the level, the number of resampling rounds that ran)."""
    from herd.curation.kmeans import assigner, kmeans

    res = kmeans(items, k, n_iters, _seed(seed, 0), return_distances=True, **kw)
    level = build_level(res[0], res[1], res[2])
    rounds = 0
    if r > 1 and steps > 1:
        rng = np.random.default_rng(_seed(seed, 1))
        assign_items = assigner(items, k, **kw)  # the items go to the devices once
        for step in range(1, steps):
            idx = _select_per_cluster(level, r, strategy, rng)
            if idx.size < k:  # some clusters empty: top up at random
                rest = np.setdiff1d(np.nonzero(level.assignment >= 0)[0], idx)
                idx = np.sort(np.concatenate([idx, rng.choice(rest, k - idx.size, False)]))
            sub = kmeans(
                np.asarray(items[idx]), k, n_iters, _seed(seed, 2, step), final_assignment=False,
                **kw,
            )  # fmt: skip
            level = build_level(sub[0], *assign_items(sub[0]))
            rounds += 1
    return level, rounds


def _run_split_level(items, k, n_splits, steps, r, *, n_iters, seed, strategy, kw):
    """Coarse level of k // n_splits clusters (with resampling), each split by k-means into
    min(n_splits, size) clusters. The level has at most k clusters.

    Returns (the level, the resampling rounds of the coarse level, the split runs)."""
    from herd.curation.kmeans import kmeans

    coarse, rounds = _run_level(
        items, k // n_splits, steps, r, n_iters=n_iters, seed=seed, strategy=strategy, kw=kw
    )
    n = items.shape[0]
    assignment = np.full(n, -1, np.int32)
    sq = np.full(n, np.nan, np.float64)
    cents = []
    for c in range(coarse.k):
        mem = np.sort(coarse.cluster(c))
        if mem.size == 0:
            continue
        kc = min(n_splits, mem.size)
        sub = kmeans(
            np.asarray(items[mem]), kc, n_iters, _seed(seed, 3, c), return_distances=True, **kw
        )
        assignment[mem] = sub[1] + sum(len(x) for x in cents)
        sq[mem] = sub[2]
        cents.append(sub[0])
    return build_level(np.concatenate(cents), assignment, sq), rounds, len(cents)


def input_identity(x) -> dict:
    """What a saved tree records of its input, so that a rerun never resumes a tree of
    other data: for a memmap the file's path, size and modification time, and for any
    array a SHA-256 of its shape, dtype and IDENTITY_SAMPLE_ROWS evenly spaced rows (a
    cheap check of the content, also for in-memory arrays, whose path/size/mtime are None)."""
    n = int(x.shape[0])
    rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, IDENTITY_SAMPLE_ROWS)).astype(np.int64))
    h = hashlib.sha256(repr((tuple(int(s) for s in x.shape), str(x.dtype))).encode())
    h.update(np.ascontiguousarray(np.asarray(x[rows])).tobytes())
    ident = dict(path=None, size=None, mtime_ns=None, content=h.hexdigest())
    path = getattr(x, "filename", None)
    if path and os.path.exists(path):
        st = os.stat(path)
        ident.update(path=os.path.abspath(path), size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))
    return ident


def _per_level(v, name: str, ks: list[int]) -> list[int]:
    n_levels = len(ks)
    v = [int(v)] * n_levels if np.isscalar(v) else [int(t) for t in v]
    if len(v) != n_levels:
        raise ValueError(f"{name} has {len(v)} entries for {n_levels} levels (ks={ks})")
    if min(v) < 1:
        raise ValueError(f"{name} entries must be >= 1, got {v}")
    return v


def _tree_config(
    x, ks, resampling_steps, sample_sizes, *, n_iters, seed, split_first, sample_strategy, dtype
):
    """Validates the arguments of hierarchical_kmeans; returns (x, the config a saved tree
    records and a resumed run must match)."""
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must name at least one level")
    steps = _per_level(resampling_steps, "resampling_steps", ks)
    sizes = _per_level(sample_sizes, "sample_sizes", ks)
    if sample_strategy not in ("closest", "random"):
        raise ValueError(f"sample_strategy must be 'closest' or 'random', got {sample_strategy!r}")
    if split_first is not None and (split_first < 1 or ks[0] % split_first):
        raise ValueError(f"split_first={split_first} must be >= 1 and divide ks[0]={ks[0]}")
    if not hasattr(x, "ndim"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    config = dict(
        ks=ks,
        resampling_steps=steps,
        sample_sizes=sizes,
        n_iters=int(n_iters),
        seed=int(seed),
        split_first=split_first,
        sample_strategy=sample_strategy,
        dtype=np.dtype(dtype).name,
        n_points=int(x.shape[0]),
        dim=int(x.shape[1]),
    )
    return x, config


def resampling_rounds(steps: int, r: int) -> int:
    """Resampling rounds a level runs after its first k-means: ``steps - 1`` when r > 1,
    else none (one item per cluster would make the centroids those items)."""
    return steps - 1 if r > 1 else 0


def hierarchical_kmeans(
    x,
    ks: Sequence[int],
    resampling_steps: Sequence[int] | int = 1,
    sample_sizes: Sequence[int] | int = 1,
    *,
    n_iters: int = 50,
    seed: int = 0,
    split_first: int | None = None,
    sample_strategy: str = "closest",
    workdir: str | None = None,
    mesh=None,
    dtype=np.float32,
    tile: int | None = None,
    verbose: bool = False,
    say: Callable[[str], None] | None = None,
) -> ClusterTree:
    """Hierarchical k-means with resampling (Vo et al. 2024, Sec. 3, Alg. 1).

    Level 0 clusters the rows of x; level i clusters the centroids of level i - 1. At each
    level: k-means (exact k-means++ then ``n_iters`` Lloyd iterations), then, if the
    level's sample size r > 1, ``resampling_steps[i] - 1`` resampling rounds, each taking
    the r items closest to each centroid ('closest') or r at random ('random'), running a
    fresh k-means++ and Lloyd on them, and reassigning all items of the level to the new
    centroids.

    Counting: herd's ``resampling_steps`` counts the k-means runs of a level, the first
    included; the paper's m (Alg. 1, and ``n_resamples`` of the official code) counts the
    resampling rounds after the first run. So ``resampling_steps = m + 1`` reproduces the
    paper's m; the rounds that ran are recorded per level in
    ``tree.meta['level_runs']`` (see :func:`resampling_rounds`).

    Args:
      x: [n, d] floating array (or memmap). Non-finite rows are excluded (assignment -1).
      ks: clusters per level, e.g. [10_000_000, 500_000, 50_000, 10_000].
      resampling_steps, sample_sizes: per level (or one int for all levels).
      split_first: if set, level 0 is ks[0] // split_first clusters each split into up to
        split_first clusters (the paper's 10M = 100k x 100); ks[0] must be divisible.
      workdir: if set, each finished level is saved there (level_<i>.npz + tree.json,
        which records the arguments and :func:`input_identity` of x) and a rerun resumes
        after the last finished level. A rerun with other arguments or other input (path,
        size, mtime or sampled content) is refused with a ValueError naming what differs.
      mesh: the devices of every k-means (see herd.curation.kmeans); default: chosen per
        k-means by its size with one process, every device of every process with several.
      say: where progress lines go (default: ``print`` when verbose, else nowhere);
        resuming always says "resuming level N from DIR".

    With several jax.distributed processes every process passes the same x and gets the
    same tree; only process 0 says anything and writes ``workdir``, after every process
    has read what it resumes from.

    Returns: a :class:`ClusterTree`.
    """
    x, config = _tree_config(
        x, ks, resampling_steps, sample_sizes, n_iters=n_iters, seed=seed,
        split_first=split_first, sample_strategy=sample_strategy, dtype=dtype,
    )  # fmt: skip
    main = is_main_process()
    if not main:  # every process computes; process 0 alone reports and writes
        say = lambda m: None  # noqa: E731
    elif say is None:
        say = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    if mesh is None:
        import jax

        if jax.process_count() > 1:  # each k-means over every process's devices
            from herd.curation.kmeans import default_mesh

            mesh = default_mesh()
    ks, steps, sizes = config["ks"], config["resampling_steps"], config["sample_sizes"]
    n_levels = len(ks)
    kw = dict(mesh=mesh, dtype=dtype)
    if tile is not None:
        kw["tile"] = tile
    levels: list[ClusterLevel] = []
    runs: list[dict] = []
    saved_complete = False
    meta = dict(config=config)
    if workdir is not None:
        meta["input"] = input_identity(x)
        levels, runs, saved_complete = _resume(workdir, config, meta["input"])
        # Every process has read the saved tree before process 0 writes a level into it.
        sync_processes("herd.curation.hierarchical_kmeans.resumed")
        if levels:
            say(f"resuming level {len(levels)} from {workdir} ({len(levels)} of {n_levels} "
                "levels already done)")  # fmt: skip
    n_resumed = len(levels)
    for i in range(len(levels), n_levels):
        items = x if i == 0 else levels[-1].centroids
        if i > 0 and ks[i] > items.shape[0]:
            raise ValueError(
                f"level {i}: k={ks[i]} is larger than the number of items ({items.shape[0]})"
            )
        t = _seed(seed, 100 + i)
        try:  # level 0: kmeans checks k against the finite rows (x may be a memmap)
            if i == 0 and split_first:
                level, rounds, n_split = _run_split_level(
                    items, ks[0], split_first, steps[0], sizes[0], n_iters=n_iters, seed=t,
                    strategy=sample_strategy, kw=kw,
                )  # fmt: skip
            else:
                level, rounds = _run_level(
                    items, ks[i], steps[i], sizes[i], n_iters=n_iters, seed=t,
                    strategy=sample_strategy, kw=kw,
                )  # fmt: skip
                n_split = 0
        except ValueError as e:
            if str(e).startswith("level "):
                raise
            raise ValueError(f"level {i}: {e}") from e
        levels.append(level)
        runs.append(dict(resampling_rounds=rounds, kmeans_runs=1 + rounds + n_split))
        if verbose:
            say(f"hierarchical_kmeans: level {i} done: k={level.k}, the first k-means + "
                f"{rounds} resampling rounds")  # fmt: skip
        if workdir is not None and main:
            partial = ClusterTree(levels, x.shape[0], dict(meta, level_runs=runs, complete=False))
            partial.save(workdir, levels=[i])
    tree = ClusterTree(levels, x.shape[0], dict(meta, level_runs=runs, complete=True))
    if workdir is not None and main and not (n_resumed == n_levels and saved_complete):
        tree.save(workdir, levels=[])
    return tree


def check_resume(workdir: str, x, ks, resampling_steps=1, sample_sizes=1, **kw) -> int:
    """Number of finished levels a :func:`hierarchical_kmeans` call with these arguments
    would resume from ``workdir`` (0 if none); raises its ValueError if it would refuse.
    Reads only tree.json, so a caller can check before it writes anything."""
    keys = ("n_iters", "seed", "split_first", "sample_strategy", "dtype")
    defaults = dict(n_iters=50, seed=0, split_first=None, sample_strategy="closest",
                    dtype=np.float32)  # fmt: skip
    args = {k: kw.get(k, defaults[k]) for k in keys}
    x, config = _tree_config(x, ks, resampling_steps, sample_sizes, **args)
    info = _saved_info(workdir, config, input_identity(x))
    return 0 if info is None else int(info["n_levels"])


_IDENTITY_NAMES = dict(path="path", size="size", mtime_ns="modification time", content="content")


def _saved_info(workdir: str, config: dict, identity: dict) -> dict | None:
    """tree.json of workdir, or None if there is none; raises ValueError (one sentence: what
    differs and how to proceed) if it was made with other arguments or from other input."""
    path = os.path.join(workdir, "tree.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        info = json.load(f)
    meta = info.get("meta", {})
    how = f"use a new workdir, or delete {workdir} to recompute the tree"
    saved = meta.get("config") or {}
    now = json.loads(json.dumps(config))
    if saved != now:
        diff = "; ".join(
            f"{k} {saved.get(k)} there, {now.get(k)} now"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        )
        raise ValueError(
            f"workdir {workdir} holds a cluster tree made with other arguments ({diff}); {how}"
        )
    saved_id = meta.get("input")
    if saved_id is None:
        raise ValueError(
            f"workdir {workdir} holds a cluster tree that records no identity of its input "
            f"(written by an older herd), so it cannot be checked against this input; {how}"
        )
    diff = [k for k in _IDENTITY_NAMES if saved_id.get(k) != identity.get(k)]
    if diff:
        parts = [
            f"the {_IDENTITY_NAMES[k]} differs ("
            + (
                f"a hash of {IDENTITY_SAMPLE_ROWS} sampled rows"
                if k == "content"
                else f"{saved_id.get(k)} there, {identity.get(k)} now"
            )
            + ")"
            for k in diff
        ]
        raise ValueError(
            f"workdir {workdir} holds a cluster tree of other input: {'; '.join(parts)}; {how}"
        )
    return info


def _resume(workdir: str, config: dict, identity: dict):
    """(finished levels, their level_runs, whether the saved tree is complete)."""
    info = _saved_info(workdir, config, identity)
    if info is None:
        return [], [], False
    tree = ClusterTree.load(workdir)
    runs = tree.meta.get("level_runs") or []
    return tree.levels, list(runs)[: tree.n_levels], bool(tree.meta.get("complete"))
