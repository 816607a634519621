"""ViT with the DeiT III recipe: LayerScale, uniform stochastic depth, parallel blocks, hMLP.

Pre-norm transformer as DeiT III (Touvron et al. 2022) and the official code
(facebookresearch/deit models_v2.py) have it:

    tokens = stem(image)                        # 'patch': conv p x p / p; or the hMLP stem
    x = [cls ; tokens + pos_emb]                # class token WITHOUT a position embedding
    x = x + sum_j drop_path(ls_a_j * attn_j(LN_a_j(x)))      # j over n_parallel branches
    x = x + sum_j drop_path(ls_m_j * mlp_j(LN_m_j(x)))
    logits = head(LN(x)[:, 0])

LayerNorm eps 1e-6, exact (erf) GELU, MLP ratio 4, qkv bias, LayerScale on every branch
(init 1e-4 in the official code, ``layerscale_init``; ``None`` = no LayerScale), stochastic
depth with the SAME rate in every block, per sample, survivors rescaled by 1/keep (timm's
DropPath). ``n_parallel=2`` is "Three things everyone should know about ViTs" (Touvron et
al. 2022, sec. 3): each of the parallel attention / MLP branches has its own LN, LayerScale
and drop-path draw (timm's ParallelThingsBlock, the official Layer_scale_init_Block_paralx2).

``class_token_pos_emb=True`` gives the class token a position embedding too (row 0 of
``pos_embed``), as timm's ``vit_*_18x2_224`` / ``vit_*_36x1_224`` models do (timm builds them
with ``no_embed_class=False``); the DeiT III models (official and timm ``deit3_*``) do not.

The hMLP stem ("Three things", sec. 5): conv4x4/s4 -> norm -> GELU -> conv2x2/s2 -> norm ->
GELU -> conv2x2/s2 -> norm, widths D/4, D/4, D. Every conv has kernel == stride, so each
16x16 patch is processed on its own (masking a patch before or after the stem is the same);
the norm is LayerNorm over channels ('hmlp_ln') or BatchNorm ('hmlp_bn', the official
default, synchronised over the batch: under jit on a mesh the batch mean is global).

Parameter tree (scanned blocks carry a leading ``layers`` axis; ``scan_blocks=False`` names
them ``blocks_0`` ... ``blocks_{depth-1}``)::

    patch_embed/kernel [p, p, 3, D] (conv_height, conv_width, in_channels, embed), bias [D]
      or hmlp_stem/conv_{0,1,2}/{kernel [k, k, C_in, C_out], bias}; norm_{0,1,2}/scale, bias
         (+ batch_stats norm_i/mean, var for 'hmlp_bn')
    cls_token [D] (embed)                   pos_embed [N (+1), D] (tokens, embed)
    blocks/attn_j/norm/{scale,bias} [L, D]  blocks/attn_j/qkv/kernel [L, D, 3, H, hd]
    blocks/attn_j/qkv/bias [L, 3, H, hd]    blocks/attn_j/proj/kernel [L, H, hd, D], bias
    blocks/attn_j/layerscale [L, D]         blocks/mlp_j/norm/{scale,bias}
    blocks/mlp_j/fc1/kernel [L, D, F], bias blocks/mlp_j/fc2/kernel [L, F, D], bias
    blocks/mlp_j/layerscale [L, D]          norm/{scale,bias} [D]
    head/kernel [D, classes], bias [classes]

``herd.vision.convert`` maps timm / official DeiT III state dicts to this tree and back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

__all__ = [
    "ViTConfig",
    "ViT",
    "VIT_VARIANTS",
    "STEMS",
    "REMAT_POLICIES",
    "DTYPES",
    "interpolate_pos_emb",
    "bicubic_resize_matrix",
    "drop_path",
    "LayerNorm",
    "Dense",
    "patch_conv",
]

STEMS = ("patch", "hmlp_ln", "hmlp_bn")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn")
DTYPES = ("float32", "bfloat16", "float16")

# BatchNorm constants of the official hMLP stem (torch nn.SyncBatchNorm defaults).
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch convention: running = (1 - m) * running + m * batch

# The published sizes (dim / depth / heads; DeiT III paper Table 1, models_v2.py), and the
# parallel / deeper variants of "Three things" (Tables 1-2: ViT-S 18x2 vs 36x1, ViT-B
# 18x2, ViT-H 26x2; models_v2.py deit_*_18x2_LS, deit_huge_patch14_26x2_LS).
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_ti": dict(dim=192, depth=12, n_heads=3),
    "vit_s": dict(dim=384, depth=12, n_heads=6),
    "vit_m": dict(dim=512, depth=12, n_heads=8),
    "vit_b": dict(dim=768, depth=12, n_heads=12),
    "vit_l": dict(dim=1024, depth=24, n_heads=16),
    "vit_h": dict(dim=1280, depth=32, n_heads=16, patch_size=14),
    "vit_s_36x1": dict(dim=384, depth=36, n_heads=6),
    "vit_s_18x2": dict(dim=384, depth=18, n_heads=6, n_parallel=2),
    "vit_b_36x1": dict(dim=768, depth=36, n_heads=12),
    "vit_b_18x2": dict(dim=768, depth=18, n_heads=12, n_parallel=2),
    "vit_h_26x2": dict(dim=1280, depth=26, n_heads=16, patch_size=14, n_parallel=2),
}

_HMLP_PATCH = 16  # conv 4/4 -> 2/2 -> 2/2: one token per 16x16 patch


def _positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape and numerics of a ViT; validated on construction (one ValueError naming the
    bad value). Defaults are DeiT III's (models_v2.py / RECIPES.md)."""

    dim: int
    depth: int
    n_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 1000  # 0: no head, the model returns the class-token features
    n_parallel: int = 1
    layerscale_init: float | None = 1e-4
    drop_path: float = 0.0
    stem: str = "patch"
    norm_eps: float = 1e-6
    class_token_pos_emb: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_blocks: bool = True
    # save_dots: keep the projections' outputs, recompute norms, GELU and attention in the
    # backward pass. ViT-S/16 at batch 16 on a 2-core CPU (tools/bench_vision.py): XLA's
    # temp memory 0.84 GB instead of 2.26 GB, which XLA:CPU page-faults afresh every step,
    # and the step 8% faster (3.62 vs 3.94 s); less memory on accelerators too.
    remat_policy: str = "save_dots"
    init_std: float = 0.02

    def __post_init__(self):
        for f in ("dtype", "param_dtype"):
            v = getattr(self, f)
            if not isinstance(v, str):  # accept jnp.float32 / np.dtype too
                try:
                    object.__setattr__(self, f, jnp.dtype(v).name)
                except TypeError:
                    pass
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "depth", "n_heads", "patch_size", "image_size", "n_parallel"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        if self.stem != "patch" and self.patch_size != _HMLP_PATCH:
            raise ValueError(
                f"the hMLP stem (conv 4/4, 2/2, 2/2) makes 16x16 patches, got "
                f"patch_size={self.patch_size}; use patch_size=16 or stem='patch'"
            )
        if self.stem != "patch" and self.dim % 4:
            raise ValueError(f"the hMLP stem needs dim divisible by 4 (width D/4), got {self.dim}")
        if self.image_size % self.patch_size:
            lo = (self.image_size // self.patch_size) * self.patch_size
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size="
                f"{self.patch_size}; use a multiple of {self.patch_size} such as "
                f"{max(lo, self.patch_size)} or {lo + self.patch_size}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.layerscale_init is not None and not self.layerscale_init > 0:
            raise ValueError(
                f"layerscale_init must be > 0 or None (no LayerScale), got {self.layerscale_init!r}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}"
            )
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"{f} must be one of {DTYPES}, got {getattr(self, f)!r}")

    @classmethod
    def variant(cls, name: str, **overrides) -> ViTConfig:
        """The published size ``name`` (a key of VIT_VARIANTS) with field overrides."""
        if name not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {name!r}; valid: {', '.join(VIT_VARIANTS)}")
        return cls(**{**VIT_VARIANTS[name], **overrides})

    def replace(self, **kw) -> ViTConfig:
        return dataclasses.replace(self, **kw)

    # -- derived ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)  # timm / official: int(dim * mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Sequence length through the blocks: class token + patches."""
        return 1 + self.num_patches

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


