"""The two small experiments that show what curation does (Vo et al. 2024).

1. The paper's 2-D balance experiment (Sec. 5.1 / Fig. 3): a mixture dominated by one
   Gaussian; fit a KDE (bandwidth 0.5) to the 300 final centroids of a clustering and
   measure KL(KDE || uniform on [-3, 3]^2) on a 0.02 grid (the KDE renormalised on the
   grid, as the official visualisation code does). Flat k-means puts its centroids where
   the data is dense (reference run: KL 0.35); 3-level hierarchical k-means with
   resampling spreads them almost uniformly (0.054), close to the bound given by 300
   uniform points (0.047).
2. A long-tailed mixture of 100 Gaussian "concepts" with Zipf sizes: a curated 10% subset
   (hierarchical k-means + balanced sampling) covers the concepts far more evenly than a
   random 10% subset, measured by the entropy of its concept histogram.
"""

from __future__ import annotations

import numpy as np

from herd.curation.hierarchical import hierarchical_kmeans
from herd.curation.kmeans import kmeans
from herd.curation.sampling import balanced_sample

__all__ = [
    "make_2d_mixture",
    "kde_kl_to_uniform",
    "uniform_bound",
    "run_2d_experiment",
    "make_long_tailed_mixture",
    "concept_entropy",
    "run_long_tail_experiment",
]

# The paper's 2-D mixture: (n, mean) of three Gaussians with std 0.5, plus 500 uniform.
MIXTURE_2D = (
    (7000, (-1.0, -1.0)),
    (1000, (1.0, -1.0)),
    (500, (0.0, 1.0)),
)
N_UNIFORM_2D = 500
HALF_WIDTH = 3.0


def make_2d_mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x [9000, 2] float32, component label [9000] int32: 0-2 Gaussians, 3 uniform)."""
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    for j, (n, mean) in enumerate(MIXTURE_2D):
        parts.append(rng.normal(mean, 0.5, size=(n, 2)))
        labels.append(np.full(n, j))
    parts.append(rng.uniform(-HALF_WIDTH, HALF_WIDTH, size=(N_UNIFORM_2D, 2)))
    labels.append(np.full(N_UNIFORM_2D, len(MIXTURE_2D)))
    return np.concatenate(parts).astype(np.float32), np.concatenate(labels).astype(np.int32)


def kde_on_grid(points, bandwidth: float = 0.5, half_width: float = HALF_WIDTH, step=0.02):
    """Gaussian KDE of 2-D points on the grid ``arange(-L, L, step)^2``, renormalised to a
    density on the grid. Returns (grid [G], density [G, G] indexed [x, y])."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be [n, 2], got shape {pts.shape}")
    grid = np.arange(-half_width, half_width, step)
    # The Gaussian kernel factorises over the axes: density = Ex @ Ey^T.
    ex = np.exp(-((grid[:, None] - pts[None, :, 0]) ** 2) / (2 * bandwidth**2))
    ey = np.exp(-((grid[:, None] - pts[None, :, 1]) ** 2) / (2 * bandwidth**2))
    dens = ex @ ey.T
    dens /= dens.sum() * step * step
    return grid, dens


def kde_kl_to_uniform(
    points, bandwidth: float = 0.5, half_width: float = HALF_WIDTH, step: float = 0.02
) -> float:
    """KL(KDE || uniform on [-L, L]^2) in nats, the KDE renormalised on the grid."""
    _, dens = kde_on_grid(points, bandwidth, half_width, step)
    u = 1.0 / (2 * half_width) ** 2
    d = dens[dens > 0]
    return float(np.sum(d * np.log(d / u)) * step * step)


def uniform_bound(n: int = 300, draws: int = 10, seed: int = 0, **kde_kw) -> float:
    """Mean KL of the KDE of ``n`` uniform points over ``draws`` draws (the paper's bound)."""
    rng = np.random.default_rng([seed, 7])
    return float(
        np.mean(
            [
                kde_kl_to_uniform(rng.uniform(-HALF_WIDTH, HALF_WIDTH, size=(n, 2)), **kde_kw)
                for _ in range(draws)
            ]
        )
    )


