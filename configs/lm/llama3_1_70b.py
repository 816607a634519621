"""Llama 3.1 70B: as Llama 3 70B with the 128k long-context stage.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.1-70b",
        lr=0.00015,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=8192,
        train_tokens=1.5e13,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
    )
