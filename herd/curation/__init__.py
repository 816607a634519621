"""Clustering-based data curation (Vo et al. 2024): k-means, hierarchical k-means with
resampling, and balanced sampling.

Note: ``herd.curation.kmeans`` is the *function* (it shadows the submodule of the same
name); reach the module's other names with ``from herd.curation.kmeans import ...`` or
``importlib.import_module("herd.curation.kmeans")``.
"""

from herd.curation.hierarchical import ClusterLevel, ClusterTree, hierarchical_kmeans
from herd.curation.kmeans import assign, kmeans, kmeans_plusplus
from herd.curation.sampling import balanced_sample

__all__ = [
    "ClusterLevel",
    "ClusterTree",
    "assign",
    "balanced_sample",
    "hierarchical_kmeans",
    "kmeans",
    "kmeans_plusplus",
]
