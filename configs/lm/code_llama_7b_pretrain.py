"""Code Llama 7B, code training (Roziere et al. 2023, "Code Llama: Open Foundation Models
for Code", sec. 2 and 2.6): Llama 2 7B trained on 500B tokens of code, with infilling.

- Starts from Llama 2 7B (sec. 2: "initialised from Llama 2"): set
  --config.train.init_from to a herd workdir holding it (`python -m herd.lm.convert
  --from_hf=<Llama-2-7b-hf dir> --to=<workdir>` makes one). Params only; fresh AdamW.
- Vocabulary: the code-llama-7b preset has 32016 tokens, Llama 2 32000: the 16 new rows
  (the infilling sentinels <PRE> <SUF> <MID> <EOT> at 32007-32010 among them, RECIPES.md)
  start as a fresh init (herd.lm.train.grow_vocab; how Meta initialised them is not
  stated). Set --config.data.tokenizer to Code Llama's tokenizer.model.
- Sec. 2.6 "Optimization": AdamW b1 0.9 / b2 0.95, cosine schedule with 1000 warm-up
  steps, final lr 1/30 of the peak, batch 4M tokens as sequences of 4096 tokens, peak lr
  3e-4 (Llama 2 7B's, retained). 500B tokens (sec. 2.2, Fig. 2) = 119,210 steps.
- Infilling (sec. 2.3): 90% of documents FIM-transformed, half of them SPM (RECIPES.md).
- RoPE theta stays Llama 2's 1e4 and sequences 4096 tokens in this stage; the long-context
  fine-tuning (sec. 2.4, code_llama_7b_longctx.py) raises them to 1e6 and 16384.
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
        "code-llama-7b",
        lr=3e-4,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=5e11,
        min_lr_ratio=1 / 30,
        init_from="<a herd workdir with Llama 2 7B>",
    )
    c.model.rope_theta = 1e4  # Llama 2's, until the long-context stage
    c.model.max_seq_len = 4096
    c.data.fim_rate = 0.9
    c.data.fim_spm_rate = 0.5
    return c
