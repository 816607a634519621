"""The published Llama sizes as LlamaConfig fields: ``LlamaConfig.preset(name, **overrides)``.

LLaMA 1 (7B-65B), Llama 2 (7B-70B), Code Llama (7B-70B), Llama 3 / 3.1 (8B-405B), Llama
3.2 (1B, 3B). :func:`build_model_config` turns an experiment's ``cfg.model`` (a preset name
plus overrides, or every field) into a LlamaConfig.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from herd.lm.config import LlamaConfig

# Meta's params.json values (multiple_of / ffn_dim_multiplier) so the FFN width is derived
# exactly as in the reference code; tests check the derived widths against the papers' tables.
# optimizer_eps: 1e-5 is stated by the Llama 2 paper; LLaMA 1, Code Llama and Llama 3 do
# not state it and the same value is used (the train config may override it).
_L31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_L32_SCALING = {**_L31_SCALING, "factor": 32.0}


def _llama1(dim, layers, heads):
    return dict(
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        vocab_size=32000,
        multiple_of=256,
        norm_eps=1e-6,
        rope_theta=1e4,
        max_seq_len=2048,
    )


_L2_70B = dict(
    dim=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    vocab_size=32000,
    multiple_of=4096,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=1e4,
    max_seq_len=4096,
)
_L3_8B = dict(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    multiple_of=1024,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=5e5,
    max_seq_len=8192,
)
_L3_70B = dict(_L3_8B, dim=8192, n_layers=80, n_heads=64, multiple_of=4096)
_L31 = dict(max_seq_len=131072, rope_scaling=_L31_SCALING)
_CODE = dict(vocab_size=32016, rope_theta=1e6, max_seq_len=16384, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    "llama1-7b": _llama1(4096, 32, 32),
    "llama1-13b": _llama1(5120, 40, 40),
    "llama1-33b": _llama1(6656, 60, 52),
    "llama1-65b": _llama1(8192, 80, 64),
    "llama2-7b": {**_llama1(4096, 32, 32), "norm_eps": 1e-5, "max_seq_len": 4096},
    "llama2-13b": {**_llama1(5120, 40, 40), "norm_eps": 1e-5, "max_seq_len": 4096},
    "llama2-70b": _L2_70B,
    "code-llama-7b": {**_llama1(4096, 32, 32), **_CODE},
    "code-llama-13b": {**_llama1(5120, 40, 40), **_CODE},
    # 34B has no infilling tokens: vocab 32000
    "code-llama-34b": {
        **_llama1(8192, 48, 64),
        **_CODE,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.0,
        "vocab_size": 32000,
    },
    "code-llama-70b": {**_L2_70B, **_CODE},
    "llama3-8b": _L3_8B,
    "llama3-70b": _L3_70B,
    "llama3.1-8b": {**_L3_8B, **_L31},
    "llama3.1-70b": {**_L3_70B, **_L31},
    "llama3.1-405b": dict(
        _L3_8B,
        dim=16384,
        n_layers=126,
        n_heads=128,
        multiple_of=4096,
        ffn_dim_multiplier=1.2,
        **_L31,
    ),
    "llama3.2-1b": dict(
        _L3_8B,
        dim=2048,
        n_layers=16,
        n_heads=32,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        max_seq_len=131072,
        rope_scaling=_L32_SCALING,
        tie_embeddings=True,
    ),
    "llama3.2-3b": dict(
        _L3_8B,
        dim=3072,
        n_layers=28,
        n_heads=24,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        max_seq_len=131072,
        rope_scaling=_L32_SCALING,
        tie_embeddings=True,
    ),
}


def build_model_config(model_cfg: ml_collections.ConfigDict | dict) -> LlamaConfig:
    """`cfg.model` -> LlamaConfig: a preset plus the fields set (not None), or all fields.

    LlamaConfig validates itself (heads divisible by kv heads, dim by heads, ...) and an
    unknown preset raises listing the valid ones.
    """
    fields = {k: v for k, v in dict(model_cfg).items() if v is not None}
    if isinstance(fields.get("rope_scaling"), ml_collections.ConfigDict):
        fields["rope_scaling"] = dict(fields["rope_scaling"])
    preset = fields.pop("preset", None)
    if preset:
        return LlamaConfig.preset(preset, **fields)
    return LlamaConfig(**fields)


# What the weights of a checkpoint mean: a fine-tune (train.init_from) and a resume must
# keep these. The rest (compute dtype, remat policy, attention backend, max_seq_len) may
# change between a run and its resume.
WEIGHT_DEFINING_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "vocab_size",
    "hidden_dim",
    "tie_embeddings",
    "param_dtype",
    "scan_layers",
    "norm_eps",
)
# How positions are encoded: a fine-tune may change them (Code Llama's long-context
# fine-tuning raises rope_theta from 1e4 to 1e6, Roziere et al. 2023 sec. 2.4), a resume
# may not (the weights so far were trained with the stored values).
POSITION_FIELDS = ("rope_theta", "rope_scaling")
RESUME_FIXED_FIELDS = WEIGHT_DEFINING_FIELDS + POSITION_FIELDS


def model_config_fields(config: LlamaConfig) -> dict:
    """`config` as a `cfg.model` section that :func:`build_model_config` turns back into
    the same LlamaConfig (every field; a derived head_dim stays derived; no preset)."""
    d = dataclasses.asdict(config)
    if config.head_dim * config.n_heads == config.dim:
        d["head_dim"] = None
    return {k: v for k, v in d.items() if v is not None}


def finetune_model_config(
    stored_model: dict, run_model: ml_collections.ConfigDict | dict, where: str
) -> LlamaConfig:
    """The model of a run that starts from a checkpoint trained with `stored_model`.

    The checkpoint's model is the base; the fields the run sets (its preset's fields,
    then its explicit ones) replace it. A weight-defining field the run sets to another
    value is refused naming the field, both values and `where` (the checkpoint's config);
    rope_theta, rope_scaling, max_seq_len, dtype, remat and the like may change.
    vocab_size alone may grow: the checkpoint's token rows are kept and the new ones start
    as a fresh model's (Code Llama 7B/13B/70B add 16 tokens, among them the infilling
    sentinels at 32007-32010, to Llama 2's 32000; herd.lm.train.grow_vocab).
    """
    base = build_model_config(stored_model)
    fields = {k: v for k, v in dict(run_model).items() if v is not None}
    if isinstance(fields.get("rope_scaling"), ml_collections.ConfigDict):
        fields["rope_scaling"] = dict(fields["rope_scaling"])
    preset = fields.pop("preset", None)
    if preset:
        LlamaConfig.preset(preset)  # an unknown name: ValueError listing the valid ones
        fields = {**PRESETS[preset], **fields}
    wanted = base.replace(**fields)
    diff = [
        (k, getattr(base, k), getattr(wanted, k))
        for k in WEIGHT_DEFINING_FIELDS
        if getattr(base, k) != getattr(wanted, k)
        and not (k == "vocab_size" and wanted.vocab_size > base.vocab_size)
    ]
    if diff:
        changes = ", ".join(f"{k} {a!r} (checkpoint) vs {b!r} (this run)" for k, a, b in diff)
        raise ValueError(
            f"the model asked for does not fit the checkpoint's weights ({where}): {changes}; "
            "a fine-tune may change only how the weights are used (rope_theta, "
            "rope_scaling, max_seq_len, dtype, remat_policy, attention_impl, ...) and grow "
            "vocab_size"
        )
    return wanted


def _diff_fields(theirs, ours, fields) -> dict:
    return {
        k: (getattr(theirs, k), getattr(ours, k))
        for k in fields
        if getattr(theirs, k) != getattr(ours, k)
    }


def check_checkpoint_model(checkpoint_dir: str, model_config, step: int | None = None) -> None:
    """Raises ValueError, naming the file, when checkpoint `step` (default: the latest) in
    `checkpoint_dir` was trained with another model than `model_config` (a restore would
    fail in orbax with a shape error or, worse, load weights into a model of another
    meaning: RESUME_FIXED_FIELDS). Checkpoints without a stored config pass."""
    from herd.core.checkpoint import read_config

    try:
        stored = read_config(checkpoint_dir, step)
    except FileNotFoundError:  # checkpoints written before configs were stored with them
        return
    theirs = build_model_config(stored["model"])
    diff = _diff_fields(theirs, model_config, RESUME_FIXED_FIELDS)
    if diff:
        if step is None:
            step = max(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit())
        changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"the checkpoint {os.path.join(checkpoint_dir, str(step), 'config')} was trained "
            f"with another model than the config asks for ({changes}); use another "
            "--workdir, or the checkpoint's own model settings"
        )
