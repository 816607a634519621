"""Code Llama 13B, code training (Roziere et al. 2023, sec. 2 and 2.6): Llama 2 13B trained
on 500B tokens of code, with infilling. As code_llama_7b_pretrain.py (its notes apply):

- Starts from Llama 2 13B: set --config.train.init_from to a herd workdir holding it
  (`python -m herd.lm.convert --from_hf=<Llama-2-13b-hf dir> --to=<workdir>`); the
  vocabulary grows from 32000 to 32016 tokens (new rows freshly initialised); set
  --config.data.tokenizer to Code Llama's tokenizer.model.
- Sec. 2.6: peak lr 3e-4 ("we carry these findings to the 13B and 34B models, and set
  their learning rates to 3e-4 and 1.5e-4"), 1000 warm-up steps, cosine to 1/30 of the
  peak, batch 4M tokens of 4096-token sequences; 500B tokens = 119,210 steps.
- Infilling (sec. 2.3): fim_rate 0.9, half SPM. RoPE theta 1e4 and 4096-token sequences
  until the long-context stage (code_llama_13b_longctx.py).
- Not stated by the paper, Llama 2's values kept (verify): weight decay 0.1, AdamW eps
  1e-5, gradient clipping 1.0.
- Sources: RECIPES.md gives the Llama 2 init, the FIM rates and sentinels and the 34B's
  missing infilling; the 500B tokens are in Meta's model card; the sec. 2.6 optimisation
  figures are as recalled from the paper, which could not be read here (verify).

For pods: also set --config.data.source and --config.data.eval_source.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    c = pod_config(
        "code-llama-13b",
        lr=3e-4,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=5e11,
        min_lr_ratio=1 / 30,
        init_from="<a herd workdir with Llama 2 13B>",
    )
    c.model.rope_theta = 1e4  # Llama 2's, until the long-context stage
    c.model.max_seq_len = 4096
    c.data.fim_rate = 0.9
    c.data.fim_spm_rate = 0.5
    return c
