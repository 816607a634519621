"""Llama 2 70B (Table 1): 2.0T tokens, lr 1.5e-4, batch 4M tokens, seq 4096, GQA 8 kv
heads.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama2-70b",
        lr=0.00015,
        warmup_steps=2000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=2e12,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
    )
