"""Llama 3.1 8B (Llama Team 2024): as Llama 3 8B, then long-context pre-training up to 128k
tokens (RoPE scaling factor 8 in the preset; --config.data.seq_len for that stage).

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.1-8b",
        lr=0.0003,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=8192,
        train_tokens=1.5e13,
    )
