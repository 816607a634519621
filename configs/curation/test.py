"""A tiny curation for tests: two levels, a few Lloyd iterations, 50 points selected.

Set --config.input.embeddings (or input.synthetic='long_tail' with a small n_points).
Seconds on one CPU core.
"""

from configs.curation.common import curate_config


def get_config(arg=None):
    del arg
    c = curate_config()
    c.input.synthetic_kw.n_points = 2000
    c.input.synthetic_kw.n_concepts = 20
    c.input.synthetic_kw.dim = 8
    c.hierarchy.ks = (40, 10)
    c.hierarchy.resampling_steps = (1, 3)
    c.hierarchy.sample_sizes = (1, 2)
    c.hierarchy.n_iters = 5
    c.sampling.target_size = 50
    return c
