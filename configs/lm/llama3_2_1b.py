"""Llama 3.2 1B: tied embeddings; pruned and distilled from Llama 3.1 8B on up to 9T
tokens; the pre-training hyperparameters are unpublished (lr 3e-4 assumed: verify).

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.2-1b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=8192,
        train_tokens=9e12,
    )
