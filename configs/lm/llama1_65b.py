"""LLaMA 1 65B (Table 2): 1.4T tokens, lr 1.5e-4, batch 4M tokens, seq 2048.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama1-65b",
        lr=0.00015,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=2048,
        train_tokens=1.4e12,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
    )