# ---------------------------------------------------------------------------------------
# Layers shared with herd.vision.patchconvnet
# ---------------------------------------------------------------------------------------


def _param(mod: nn.Module, name, shape, axes, init, dtype):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def torch_default_bias_init(fan_in: int):
    """torch's nn.Linear / nn.Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch's default conv weight init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)):
# variance 1/(3 fan_in). Convs are not re-initialised by DeiT's _init_weights (Linear only).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32 (torch's biased variance)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", (d,), ("norm",), nn.initializers.ones, self.param_dtype)
        bias = _param(self, "bias", (d,), ("norm",), nn.initializers.zeros, self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """Contracts the last ``n_in`` axes of x with kernel [*in, *out] (+ bias [*out]).

    Computed as one 2-D matmul [rows, prod(in)] x [prod(in), prod(out)]: on XLA:CPU the
    batched 3-D forms made the backward pass transpose its operands; elsewhere the reshape
    is free. ``axes`` names the kernel's axes (in then out); the bias takes the out names.
    """

    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any
    param_dtype: Any
    n_in: int = 1
    use_bias: bool = True
    kernel_init: Any = None
    bias_init: Any = nn.initializers.zeros
    output_dtype: Any = None  # e.g. float32 logits from bfloat16 compute

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        k_in, k_out = math.prod(in_shape), math.prod(self.out_shape)
        kernel_init = self.kernel_init or nn.initializers.normal(0.02)
        kernel = _param(
            self, "kernel", (*in_shape, *self.out_shape), self.axes, kernel_init, self.param_dtype
        )
        out_dtype = self.output_dtype or self.dtype
        y = jnp.matmul(
            x.reshape(-1, k_in).astype(self.dtype),
            kernel.reshape(k_in, k_out).astype(self.dtype),
            preferred_element_type=out_dtype,
        )
        if self.use_bias:
            bias = _param(
                self,
                "bias",
                self.out_shape,
                self.axes[self.n_in :],
                self.bias_init,
                self.param_dtype,
            )
            y = y + bias.reshape(k_out).astype(out_dtype)
        return y.reshape(*lead, *self.out_shape).astype(out_dtype)


def patch_conv(x, kernel, bias=None):
    """A conv with kernel size == stride and no padding, on NHWC x [B, H, W, C] with
    kernel [k, k, C, O] (HWIO), as a reshape + matmul: each k x k patch independently.

    Equals ``lax.conv_general_dilated(x, kernel, (k, k), 'VALID')``; H, W must be
    multiples of k.
    """
    b, h, w, c = x.shape
    k = kernel.shape[0]
    o = kernel.shape[-1]
    x = x.reshape(b, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    y = jnp.matmul(
        x.reshape(-1, k * k * c), kernel.reshape(k * k * c, o), preferred_element_type=x.dtype
    )
    if bias is not None:
        y = y + bias
    return y.reshape(b, h // k, w // k, o)


def drop_path(x, rate: float, rng):
    """Stochastic depth per sample (timm DropPath): each sample's branch output is zeroed
    with probability ``rate``; survivors are scaled by 1/(1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def layerscale(mod: nn.Module, x, init_value: float, param_dtype, name: str = "layerscale"):
    """Per-channel scale of a residual branch (CaiT / DeiT III): param ``name`` [D],
    initialised to ``init_value``."""
    gamma = _param(
        mod,
        name,
        (x.shape[-1],),
        ("norm",),
        nn.initializers.constant(init_value),
        param_dtype,
    )
    return x * gamma.astype(x.dtype)


def gelu(x):
    """Exact (erf) GELU, torch nn.GELU()'s default."""
    return jax.nn.gelu(x, approximate=False)


# ---------------------------------------------------------------------------------------
# Stems
# ---------------------------------------------------------------------------------------


class PatchConv(nn.Module):
    """A conv with kernel == stride (no padding), weight init as torch's Conv2d default:
    params ``kernel`` [k, k, C_in, C_out] (HWIO) and ``bias`` [C_out]. [B, H, W, C_in] ->
    [B, H/k, W/k, C_out]; each k x k patch is processed on its own."""

    kernel_size: int
    features: int
    axes: tuple[str | None, ...]  # (height, width, in, out) logical names
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        shape = (k, k, cin, self.features)
        kernel = _param(
            self, "kernel", shape, self.axes, torch_default_kernel_init, self.param_dtype
        )
        bias_init = torch_default_bias_init(k * k * cin)
        bias = _param(self, "bias", (self.features,), self.axes[-1:], bias_init, self.param_dtype)
        dt = self.dtype
        return patch_conv(x.astype(dt), kernel.astype(dt), bias.astype(dt))


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last (torch BatchNorm2d / SyncBatchNorm semantics).

    Training normalises with the batch's biased variance and updates the running variance
    with the unbiased one, momentum 0.1 (torch). Under jit on a mesh the batch statistics
    are over the global batch (as SyncBatchNorm, the official hMLP norm).
    """

    train: bool
    eps: float = BN_EPS
    momentum: float = BN_MOMENTUM
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", (d,), ("norm",), nn.initializers.ones, self.param_dtype)
        bias = _param(self, "bias", (d,), ("norm",), nn.initializers.zeros, self.param_dtype)
        mean_v = self.variable("batch_stats", "mean", jnp.zeros, (d,), jnp.float32)
        var_v = self.variable("batch_stats", "var", jnp.ones, (d,), jnp.float32)
        xf = x.astype(jnp.float32)
        if self.train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = math.prod(x.shape[:-1])
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (n / max(n - 1, 1))
                mean_v.value = (1 - m) * mean_v.value + m * mean
                var_v.value = (1 - m) * var_v.value + m * unbiased
        else:
            mean, var = mean_v.value, var_v.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class HMLPStem(nn.Module):
    """hMLP stem ("Three things", sec. 5; models_v2.py hMLP_stem): three convs with kernel
    == stride (4, 2, 2), widths D/4, D/4, D, each followed by a norm, GELU after the first
    two. [B, H, W, 3] -> [B, H/16, W/16, D]."""

    config: ViTConfig
    train: bool = False

    @nn.compact
    def __call__(self, images):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        x = images.astype(dt)
        widths = (c.dim // 4, c.dim // 4, c.dim)
        for i, (k, width) in enumerate(zip((4, 2, 2), widths, strict=True)):
            in_axis = "in_channels" if i == 0 else "stem_in_channels"
            out_axis = "embed" if i == 2 else "stem_channels"
            axes = ("conv_height", "conv_width", in_axis, out_axis)
            x = PatchConv(k, width, axes, dt, pdt, name=f"conv_{i}")(x)
            if c.stem == "hmlp_bn":
                x = BatchNorm(self.train, param_dtype=pdt, name=f"norm_{i}")(x)
            else:
                x = LayerNorm(c.norm_eps, dt, pdt, name=f"norm_{i}")(x)
            if i < 2:
                x = gelu(x)
        return x


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def remat_policy(name: str):
    """The jax.checkpoint policy of a named remat policy (REMAT_POLICIES)."""
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":  # keep only each block's input; recompute the block
        return cp.nothing_saveable
    if name == "save_dots":  # keep every projection's output; recompute norms, GELU, softmax
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_attn":  # keep q, k, v and the attention context; recompute the MLP
        return cp.save_only_these_names("query", "key", "value", "context")
    raise ValueError(f"unknown remat_policy {name!r}; valid: {', '.join(REMAT_POLICIES)}")


class AttentionBranch(nn.Module):
    """LN -> multi-head self-attention (fused qkv with bias, timm Attention) -> LayerScale:
    one residual branch (Block applies drop path). Returns the branch output [B, T, D] and
    the attention probabilities [B, H, T, T] (float32).

    Laid out for XLA:CPU (tools/bench_vision.py, ViT-S/16 batch 16 train step on 2 cores,
    alternating in one process: 2.68 s against 3.23 s for the straightforward form):
    q, k, v are moved to head-major [B, H, T, hd] once, so both attention products have
    their batch axes leading and need no per-product transposes; the 1/sqrt(hd) query
    scale is folded into the q columns of the qkv kernel and bias (a [D, H, hd] multiply
    instead of one over every query); the softmax is normalised after the context product
    (exp(s - max) @ v, then divided by the row sums: [B, H, T, hd] divisions instead of
    [B, H, T, T]). The parameters are the same as a plain Dense's (qkv/kernel [D, 3, H,
    hd], qkv/bias [3, H, hd]).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        h, hd = c.n_heads, c.head_dim
        init = nn.initializers.normal(c.init_std)
        x = LayerNorm(c.norm_eps, dt, pdt, name="norm")(x)
        b, t, d = x.shape
        kernel, bias = QKVParams(c, name="qkv")(d)
        # fold the query scale: columns of q (index 0 of the qkv axis) times 1/sqrt(hd)
        fold = jnp.asarray([hd**-0.5, 1.0, 1.0], jnp.float32).reshape(3, 1, 1)
        kernel = (kernel.astype(jnp.float32) * fold).astype(dt)
        bias = (bias.astype(jnp.float32) * fold).astype(dt)
        qkv = jnp.matmul(
            x.reshape(b * t, d).astype(dt),
            kernel.reshape(d, 3 * h * hd),
            preferred_element_type=dt,
        )
        qkv = (qkv + bias.reshape(3 * h * hd)).reshape(b, t, 3, h, hd)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        axes = ("batch", "heads", "length", "head_dim")
        q = _constrain(checkpoint_name(qkv[0], "query"), axes)
        k = _constrain(checkpoint_name(qkv[1], "key"), axes)
        v = _constrain(checkpoint_name(qkv[2], "value"), axes)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        # softmax(s) @ v = (exp(s - max) @ v) / sum(exp(s - max)); the max is a constant
        # shift (its gradient cancels), so it is not differentiated
        shifted = scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(shifted)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        ctx = jnp.einsum(
            "bhqk,bhkd->bhqd", weights.astype(dt), v, preferred_element_type=jnp.float32
        )
        ctx = (ctx / denom).astype(dt)
        ctx = _constrain(checkpoint_name(ctx, "context"), axes)
        ctx = ctx.transpose(0, 2, 1, 3)  # [B, T, H, hd] for proj
        proj_axes = ("heads", "head_dim", "embed")
        y = Dense((c.dim,), proj_axes, dt, pdt, n_in=2, kernel_init=init, name="proj")(ctx)
        if c.layerscale_init is not None:
            y = layerscale(self, y, c.layerscale_init, pdt)
        return y, weights / denom  # the probabilities; dead code unless returned


