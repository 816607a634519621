"""Llama 3.1 405B (sec. 3.4.1): peak lr 8e-5, 8000 linear warmup steps, cosine to 8e-7 (1%
of peak) over 1.2M steps; 15.6T tokens in all. The batch ramps: 4M-token batches of
4,096-token sequences for the first 252M tokens, then 8M tokens of 8,192-token sequences,
then 16M tokens after 2.87T. Through this ramp 15.6T tokens take 1,100,929 steps, so the
run stops there (train.stop_after) with the cosine at about its 92% point; the paper's
final anneal (sec. 3.4.3: lr linearly to 0 over the last 40M tokens) is not part of it.

For pods: set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    return pod_config(
        "llama3.1-405b",
        lr=8e-05,
        warmup_steps=8000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        batch_ramp="252e6:1024x8192,2.87e12:2048x8192",
        train_tokens=1.56e13,
        schedule_steps=1_200_000,
        min_lr_ratio=0.01,
        mesh={"data": -1, "fsdp": 64, "tensor": 8},
    )
