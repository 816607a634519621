"""Code Llama 7B (Roziere et al. 2023, sec. 2.6), code training from Llama 2: 500B tokens,
lr 3e-4, 1000 warmup steps, cosine to 1/30 of the peak, batch 4M tokens of 4096-token
sequences (verify the token count); the 16k long-context stage is
--config.data.seq_len=16384 with its own lr.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "code-llama-7b",
        lr=0.0003,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=5e11,
        min_lr_ratio=1 / 30,
    )
