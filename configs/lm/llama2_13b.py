"""Llama 2 13B (Table 1): 2.0T tokens, lr 3e-4, batch 4M tokens, seq 4096.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama2-13b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=2e12,
    )
