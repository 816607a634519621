"""Llama 3.2 3B: tied embeddings; as 1B (hyperparameters unpublished: verify).

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.2-3b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=8192,
        train_tokens=9e12,
    )
