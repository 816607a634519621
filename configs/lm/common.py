"""The one builder behind every configs/lm/*.py file.

`base_config()` lists every field `python -m herd.lm.train` reads (so any of them can be
overridden with --config.key=value); `pod_config(...)` fills in a published recipe:
a model preset from herd.lm.presets plus the paper's optimiser, batch and length.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# Fields of herd.lm.config.LlamaConfig a config may set, with the dataclass's types: each is
# a typed placeholder, so --config.model.X=value parses as that type and
# --config.model.X=none unsets it again; unset (None) = the preset's (or the class's)
# default. optimizer_eps is optim.eps.
MODEL_FIELDS = {
    "dim": int,
    "n_layers": int,
    "n_heads": int,
    "n_kv_heads": int,
    "head_dim": int,  # unset: dim // n_heads
    "vocab_size": int,
    "ffn_dim": int,
    "multiple_of": int,
    "ffn_dim_multiplier": float,
    "norm_eps": float,
    "rope_theta": float,
    # Llama 3.1 style, a whole dict: --config.model.rope_scaling="{'factor': 8.0,
    # 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}"
    # (all four keys; factor 1.0 = no scaling).
    "rope_scaling": dict,
    "max_seq_len": int,
    "tie_embeddings": bool,
    "dtype": str,
    "param_dtype": str,
    "remat_policy": str,
    "scan_layers": bool,
    "attention_impl": str,
    "attention_q_chunk": int,
    "init_std": float,
}


def _placeholders(types: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: placeholder(t) for k, t in types.items()})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = _placeholders({"preset": str, **MODEL_FIELDS})  # preset: herd.lm.presets
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.data = ml_collections.ConfigDict(
        {
            "source": "stdlib",  # 'stdlib', file globs, 'jsonl:<glob>[:field]', 'tfds:<name>'...
            "eval_source": "",  # required unless source == 'stdlib'
            "eval_fraction": 0.02,  # stdlib only: share of files held out for eval
            "tokenizer": "",  # a .model file; '' = train a SentencePiece BPE and cache it
            "tokenizer_train_files": 400,  # files used to train that tokenizer (0 = all)
            "seq_len": 256,
            "global_batch_size": 16,  # sequences per step, all processes together
            # later batch shapes, 'TOKENS:BATCHxSEQ,...' (herd.lm.ramp.batch_stages); '' = none
            "batch_ramp": "",
            "seed": 0,
            "worker_count": 0,
            # Code Llama fill-in-the-middle (herd.lm.fim): share of text documents transformed
            # (0.0 = off; Code Llama 0.9) and the SPM share of those (0.5). > 0 needs a
            # tokenizer with <PRE> <SUF> <MID> <EOT> (a trained one gets them).
            "fim_rate": 0.0,
            "fim_spm_rate": 0.5,
            # > 0: cut each text record into documents of at most this many characters at
            # top-level statements (herd.lm.data.split_code_document) before FIM, so FIM
            # sequences fit in one row; 0 = one document per record
            "max_doc_chars": 0,
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "schedule": "warmup_cosine",
            "lr": 3e-4,
            "warmup_steps": 2000,
            "min_lr_ratio": 0.1,  # cosine ends at 10% of the peak (Llama 1/2/3)
            "b1": 0.9,
            "b2": 0.95,
            # unset = the model family's value (LlamaConfig.optimizer_eps; Llama 2 sec. 2.2: 1e-5)
            "eps": placeholder(float),
            "weight_decay": 0.1,
            "clip_norm": 1.0,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "steps": 1000,
            # fine-tuning: a herd workdir (its latest checkpoint; one from
            # `python -m herd.lm.convert` too), its checkpoints/ or one checkpoints/<step>
            # directory. Its params start the run (fresh optimiser state, step 0); its
            # stored model is the base that cfg.model's set fields change (not the
            # weight-defining ones); its tokenizer is used unless data.tokenizer is set.
            # '' = off. A workdir with checkpoints of its own resumes them instead.
            "init_from": "",
            "stop_after": 0,  # > 0: stop this invocation at that step (resume later)
            "grad_accum_steps": 1,
            "vocab_chunk": 0,  # chunk of the vocabulary per cross-entropy step (0 = all)
            "eval_every": 100,
            "eval_batches": 4,
            "eval_at_start": True,
            "checkpoint_every": 100,
            "keep_checkpoints": 3,
            "async_checkpoints": True,
            "log_every": 10,
            "seed": 0,
            "progress": True,
            "tensorboard": True,
            "sample_prompt": "",
            "sample_tokens": 0,
        }
    )
    return c


def pod_config(
    preset: str,
    *,
    lr: float,
    warmup_steps: int,
    batch_tokens: int,
    seq_len: int,
    train_tokens: float,
    min_lr_ratio: float = 0.1,
    eps: float | None = None,
    mesh: dict | None = None,
    remat_policy: str = "full",
    vocab_chunk: int = 0,
    batch_ramp: str = "",
    schedule_steps: int | None = None,
    init_from: str = "",
) -> ml_collections.ConfigDict:
    """A published pre-training recipe for a pod (bf16 compute, float32 params).

    ``batch_tokens`` / ``seq_len`` is the first batch shape; ``batch_ramp`` the later ones
    (herd.lm.ramp.batch_stages). Training stops once ``train_tokens`` are seen; the
    learning-rate schedule spans ``schedule_steps`` when the paper states it, else that
    many steps. The corpus and tokenizer are the user's: set --config.data.source,
    .eval_source and .tokenizer (an empty source is refused before anything compiles).
    ``init_from``: the checkpoint a fine-tuning stage starts from (train.init_from); a
    ``<description>`` placeholder is refused until the user sets the path.
    """
    from herd.lm.ramp import batch_stages, steps_for_tokens

    c = base_config()
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.remat_policy = remat_policy
    c.mesh = ml_collections.ConfigDict(mesh or {"data": 1, "fsdp": -1, "tensor": 1})
    c.data.source = ""
    c.data.seq_len = seq_len
    c.data.global_batch_size = batch_tokens // seq_len
    c.optim.lr = lr
    c.optim.warmup_steps = warmup_steps
    c.optim.min_lr_ratio = min_lr_ratio
    c.optim.eps = eps
    c.data.batch_ramp = batch_ramp
    stages = batch_stages(batch_ramp, batch_tokens // seq_len, seq_len)
    budget = steps_for_tokens(stages, train_tokens)
    c.train.steps = schedule_steps or budget
    if schedule_steps and budget < schedule_steps:
        c.train.stop_after = budget
    c.train.vocab_chunk = vocab_chunk
    c.train.init_from = init_from
    c.train.eval_every = 1000
    c.train.eval_batches = 50
    c.train.checkpoint_every = 1000
    c.train.log_every = 10
    c.train.progress = False
    return c
