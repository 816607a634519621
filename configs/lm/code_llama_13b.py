"""Code Llama 13B (sec. 2.6): as 7B: 500B tokens, lr 3e-4, 1000 warmup steps, final lr 1/30
of peak.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "code-llama-13b",
        lr=0.0003,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=5e11,
        min_lr_ratio=1 / 30,
    )