def run_2d_experiment(
    seed: int = 0,
    ks=(3000, 1000, 300),
    sample_sizes=(2, 2, 2),
    resampling_steps: int = 10,
    n_iters: int = 50,
    sample_strategy: str = "closest",
    mesh=None,
    verbose: bool = False,
) -> dict:
    """Flat k-means (k = ks[-1]) vs hierarchical k-means with resampling, on the 2-D mixture.

    Returns a dict with the data, both sets of final centroids, the tree and the three KL
    figures ('kl_flat', 'kl_hierarchical', 'kl_bound').
    """

    x, labels = make_2d_mixture(seed)
    flat, _ = kmeans(x, ks[-1], n_iters, seed=seed, mesh=mesh)[:2]
    tree = hierarchical_kmeans(
        x,
        list(ks),
        resampling_steps=resampling_steps,
        sample_sizes=list(sample_sizes),
        n_iters=n_iters,
        seed=seed,
        sample_strategy=sample_strategy,
        mesh=mesh,
        verbose=verbose,
    )
    hier = tree.levels[-1].centroids
    return dict(
        x=x,
        labels=labels,
        tree=tree,
        flat_centroids=np.asarray(flat),
        hierarchical_centroids=np.asarray(hier),
        kl_flat=kde_kl_to_uniform(flat),
        kl_hierarchical=kde_kl_to_uniform(hier),
        kl_bound=uniform_bound(len(hier), seed=seed),
    )


def make_long_tailed_mixture(
    n_concepts: int = 100,
    n_points: int = 20_000,
    dim: int = 16,
    zipf_exponent: float = 1.2,
    spread: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian concepts with Zipf sizes (concept i has ~ n / i^a / H points, at least 1).

    Concept means are random unit-scale Gaussians in ``dim`` dimensions; each concept's
    points have isotropic std ``spread``. Returns (x [n, dim] float32, concept [n] int32).
    """
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_concepts + 1) ** zipf_exponent
    sizes = np.maximum(1, np.floor(w / w.sum() * n_points)).astype(np.int64)
    sizes[0] += n_points - sizes.sum()
    means = rng.normal(size=(n_concepts, dim))
    concept = np.repeat(np.arange(n_concepts), sizes)
    x = means[concept] + spread * rng.normal(size=(n_points, dim))
    perm = rng.permutation(n_points)
    return x[perm].astype(np.float32), concept[perm].astype(np.int32)


def concept_entropy(labels, n_concepts: int | None = None) -> float:
    """Entropy (nats) of the label histogram; log(n_concepts) when perfectly balanced."""
    counts = np.bincount(np.asarray(labels), minlength=n_concepts or 0).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_long_tail_experiment(
    seed: int = 0,
    fraction: float = 0.1,
    ks=(1000, 300, 100),
    sample_sizes=(5, 3, 2),
    resampling_steps: int = 5,
    n_iters: int = 20,
    mesh=None,
    **mixture_kw,
) -> dict:
    """Entropy of the concept histogram: full pool, random subset, curated subset."""
    x, concept = make_long_tailed_mixture(seed=seed, **mixture_kw)
    n_concepts = int(concept.max()) + 1
    target = int(round(fraction * x.shape[0]))
    tree = hierarchical_kmeans(
        x,
        list(ks),
        resampling_steps=resampling_steps,
        sample_sizes=list(sample_sizes),
        n_iters=n_iters,
        seed=seed,
        mesh=mesh,
    )
    curated = balanced_sample(tree, target, strategy="random", seed=seed)
    random = np.sort(np.random.default_rng([seed, 11]).choice(x.shape[0], target, replace=False))
    return dict(
        x=x,
        labels=concept,
        tree=tree,
        curated=curated,
        random=random,
        entropy_max=float(np.log(n_concepts)),
        entropy_pool=concept_entropy(concept, n_concepts),
        entropy_random=concept_entropy(concept[random], n_concepts),
        entropy_curated=concept_entropy(concept[curated], n_concepts),
        concepts_covered_random=int(np.unique(concept[random]).size),
        concepts_covered_curated=int(np.unique(concept[curated]).size),
    )
