"""Code Llama 13B, long-context fine-tuning (LCFT; Roziere et al. 2023, sec. 2.4 and 2.6):
the code-trained model (code_llama_13b_pretrain.py) continues on 16,384-token sequences
with RoPE theta raised from 1e4 to 1e6.

- Starts from the code-training run: set --config.train.init_from to its workdir. Params
  only, fresh AdamW, step 0; its model and tokenizer carry over (herd.lm.train); only
  rope_theta (1e4 -> 1e6) and max_seq_len (4096 -> 16384) change.
- Sec. 2.6 "Long context fine-tuning": lr 2e-5, sequence length 16,384, RoPE base 1e6, batch
  2M tokens for 7B and 13B (128 sequences), 10,000 gradient steps (the default). That is
  21.0B tokens.
- Not stated by the paper (assumptions, verify): the LCFT schedule (herd: 100 linear warm-up
  steps, then cosine to 1/30 of the peak as in code training); whether LCFT keeps the
  infilling transform (herd keeps fim_rate 0.9 for 13B, whose released model infills at
  16k); weight decay 0.1, AdamW eps 1e-5, gradient clipping 1.0 (Llama 2's).
- Sources: RECIPES.md lists none of the LCFT figures, and the paper itself could not be
  read here; the sec. 2.6 figures above are as recalled from it, with only the ~20B LCFT
  tokens of its Fig. 2 (10,000 steps x 2M) confirmed by a third-party summary. Verify.

For pods: also set --config.data.source and --config.data.eval_source (long documents:
repository-level code, as the paper's LCFT data).
"""

from configs.lm.common import pod_config

STEPS = 10000


def get_config(arg=None):
    del arg
    c = pod_config(
        "code-llama-13b",
        lr=2e-5,
        warmup_steps=100,
        batch_tokens=2 * 2**20,
        seq_len=16384,
        train_tokens=STEPS * 2 * 2**20,
        min_lr_ratio=1 / 30,
        init_from="<the workdir of code_llama_13b_pretrain.py>",
    )
    c.model.rope_theta = 1e6  # 1e4 in code training (sec. 2.4)
    c.model.max_seq_len = 16384
    c.data.fim_rate = 0.9
    c.data.fim_spm_rate = 0.5
    return c