class QKVParams(nn.Module):
    """The fused qkv projection's parameters, as Dense((3, H, hd)) would make them:
    kernel [D, 3, H, hd] (embed, qkv, heads, head_dim), bias [3, H, hd] (zeros)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, d):
        c = self.config
        shape = (3, c.n_heads, c.head_dim)
        axes = ("embed", "qkv", "heads", "head_dim")
        init = nn.initializers.normal(c.init_std)
        kernel = _param(self, "kernel", (d, *shape), axes, init, c.params_dtype)
        bias = _param(self, "bias", shape, axes[1:], nn.initializers.zeros, c.params_dtype)
        return kernel, bias


class MlpBranch(nn.Module):
    """LN -> fc1 -> exact GELU -> fc2 (timm Mlp) -> LayerScale: one residual branch."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.init_std)
        x = LayerNorm(c.norm_eps, dt, pdt, name="norm")(x)
        y = Dense((c.mlp_dim,), ("embed", "mlp"), dt, pdt, kernel_init=init, name="fc1")(x)
        y = gelu(checkpoint_name(y, "mlp_hidden"))
        y = _constrain(y, ("batch", "length", "mlp"))
        y = Dense((c.dim,), ("mlp", "embed"), dt, pdt, kernel_init=init, name="fc2")(y)
        if c.layerscale_init is not None:
            y = layerscale(self, y, c.layerscale_init, pdt)
        return y


