"""Clustering-based data curation (Vo et al. 2024): k-means, hierarchical k-means with
resampling, and balanced sampling.

Note: ``herd.curation.kmeans`` is the *function* (it shadows the submodule of the same
name); reach the module's other names with ``from herd.curation.kmeans import ...`` or
``importlib.import_module("herd.curation.kmeans")``.
"""

from herd.curation.hierarchical import ClusterLevel, ClusterTree, hierarchical_kmeans
from herd.curation.kmeans import assign, kmeans, kmeans_plusplus

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
    # Lazy: balanced_sample lives in sampling.py (written by the CURATE helper).
    if name == "balanced_sample":
        from herd.curation.sampling import balanced_sample

        return balanced_sample
    raise AttributeError(f"module 'herd.curation' has no attribute {name!r}")
