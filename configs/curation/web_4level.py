"""The paper's web-image setting (Vo et al. 2024, Sec. 5.2 and App. A): 4 levels.

743M DINOv2 ViT-L/14 embeddings (1024-d) -> level 0: 100k clusters each split into 100
(= 10M clusters), then 500k, 50k and 10k; resampling steps [1, 10, 10, 10] with [1, 10,
5, 3] points per cluster (about half the mean cluster size); 50 Lloyd iterations;
float64, as the official runs; random picks in the leaves ("r"). The subset size is
yours to choose: --config.sampling.target_size (default here 100M, a round figure, not
the paper's). For pods: point --config.input.embeddings at the .npy memmap. The official
implementation took about 1,300 A100-hours on the 743M points.
"""

from configs.curation.common import curate_config


def get_config(arg=None):
    del arg
    c = curate_config()
    c.hierarchy.ks = (10_000_000, 500_000, 50_000, 10_000)
    c.hierarchy.split_first = 100  # level 0: 100k clusters, each split into 100
    c.hierarchy.resampling_steps = (1, 10, 10, 10)
    c.hierarchy.sample_sizes = (1, 10, 5, 3)
    c.hierarchy.n_iters = 50
    c.hierarchy.sample_strategy = "closest"
    c.hierarchy.dtype = "float64"
    c.sampling.target_size = 100_000_000
    c.sampling.strategy = "random"
    return c
