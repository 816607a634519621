"""Llama 3 8B: 15T tokens, seq 8192, batch 4M tokens; lr 3e-4 and warmup 2000 follow the
Llama 2 recipe (verify: the paper details only 405B).

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3-8b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=8192,
        train_tokens=1.5e13,
    )
