"""Code Llama 34B, code training (Roziere et al. 2023, sec. 2 and 2.6): a 34B Llama 2 trained
on 500B tokens of code, without infilling.

- Starts from a Llama 2 34B (GQA, 8 KV heads; the preset's shape). Meta never released
  that model, so --config.train.init_from must name a herd workdir holding such weights
  from elsewhere. Vocabulary 32000 (no infilling tokens; RECIPES.md).
- Sec. 2.6: peak lr 1.5e-4, 1000 warm-up steps, cosine to 1/30 of the peak, batch 4M
  tokens of 4096-token sequences; 500B tokens = 119,210 steps.
- No infilling for 34B (sec. 2.3: "7B and 13B"): fim_rate 0.
- RoPE theta 1e4 and 4096-token sequences until the long-context stage
  (code_llama_34b_longctx.py).
- Not stated by the paper, Llama 2's values kept (verify): weight decay 0.1, AdamW eps
  1e-5, gradient clipping 1.0.
- Sources: RECIPES.md gives the Llama 2 init, the FIM rates and sentinels and the 34B's
  missing infilling; the 500B tokens are in Meta's model card; the sec. 2.6 optimisation
  figures are as recalled from the paper, which could not be read here (verify).

For pods: also set --config.data.source, --config.data.eval_source and --config.data.tokenizer.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    c = pod_config(
        "code-llama-34b",
        lr=1.5e-4,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=5e11,
        min_lr_ratio=1 / 30,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
        init_from="<a herd workdir with a Llama 2 34B>",
    )
    c.model.rope_theta = 1e4  # Llama 2's, until the long-context stage
    c.model.max_seq_len = 4096
    c.data.fim_rate = 0.0
    return c