class Block(nn.Module):
    """One (parallel) block: x + sum_j dp(attn_j(x)), then x + sum_j dp(mlp_j(x)).

    Each branch draws its own drop-path mask (timm ParallelThingsBlock has one DropPath per
    branch; the official paralx2 block calls its DropPath once per branch). Returns
    (x, attention probabilities [n_parallel, B, H, T, T] or None) so it can be the body of
    nn.scan.
    """

    config: ViTConfig
    train: bool = False
    return_attention: bool = False

    def _drop(self, y):
        rate = self.config.drop_path
        if not self.train or rate == 0.0:
            return y
        return drop_path(y, rate, self.make_rng("drop_path"))

    @nn.compact
    def __call__(self, x, _=None):
        c = self.config
        outs, maps = [], []
        for j in range(c.n_parallel):
            y, probs = AttentionBranch(c, name=f"attn_{j}")(x)
            outs.append(self._drop(y))
            maps.append(probs)
        x = x + sum(outs[1:], outs[0])
        outs = [self._drop(MlpBranch(c, name=f"mlp_{j}")(x)) for j in range(c.n_parallel)]
        x = x + sum(outs[1:], outs[0])
        x = _constrain(x, ("batch", "length", "embed"))
        return x, (jnp.stack(maps) if self.return_attention else None)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


