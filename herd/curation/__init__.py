"""Clustering-based data curation (Vo et al. 2024): k-means, hierarchical k-means with
resampling, and balanced sampling."""

from herd.curation.hierarchical import ClusterLevel, ClusterTree, hierarchical_kmeans

__all__ = [
    "ClusterLevel",
    "ClusterTree",
    "assign",
    "balanced_sample",
    "hierarchical_kmeans",
    "kmeans",
    "kmeans_plusplus",
]


def __getattr__(name):
    # Lazy: kmeans pulls in jax; balanced_sample lives in sampling.py (CURATE helper).
    if name in ("kmeans", "kmeans_plusplus", "assign"):
        from herd.curation import kmeans as _km

        return getattr(_km, name)
    if name == "balanced_sample":
        from herd.curation.sampling import balanced_sample

        return balanced_sample
    raise AttributeError(f"module 'herd.curation' has no attribute {name!r}")
