"""LLaMA 1 7B (Touvron et al. 2023a, Table 2 / sec. 2.2): 1.0T tokens, lr 3e-4, batch 4M
tokens, seq 2048.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama1-7b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=2048,
        train_tokens=1e12,
    )