def check_images(images, image_size: int, what: str = "ViT") -> None:
    """Raises ValueError unless images is [B, image_size, image_size, 3] (NHWC)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"{what} expects NHWC images [batch, {image_size}, {image_size}, 3] "
            f"(config.image_size={image_size}), got shape {shape}; resize the images or "
            f"change image_size (a ViT's position embedding then needs interpolate_pos_emb)"
        )


class ViT(nn.Module):
    """``ViT(config).apply({'params': p}, images, train=False, return_attention=False)``.

    images: float NHWC [B, image_size, image_size, 3] (normalised). Returns float32 logits
    [B, num_classes] (class-token features [B, D] when num_classes=0), or with
    ``return_attention`` ``(logits, attentions)``, attentions float32
    [depth * n_parallel, B, heads, T, T] (T = 1 + patches; row/column 0 is the class token;
    block i's branch j at index i * n_parallel + j).

    ``train=True`` turns on stochastic depth (rngs={'drop_path': key}) and, with the
    'hmlp_bn' stem, batch statistics (mutable=['batch_stats']).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False, return_attention: bool = False):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        check_images(images, c.image_size)
        b = images.shape[0]
        if c.stem == "patch":
            axes = ("conv_height", "conv_width", "in_channels", "embed")
            stem = PatchConv(c.patch_size, c.dim, axes, dt, pdt, name="patch_embed")
            tokens = stem(images)
        else:
            tokens = HMLPStem(c, train=train, name="hmlp_stem")(images)
        x = tokens.reshape(b, c.num_patches, c.dim)
        init = nn.initializers.normal(c.init_std)  # trunc_normal(std=.02) cut at +-2: ~normal
        n_pos = c.num_patches + (1 if c.class_token_pos_emb else 0)
        pos = _param(self, "pos_embed", (n_pos, c.dim), ("tokens", "embed"), init, pdt)
        cls = _param(self, "cls_token", (c.dim,), ("embed",), init, pdt).astype(dt)
        pos = pos.astype(dt)
        if c.class_token_pos_emb:
            cls, pos = cls + pos[0], pos[1:]
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.dim)), x + pos], axis=1)
        x = _constrain(x, ("batch", "length", "embed"))

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(
                Block, policy=remat_policy(c.remat_policy), prevent_cse=not c.scan_blocks
            )
        if c.scan_blocks:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "drop_path": True},
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, maps = stack(c, train, return_attention, name="blocks")(x, None)
        else:
            maps = []
            for i in range(c.depth):
                x, m = block(c, train, return_attention, name=f"blocks_{i}")(x, None)
                maps.append(m)
            maps = jnp.stack(maps) if return_attention else None

        x = LayerNorm(c.norm_eps, dt, pdt, name="norm")(x)
        feats = x[:, 0]
        if c.num_classes == 0:
            out = feats.astype(jnp.float32)
        else:
            out = Dense(
                (c.num_classes,),
                ("embed", "classes"),
                dt,
                pdt,
                kernel_init=init,
                output_dtype=jnp.float32,
                name="head",
            )(feats)
        if not return_attention:
            return out
        t = c.num_tokens
        return out, maps.reshape(c.depth * c.n_parallel, b, c.n_heads, t, t)


