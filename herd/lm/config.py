"""LlamaConfig: the shape and numerics of a Llama model, validated on construction.

The published sizes are presets (``herd.lm.presets``; ``LlamaConfig.preset(name)``); an
experiment's ``cfg.model`` becomes one with ``herd.lm.presets.build_model_config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from herd.lm.attention import VALID_IMPLS, check_attention_config

__all__ = ["LlamaConfig", "REMAT_POLICIES", "ATTENTION_IMPLS", "DTYPES", "ROPE_SCALING_KEYS"]

REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv", "save_attn")
ATTENTION_IMPLS = VALID_IMPLS  # from herd.lm.attention
DTYPES = ("float32", "bfloat16", "float16")
# Llama 3.1's rope scaling (HF rope_type 'llama3').
ROPE_SCALING_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama model. Validated on construction.

    ``ffn_dim=None`` derives the SwiGLU width with Meta's rule
    ``multiple_of * ceil(int(ffn_dim_multiplier * int(2 * 4 * dim / 3)) / multiple_of)``.
    ``rope_scaling`` is Llama 3.1 style: ``{'factor', 'low_freq_factor',
    'high_freq_factor', 'original_max_position_embeddings'}`` or None.
    ``optimizer_eps`` is the AdamW epsilon of the family (the train config reads it).
    ``head_dim=None`` is ``dim // n_heads`` (every published Llama); an explicit value
    (checkpoints whose ``n_heads * head_dim != dim``) keeps that size. ``replace`` keeps a
    derived head_dim derived (``replace(dim=...)`` re-derives it).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    rope_scaling: Mapping[str, float] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str = "xla"
    attention_q_chunk: int | None = None
    optimizer_eps: float = 1e-5
    init_std: float = 0.02
    head_dim: int | None = None

    def __post_init__(self):
        derived = self.head_dim is None
        object.__setattr__(self, "_head_dim_derived", derived)
        if derived and isinstance(self.n_heads, (int, np.integer)) and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        for f in ("dtype", "param_dtype"):
            v = getattr(self, f)
            if not isinstance(v, str):  # accept jnp.float32 / np.dtype too
                try:
                    object.__setattr__(self, f, jnp.dtype(v).name)
                except TypeError:
                    pass
        self.validate()

    def __hash__(self):  # rope_scaling is a dict: hash its items
        vals = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            vals.append(tuple(sorted(v.items())) if isinstance(v, dict) else v)
        return hash(tuple(vals))

    # -- derived ---------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width: ffn_dim if given, else Meta's multiple_of rule."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> LlamaConfig:
        if self._head_dim_derived and "head_dim" not in kw:
            kw["head_dim"] = None
        return dataclasses.replace(self, **kw)

    def validate(self) -> None:
        def pos_int(name):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            pos_int(name)
        if self.multiple_of is not None:
            pos_int("multiple_of")
        if self.ffn_dim is not None:
            pos_int("ffn_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self._head_dim_derived:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            if self.head_dim % 2:
                raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for RoPE")
        else:
            pos_int("head_dim")
            if self.head_dim % 2:
                raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {', '.join(ATTENTION_IMPLS)}"
            )
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"unknown {f} {getattr(self, f)!r}; valid: {', '.join(DTYPES)}")
        if self.attention_q_chunk is not None:
            pos_int("attention_q_chunk")
        # impl / q_chunk / head_dim combination; the sequence length is checked when the
        # model runs (128 here is a length every backend accepts)
        check_attention_config(
            self.attention_impl,
            128,
            q_chunk=self.attention_q_chunk,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
        )
        rs = self.rope_scaling
        if rs is not None:
            missing = [k for k in ROPE_SCALING_KEYS if k not in rs]
            extra = [k for k in rs if k not in ROPE_SCALING_KEYS + ("rope_type",)]
            if missing or extra:
                raise ValueError(
                    f"rope_scaling {rs!r}: missing keys {missing}, unknown keys {extra}; "
                    f"expected {list(ROPE_SCALING_KEYS)}"
                )
            if rs.get("rope_type", "llama3") != "llama3":
                raise ValueError(f"rope_scaling rope_type {rs['rope_type']!r}: only 'llama3'")
            if not rs["factor"] >= 1:
                raise ValueError(f"rope_scaling factor must be >= 1, got {rs['factor']}")
            if not rs["high_freq_factor"] > rs["low_freq_factor"] > 0:
                raise ValueError(
                    "rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{rs['high_freq_factor']} and {rs['low_freq_factor']}"
                )
            if not rs["original_max_position_embeddings"] > 0:
                raise ValueError(
                    "rope_scaling original_max_position_embeddings must be > 0, got "
                    f"{rs['original_max_position_embeddings']}"
                )

    # -- presets (the table is herd.lm.presets.PRESETS) ---------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        from herd.lm.presets import PRESETS

        return list(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        from herd.lm.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from jax.eval_shape (no memory is allocated).

        ``include_embeddings=False`` leaves out the input token-embedding table (a gather,
        no FLOPs) but keeps the output projection, also when it is tied: this is the count
        used for model FLOPs (6 N per token).
        """
        from herd.lm.model import Llama

        model = Llama(self)
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
        )
        shapes = nn.meta.unbox(shapes)
        total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
        if not include_embeddings and not self.tie_embeddings:
            total -= self.vocab_size * self.dim
        return total
