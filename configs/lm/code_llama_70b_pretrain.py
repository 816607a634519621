"""Code Llama 70B, code training (Roziere et al. 2023, arXiv v3 (Jan. 2024) addendum): Llama 2
70B trained on 1T tokens of code (twice the smaller models' 500B), with infilling.

- Starts from Llama 2 70B: set --config.train.init_from to a herd workdir holding it
  (`python -m herd.lm.convert --from_hf=<Llama-2-70b-hf dir> --to=<workdir>`); the
  vocabulary grows from 32000 to 32016 tokens (new rows freshly initialised); set
  --config.data.tokenizer to Code Llama 70B's tokenizer.model.
- The addendum says 70B was trained "using roughly the same methods" as the smaller
  models and with FIM; it does not state the learning rate. herd uses Llama 2 70B's peak
  1.5e-4, following sec. 2.6's rule of keeping the Llama 2 model's lr (verify), with the
  smaller models' 1000 warm-up steps, cosine to 1/30, batch 4M tokens of 4096-token
  sequences; 1T tokens = 238,419 steps.
- Infilling: fim_rate 0.9, half SPM. RoPE theta 1e4 and 4096-token sequences in this stage
  (the long-context stage would raise them as for the smaller models; no config here).

For pods: also set --config.data.source and --config.data.eval_source.
"""

from configs.lm.common import pod_config


def get_config(arg=None):
    del arg
    c = pod_config(
        "code-llama-70b",
        lr=1.5e-4,
        warmup_steps=1000,
        batch_tokens=4 * 2**20,
        seq_len=4096,
        train_tokens=1e12,
        min_lr_ratio=1 / 30,
        mesh={"data": 1, "fsdp": -1, "tensor": 8},
        init_from="<a herd workdir with Llama 2 70B>",
    )
    c.model.rope_theta = 1e4  # Llama 2's, until a long-context stage
    c.model.max_seq_len = 4096
    c.data.fim_rate = 0.9
    c.data.fim_spm_rate = 0.5
    return c
