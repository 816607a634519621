"""The one builder behind every configs/curation/*.py file.

`curate_config()` lists every field a curation run (`mode='curate'`) reads, so any of them
can be overridden with --config.key=value (e.g. --config.input.embeddings=/data/emb.npy).
"""

from __future__ import annotations

import ml_collections


def curate_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "curate"  # 'curate' (cluster + sample embeddings) or 'demo'
    c.seed = 0
    c.plots = True

    # Where the embeddings come from: an .npy file (read as a memmap), a synthetic
    # long-tailed mixture, or computed from documents with a herd Llama (embed.*).
    c.input = ml_collections.ConfigDict()
    c.input.embeddings = ""
    c.input.labels = ""  # optional .npy of int labels per row (-1 = none): before/after plots
    c.input.synthetic = ""  # '' or 'long_tail'
    c.input.synthetic_kw = ml_collections.ConfigDict(
        dict(n_concepts=100, n_points=20_000, dim=16, zipf_exponent=1.2, spread=0.15)
    )

    c.embed = ml_collections.ConfigDict()
    c.embed.documents = ""  # 'stdlib', a glob, or '' (no embedding step)
    c.embed.checkpoint = ""  # a herd LM workdir (orbax checkpoints of herd.lm.train)
    c.embed.step = -1  # -1: the latest checkpoint
    c.embed.model_config = ""  # '' = the config stored with the checkpoint; else an LM config file
    c.embed.tokenizer = ""  # '' = the tokenizer the run kept in its workdir; else a file
    c.embed.seq_len = 512
    c.embed.batch_size = 8

    # Hierarchical k-means with resampling (Vo et al. 2024, Sec. 4).
    c.hierarchy = ml_collections.ConfigDict()
    # Tuples (not lists) so that --config.hierarchy.ks='(40, 10)' can replace them.
    c.hierarchy.ks = (1000, 300, 100)
    c.hierarchy.resampling_steps = (1, 5, 5)  # per level; includes the first k-means run
    c.hierarchy.sample_sizes = (5, 3, 2)  # points per cluster kept when resampling
    c.hierarchy.n_iters = 50  # Lloyd iterations per k-means run
    c.hierarchy.split_first = 0  # > 0: level 0 = ks[0] // split_first clusters, each split
    c.hierarchy.sample_strategy = "closest"  # resampling picks: 'closest' or 'random'
    c.hierarchy.dtype = "float32"  # or 'float64' (the paper's runs)

    # Balanced sampling (Sec. 4.2).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.target_size = 0  # > 0: exact size; else target_fraction of the usable points
    c.sampling.target_fraction = 0.1
    c.sampling.strategy = "random"  # leaf picks: 'random' ("r") or 'closest' ("c")
    c.sampling.seed = 0
    return c
