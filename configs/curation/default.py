"""The embedded default (no arguments): the paper's 2-D experiment and a long-tailed mixture.

1. 2-D balance test (Vo et al. 2024, Sec. 5.1): 7000 points N([-1,-1], 0.5^2), 1000
   N([1,-1], 0.5^2), 500 N([0,1], 0.5^2), 500 uniform on [-3,3]^2; hierarchical k-means
   with ks [3000, 1000, 300], 2 points per cluster, 10 resampling steps, closest; KL of a
   KDE (bandwidth 0.5) of the 300 final centroids to the uniform density. Expected: flat
   k-means ~0.35, hierarchical ~0.05, bound (300 uniform points) ~0.04-0.05.
2. Curation of 20k points from 100 Gaussian concepts with Zipf(1.2) sizes to 10%: concept
   entropy ~4.6 nats (max log 100 = 4.61) against ~3.1 for a random 10%.
About 3-5 minutes on 2 CPU cores.
"""

from configs.curation.common import curate_config


def get_config(arg=None):
    del arg
    c = curate_config()
    c.mode = "demo"
    c.demo = dict(ks=(3000, 1000, 300), sample_sizes=(2, 2, 2), resampling_steps=10, n_iters=50)
    lt = curate_config()
    lt.input.synthetic = "long_tail"
    lt.hierarchy.ks = (500, 100)
    lt.hierarchy.resampling_steps = (3, 3)
    lt.hierarchy.sample_sizes = (4, 2)
    lt.hierarchy.n_iters = 20
    lt.sampling.target_fraction = 0.1
    c.long_tail = lt
    return c