# ---------------------------------------------------------------------------------------
# Position-embedding interpolation (fine-tuning at a new resolution)
# ---------------------------------------------------------------------------------------


def _cubic_weights(t, a=-0.75):
    """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (torch's
    bicubic uses a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 matrix M with ``M @ v`` = torch
    ``F.interpolate(v, n_out, mode='bicubic', align_corners=False)`` along one axis
    (half-pixel centres, cubic a=-0.75, border taps clamped; no antialiasing)."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((n_out, n_in))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, tap])
    return m


def interpolate_pos_emb(params, config: ViTConfig, new_image_size: int):
    """``params`` with ``pos_embed`` resized from ``config.image_size`` to
    ``new_image_size`` (bicubic on the patch grid, as DeiT's fine-tuning at a new
    resolution and timm's resample_abs_pos_embed do; a class-token row, if any, is kept).

    Returns the new params (the input is not modified); the model for them is
    ``ViT(config.replace(image_size=new_image_size))``. Same size: params unchanged.
    Accepts params with or without the outer {'params': ...} and boxed params.
    """
    new_config = config.replace(image_size=new_image_size)  # validates divisibility
    params = nn.meta.unbox(params)
    wrapped = "params" in params and "pos_embed" not in params
    inner = dict(params["params"] if wrapped else params)
    pos = inner["pos_embed"]
    n_prefix = 1 if config.class_token_pos_emb else 0
    g_old, g_new = config.grid_size, new_config.grid_size
    expected = (n_prefix + g_old * g_old, config.dim)
    if tuple(pos.shape) != expected:
        raise ValueError(
            f"pos_embed has shape {tuple(pos.shape)}, but config (image_size="
            f"{config.image_size}, patch_size={config.patch_size}) implies {expected}"
        )
    if g_new != g_old:
        grid = jnp.asarray(pos[n_prefix:], jnp.float32).reshape(g_old, g_old, config.dim)
        m = jnp.asarray(bicubic_resize_matrix(g_old, g_new), jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        grid = jnp.einsum("ih,hwd->iwd", m, grid, precision=hi)
        grid = jnp.einsum("jw,iwd->ijd", m, grid, precision=hi)
        new = grid.reshape(g_new * g_new, config.dim).astype(pos.dtype)
        inner["pos_embed"] = jnp.concatenate([jnp.asarray(pos[:n_prefix]), new], axis=0)
    return {**params, "params": inner} if wrapped else inner
