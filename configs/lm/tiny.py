"""The test config: a very small model and a few steps (seconds on CPU).

Used by tests/lm/test_train.py; `python -m herd.lm.train --config=configs/lm/tiny.py`.
"""

from configs.lm.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.dim = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.ffn_dim = 128
    c.model.vocab_size = 512
    c.model.rope_theta = 5e5
    c.model.max_seq_len = 256
    c.model.dtype = "float32"
    c.model.scan_layers = True
    c.data.seq_len = 64
    c.data.global_batch_size = 8
    c.data.tokenizer_train_files = 40
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.train.steps = 8
    c.train.eval_every = 4
    c.train.eval_batches = 2
    c.train.checkpoint_every = 4
    c.train.log_every = 2
    c.train.progress = False
    c.train.tensorboard = False
    c.train.sample_prompt = "import os\n"
    c.train.sample_tokens = 8
    return c
