"""Curate code: embed the Python standard library with a herd Llama, then cluster + sample.

The documents are the interpreter's own *.py files (herd's embedded default corpus), one
document per file, truncated to 256 tokens; the embedding of a file is the mean of the
model's final hidden states over its tokens. Train a model first, then point this config
at its workdir: the model config and the tokenizer are the ones the run kept there.

    python -m herd.lm.train --config=configs/lm/default.py --workdir=workdir/lm
    python -m herd.curation.curate --config=configs/curation/stdlib_code.py

Writes the selected file indices (documents.txt lists the files in row order), the tree,
the summary and the plots into --workdir. A minute or two on 2 CPU cores after training.
"""

from configs.curation.common import curate_config


def get_config(arg=None):
    del arg
    c = curate_config()
    c.embed.documents = "stdlib"
    c.embed.checkpoint = "workdir/lm"
    c.embed.seq_len = 256
    c.embed.batch_size = 16
    c.hierarchy.ks = (200, 50, 10)
    c.hierarchy.resampling_steps = (1, 5, 5)
    c.hierarchy.sample_sizes = (1, 3, 2)
    c.hierarchy.n_iters = 30
    c.sampling.target_fraction = 0.2
    return c
