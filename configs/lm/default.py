"""The embedded default: a small Llama-3-style model pre-trained on the stdlib sources.

1.3M params: dim 128, 4 layers, GQA (4 query / 2 kv heads), SwiGLU 384, RoPE theta 5e5,
document masking of packed sequences, untied output head, float32; a 2048-token
SentencePiece BPE trained on the corpus. 450 steps of 16 x 256 tokens (1.8M tokens).
Cost: about 0.95 CPU-seconds per step, so 4-7 minutes on 2 quiet CPU cores with
tokenizer training, compiling, 10 evals and the sample: 4 min on an AMD EPYC VM, 417 s on
an Intel Xeon VM (a fresh venv, nothing else running). Measured on a shared 2-core
machine (load average ~5): 8m55s wall, 447 CPU-seconds; eval loss 7.65 (uniform) ->
6.00 (step 50) -> 5.30 (200) -> 4.82 (400) -> 4.80 (450).
"""

from configs.lm.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.dim = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.ffn_dim = 384
    c.model.vocab_size = 2048
    c.model.rope_theta = 5e5
    c.model.max_seq_len = 1024
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "none"
    c.data.seq_len = 256
    c.data.global_batch_size = 16
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.train.steps = 450
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.train.sample_prompt = "def fibonacci(n):\n"
    c.train.sample_tokens = 48
    return c
