"""Llama 3.1 405B (sec. 3.4.1): peak lr 8e-5, 8000 linear warmup steps, cosine to 8e-7 (1%
of peak) over 1.2M steps; batch ramps 4M tokens (seq 4096) -> 8M (seq 8192) -> 16M
tokens: this config is the 16M stage; 15.6T tokens in all.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.1-405b",
        lr=8e-05,
        warmup_steps=8000,
        batch_tokens=16 * 2**20,
        seq_len=8192,
        train_tokens=1.56e13,
        min_lr_ratio=0.01,
        mesh={"data": -1, "fsdp": 64, "tensor": 8},
    )
