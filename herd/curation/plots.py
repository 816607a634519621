"""PNG plots of a curation run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "plot_cluster_sizes",
    "plot_label_histograms",
    "plot_2d_experiment",
    "plot_entropy_experiment",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_cluster_sizes(tree, path: str) -> str:
    """One panel per level: histogram (log-log) of cluster sizes in data points, and in
    items of the level below, with the sizes sorted by rank as an inset line."""
    from herd.curation.sampling import points_per_cluster

    plt = _pyplot()
    pts = points_per_cluster(tree)
    n = len(tree.levels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        items = tree.levels[i].sizes()
        for sizes, label in ((pts[i], "points"), (items, "items" if i else None)):
            if label is None:
                continue
            s = np.sort(sizes)[::-1]
            ax.plot(np.arange(1, s.size + 1), np.maximum(s, 0.8), label=f"size in {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cluster rank")
        ax.set_ylabel("cluster size")
        ax.set_title(
            f"level {i}: k={tree.levels[i].k}\n"
            f"points/cluster: median {np.median(pts[i]):.0f}, max {pts[i].max()}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
    fig.suptitle("cluster sizes per level (sorted)", y=1.06)
    return _save(fig, path)


def plot_label_histograms(labels, selected, path: str, top: int = 60) -> str:
    """Label frequencies before (the pool) and after (the selected subset) curation.

    Labels are ordered by their frequency in the pool; at most ``top`` are drawn (the rest
    are summed into an "other" bar)."""
    plt = _pyplot()
    labels = np.asarray(labels)
    valid = labels >= 0
    k = int(labels[valid].max()) + 1 if valid.any() else 1
    before = np.bincount(labels[valid], minlength=k).astype(np.float64)
    sel = labels[np.asarray(selected)]
    after = np.bincount(sel[sel >= 0], minlength=k).astype(np.float64)
    order = np.argsort(-before, kind="stable")
    b, a = before[order], after[order]
    if k > top:
        b = np.append(b[:top], b[top:].sum())
        a = np.append(a[:top], a[top:].sum())
    b /= max(b.sum(), 1)
    a /= max(a.sum(), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(b) + 3), 3.6))
    xs = np.arange(len(b))
    ax.bar(xs - 0.2, b, width=0.4, label=f"pool ({int(before.sum())})")
    ax.bar(xs + 0.2, a, width=0.4, label=f"curated ({int(after.sum())})")
    ax.set_xlabel("label (sorted by pool frequency)" + (", last bar: other" if k > top else ""))
    ax.set_ylabel("fraction")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("label distribution before and after curation")
    return _save(fig, path)


def plot_2d_experiment(result: dict, path: str) -> str:
    """Data, flat k-means centroids and hierarchical centroids, with KDEs and KL figures."""
    from herd.curation.experiments import kde_on_grid

    plt = _pyplot()
    x = result["x"]
    sets = [
        ("data", x, None),
        ("flat k-means", result["flat_centroids"], result["kl_flat"]),
        ("hierarchical + resampling", result["hierarchical_centroids"], result["kl_hierarchical"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 9), gridspec_kw=dict(hspace=0.35))
    # One colour scale for the three densities, so that flat looks flat.
    dens_all = [kde_on_grid(pts)[1] for _, pts, _ in sets]
    vmax = max(d.max() for d in dens_all)
    for j, (name, pts, kl) in enumerate(sets):
        ax = axes[0, j]
        ax.scatter(pts[:, 0], pts[:, 1], s=1 if j == 0 else 4, alpha=0.3 if j == 0 else 0.9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_title(name + (f" ({len(pts)} centroids)" if j else f" ({len(pts)} points)"))
        ax = axes[1, j]
        ax.imshow(
            dens_all[j].T, origin="lower", extent=(-3, 3, -3, 3), cmap="viridis", vmin=0, vmax=vmax
        )
        ax.set_title(
            "KDE (bandwidth 0.5)"
            + (f"\nKL to uniform {kl:.3f} (bound {result['kl_bound']:.3f})" if kl else "")
        )
    fig.suptitle("Vo et al. 2024, 2-D experiment")
    return _save(fig, path)


def plot_entropy_experiment(result: dict, path: str) -> str:
    """Concept histograms of the pool, a random subset and the curated subset."""
    plt = _pyplot()
    labels = result["labels"]
    k = int(labels.max()) + 1
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name, idx, key in (
        ("pool", None, "entropy_pool"),
        ("random 10%", result["random"], "entropy_random"),
        ("curated 10%", result["curated"], "entropy_curated"),
    ):
        sel = labels if idx is None else labels[idx]
        h = np.bincount(sel, minlength=k) / len(sel)
        ax.plot(np.arange(k), h, drawstyle="steps-mid", label=f"{name}: entropy {result[key]:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("concept (Zipf rank)")
    ax.set_ylabel("fraction")
    ax.set_title(f"long-tailed mixture (max entropy {result['entropy_max']:.2f} nats)")
    ax.legend()
    return _save(fig, path)
