"""Code Llama 70B: 1T tokens of code (verify lr: the 34B value is used).

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "code-llama-70b",
        lr=0.00015,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=1e12,
        min_lr_ratio=1 / 30,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
    )
