"""PatchConvNet: a convolutional trunk with attention-based pooling (Touvron et al. 2021,
"Augmenting Convolutional networks with attention-based aggregation").

As the official code has it (facebookresearch/deit patchconvnet_models.py):

    x = stem(image)        # 4 x (conv3x3 stride 2 pad 1, no bias), GELU between; D/8..D
    x = x + drop_path(ls * ConvSE(LN(x)))          # N trunk blocks, no position embedding
    # ConvSE: conv1x1 -> GELU -> depthwise conv3x3 -> GELU -> squeeze-excite(0.25) -> conv1x1
    cls = cls + ls_1 * attn(LN_1([cls; x]))[cls]   # one pooling block: the class token's
    cls = cls + ls_2 * mlp(LN_2(cls))              #   query attends over [cls; patches],
    logits = head(LN(cls))                         #   1 head, MLP ratio 3, no drop path

LayerNorm eps 1e-6 everywhere; the squeeze-excite is timm's (spatial mean -> conv1x1 ->
ReLU -> conv1x1 -> sigmoid gate, reduced width round(D / 4)); the trunk's stochastic-depth
rate is the same in every block. LayerScale init 1e-4 for S60, 1e-6 for the others.
Convolutions keep torch's default init (the official _init_weights re-initialises only
Linear and LayerNorm); linears and the class token are trunc-normal(0.02).

Parameter tree (trunk blocks scanned with a leading ``layers`` axis, or ``blocks_i``)::

    stem/conv_{0..3} [3, 3, C_in, C_out]  (kernels; the stem convs have no bias; axes
        conv_height, conv_width, in_channels | stem_in_channels, stem_channels | embed)
    cls_token [D]
    blocks/norm/{scale,bias}               blocks/conv_in/kernel [L, D, D], bias [L, D]
    blocks/dwconv/kernel [L, 3, 3, D], bias   blocks/se_reduce/kernel [L, D, D/4], bias
    blocks/se_expand/kernel [L, D/4, D], bias  blocks/conv_out/kernel [L, D, D], bias
    blocks/layerscale [L, D]
    pool/norm_1, pool/{q,k,v}/kernel [D, H, hd], bias; pool/proj/kernel [H, hd, D], bias
    pool/layerscale_1, pool/norm_2, pool/fc1 [D, 3D], pool/fc2 [3D, D], pool/layerscale_2
    norm/{scale,bias}                      head/kernel [D, classes], bias
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from herd.vision.vit import (
    DTYPES,
    REMAT_POLICIES,
    Dense,
    LayerNorm,
    _constrain,
    _param,
    _positive_int,
    check_images,
    drop_path,
    gelu,
    layerscale,
    remat_policy,
    torch_default_bias_init,
    torch_default_kernel_init,
)

__all__ = [
    "PatchConvNetConfig",
    "PatchConvNet",
    "PATCHCONVNET_VARIANTS",
    "STEM_STRIDE",
    "DEPTHWISE_IMPLS",
    "depthwise_conv3x3",
]

STEM_STRIDE = 16  # four stride-2 convs: one token per 16x16 pixels

# The trunk's depthwise conv3x3, two ways with the same math and the same kernel param:
# 'shifted': nine shifted multiply-adds on the zero-padded input (element-wise, fused);
# 'conv': lax.conv_general_dilated with feature_group_count = channels. On XLA:CPU the
# 'conv' kernel gradient is slow: that conv (batch_group_count = C) becomes a dense
# C x C conv whose diagonal is kept (C times the FLOPs: ~80 ms per S60 block unrolled), and
# inside nn.scan's loop body it gets a layout (f01b_i01o->01bf) the Eigen conv kernels do
# not take, so it runs as a naive loop: ~14 s per block at S60's [16, 14, 14, 384].
# 'shifted' is the default as measured on CPU (GPU / TPU not measured).
DEPTHWISE_IMPLS = ("shifted", "conv")

# dim / trunk depth / LayerScale init: patchconvnet_models.py S60 ... L120 (S60 keeps the
# default init_scale 1e-4, the others pass 1e-6); paper Table 1 / README_patchconvnet.md.
PATCHCONVNET_VARIANTS: dict[str, dict[str, Any]] = {
    "patchconvnet_s60": dict(dim=384, depth=60, layerscale_init=1e-4),
    "patchconvnet_s120": dict(dim=384, depth=120, layerscale_init=1e-6),
    "patchconvnet_b60": dict(dim=768, depth=60, layerscale_init=1e-6),
    "patchconvnet_b120": dict(dim=768, depth=120, layerscale_init=1e-6),
    "patchconvnet_l60": dict(dim=1024, depth=60, layerscale_init=1e-6),
    "patchconvnet_l120": dict(dim=1024, depth=120, layerscale_init=1e-6),
}


@dataclasses.dataclass(frozen=True)
class PatchConvNetConfig:
    """Shape and numerics of a PatchConvNet; validated on construction."""

    dim: int
    depth: int
    image_size: int = 224
    num_classes: int = 1000  # 0: no head, the model returns the pooled class token
    layerscale_init: float = 1e-4
    drop_path: float = 0.0
    pool_heads: int = 1
    pool_mlp_ratio: float = 3.0
    se_ratio: float = 0.25
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_blocks: bool = True
    remat_policy: str = "none"
    init_std: float = 0.02
    depthwise: str = "shifted"  # DEPTHWISE_IMPLS: how the trunk's depthwise 3x3 is computed

    def __post_init__(self):
        for f in ("dtype", "param_dtype"):
            v = getattr(self, f)
            if not isinstance(v, str):
                try:
                    object.__setattr__(self, f, jnp.dtype(v).name)
                except TypeError:
                    pass
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "depth", "image_size", "pool_heads"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.dim % 8:
            raise ValueError(f"dim must be divisible by 8 (stem widths D/8..D), got {self.dim}")
        if self.dim % self.pool_heads:
            raise ValueError(f"dim={self.dim} is not divisible by pool_heads={self.pool_heads}")
        if self.image_size % STEM_STRIDE:
            lo = (self.image_size // STEM_STRIDE) * STEM_STRIDE
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the stem's stride "
                f"{STEM_STRIDE} (patch size); use a multiple of {STEM_STRIDE} such as "
                f"{max(lo, STEM_STRIDE)} or {lo + STEM_STRIDE}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if not self.layerscale_init > 0:
            raise ValueError(f"layerscale_init must be > 0, got {self.layerscale_init!r}")
        if not 0 < self.se_ratio <= 1:
            raise ValueError(f"se_ratio must be in (0, 1], got {self.se_ratio!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}"
            )
        if self.depthwise not in DEPTHWISE_IMPLS:
            raise ValueError(
                f"unknown depthwise {self.depthwise!r}; valid: {', '.join(DEPTHWISE_IMPLS)}"
            )
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"{f} must be one of {DTYPES}, got {getattr(self, f)!r}")

    @classmethod
    def variant(cls, name: str, **overrides) -> PatchConvNetConfig:
        if name not in PATCHCONVNET_VARIANTS:
            raise ValueError(
                f"unknown PatchConvNet variant {name!r}; valid: {', '.join(PATCHCONVNET_VARIANTS)}"
            )
        return cls(**{**PATCHCONVNET_VARIANTS[name], **overrides})

    def replace(self, **kw) -> PatchConvNetConfig:
        return dataclasses.replace(self, **kw)

    @property
    def patch_size(self) -> int:
        return STEM_STRIDE

    @property
    def grid_size(self) -> int:
        return self.image_size // STEM_STRIDE

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def se_dim(self) -> int:
        return round(self.dim * self.se_ratio)  # timm SqueezeExcite: round(in_chs * rd_ratio)

    @property
    def pool_mlp_dim(self) -> int:
        return int(self.dim * self.pool_mlp_ratio)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def _conv(x, kernel, stride: int, groups: int = 1):
    """NHWC conv, 3x3 with padding 1 (torch padding=1), HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class ConvStem(nn.Module):
    """Four conv3x3 / stride 2 / pad 1 without bias, GELU between: [B, H, W, 3] ->
    [B, H/16, W/16, D] (widths D/8, D/4, D/2, D)."""

    config: PatchConvNetConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        dt = c.compute_dtype
        x = images.astype(dt)
        widths = (c.dim // 8, c.dim // 4, c.dim // 2, c.dim)
        for i, width in enumerate(widths):
            # a kernel's two channel axes need distinct logical names (flax refuses a name
            # twice in one array): a stem conv reads 'stem_in_channels', writes 'stem_channels'
            in_axis = "in_channels" if i == 0 else "stem_in_channels"
            out_axis = "embed" if i == 3 else "stem_channels"
            axes = ("conv_height", "conv_width", in_axis, out_axis)
            shape = (3, 3, x.shape[-1], width)
            kernel = _param(
                self, f"conv_{i}", shape, axes, torch_default_kernel_init, c.params_dtype
            )
            x = _conv(x, kernel.astype(dt), stride=2)
            if i < 3:
                x = gelu(x)
        return x


def depthwise_conv3x3(x, kernel, impl: str = "shifted"):
    """Depthwise conv3x3, stride 1, zero padding 1 (torch's Conv2d(D, D, 3, padding=1,
    groups=D) without bias): x [B, H, W, D], kernel [3, 3, D] (torch's weight[d, 0, i, j]
    at kernel[i, j, d]); cross-correlation, out[h, w] = sum_ij pad(x)[h + i, w + j] k[i, j].
    ``impl`` is one of DEPTHWISE_IMPLS (same result up to float rounding)."""
    if impl == "conv":
        return _conv(x, kernel[:, :, None, :], stride=1, groups=x.shape[-1])
    if impl != "shifted":
        raise ValueError(f"unknown depthwise impl {impl!r}; valid: {', '.join(DEPTHWISE_IMPLS)}")
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[:, i : i + h, j : j + w, :] * kernel[i, j]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nn.Module):
    """Depthwise conv3x3, padding 1, with bias (torch default init): kernel [3, 3, D]."""

    dtype: Any
    param_dtype: Any
    impl: str = "shifted"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        axes = ("conv_height", "conv_width", "conv_hidden")
        kernel = _param(
            self, "kernel", (3, 3, d), axes, torch_default_kernel_init, self.param_dtype
        )
        bias_init = torch_default_bias_init(9)  # fan_in of a depthwise 3x3: 9
        bias = _param(self, "bias", (d,), ("conv_hidden",), bias_init, self.param_dtype)
        dt = self.dtype
        return depthwise_conv3x3(x, kernel.astype(dt), self.impl) + bias.astype(dt)


class TrunkBlock(nn.Module):
    """x + drop_path(ls * ConvSE(LN(x))) on the token grid [B, h, w, D]."""

    config: PatchConvNetConfig
    train: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        d, r = c.dim, c.se_dim

        def dense(shape, axes, name, fan_in):
            return Dense(
                shape,
                axes,
                dt,
                pdt,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(fan_in),
                name=name,
            )

        y = LayerNorm(c.norm_eps, dt, pdt, name="norm")(x)
        y = gelu(checkpoint_name(dense((d,), ("embed", "conv_hidden"), "conv_in", d)(y), "conv_in"))
        y = DepthwiseConv(dt, pdt, c.depthwise, name="dwconv")(y)
        y = gelu(checkpoint_name(y, "dwconv"))
        # squeeze-excite (timm SqueezeExcite): gate each channel by its spatial mean
        s = jnp.mean(y.astype(jnp.float32), axis=(1, 2)).astype(dt)
        s = jax.nn.relu(dense((r,), ("conv_hidden", "se"), "se_reduce", d)(s))
        s = jax.nn.sigmoid(dense((d,), ("se", "conv_hidden"), "se_expand", r)(s))
        y = y * s[:, None, None, :]
        y = dense((d,), ("conv_hidden", "embed"), "conv_out", d)(y)
        y = layerscale(self, y, c.layerscale_init, pdt)
        if self.train and c.drop_path > 0:
            y = drop_path(y, c.drop_path, self.make_rng("drop_path"))
        x = _constrain(x + y, ("batch", "height", "width", "embed"))
        return x, None


class AttentionPool(nn.Module):
    """The class-attention block (Learned_Aggregation_Layer + its LayerScale block):
    the class token's query attends over LN([cls; patches]); then an MLP on the class
    token. Returns (cls [B, D], attention [B, heads, 1 + patches] float32)."""

    config: PatchConvNetConfig

    @nn.compact
    def __call__(self, cls, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        h = c.pool_heads
        hd = c.dim // h
        init = nn.initializers.normal(c.init_std)
        u = jnp.concatenate([cls[:, None, :], x], axis=1)
        u = LayerNorm(c.norm_eps, dt, pdt, name="norm_1")(u)
        # 'pool_heads', not 'heads': the pooling block has one head, which the tensor axis
        # of a mesh cannot split (the ViT's 'heads' -> 'tensor' rule would refuse it)
        axes = ("embed", "pool_heads", "head_dim")
        q = Dense((h, hd), axes, dt, pdt, kernel_init=init, name="q")(u[:, 0])
        k = Dense((h, hd), axes, dt, pdt, kernel_init=init, name="k")(u)
        v = Dense((h, hd), axes, dt, pdt, kernel_init=init, name="v")(u)
        scale = jnp.asarray(hd**-0.5, dt)
        scores = jnp.einsum("bhd,bkhd->bhk", q * scale, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhk,bkhd->bhd", probs.astype(dt), v)
        proj_axes = ("pool_heads", "head_dim", "embed")
        y = Dense((c.dim,), proj_axes, dt, pdt, n_in=2, kernel_init=init, name="proj")(ctx)
        cls = cls + layerscale(self, y, c.layerscale_init, pdt, name="layerscale_1")
        y = LayerNorm(c.norm_eps, dt, pdt, name="norm_2")(cls)
        y = gelu(
            Dense((c.pool_mlp_dim,), ("embed", "mlp"), dt, pdt, kernel_init=init, name="fc1")(y)
        )
        y = Dense((c.dim,), ("mlp", "embed"), dt, pdt, kernel_init=init, name="fc2")(y)
        cls = cls + layerscale(self, y, c.layerscale_init, pdt, name="layerscale_2")
        return cls, probs


class PatchConvNet(nn.Module):
    """``PatchConvNet(config).apply({'params': p}, images, train=False,
    return_attention=False)``: float32 logits [B, num_classes] (pooled features [B, D] when
    num_classes=0), or with ``return_attention`` ``(logits, attention)`` where attention
    [B, pool_heads, 1 + patches] is the class token's pooling attention over [cls; patches]
    (patch i at column 1 + i, row-major on the h x w grid). ``train=True`` turns on
    stochastic depth in the trunk (rngs={'drop_path': key}).
    """

    config: PatchConvNetConfig

    @nn.compact
    def __call__(self, images, train: bool = False, return_attention: bool = False):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        check_images(images, c.image_size, "PatchConvNet")
        b = images.shape[0]
        x = ConvStem(c, name="stem")(images)
        x = _constrain(x, ("batch", "height", "width", "embed"))
        block = TrunkBlock
        if c.remat_policy != "none":
            block = nn.remat(
                TrunkBlock, policy=remat_policy(c.remat_policy), prevent_cse=not c.scan_blocks
            )
        if c.scan_blocks:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "drop_path": True},
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(c, train, name="blocks")(x, None)
        else:
            for i in range(c.depth):
                x, _ = block(c, train, name=f"blocks_{i}")(x, None)
        x = x.reshape(b, c.num_patches, c.dim)
        init = nn.initializers.normal(c.init_std)
        cls = _param(self, "cls_token", (c.dim,), ("embed",), init, pdt).astype(dt)
        cls, attn = AttentionPool(c, name="pool")(jnp.broadcast_to(cls, (b, c.dim)), x)
        # The official model norms [cls; patches] and reads row 0: only the class token's
        # norm matters (LayerNorm is per token).
        cls = LayerNorm(c.norm_eps, dt, pdt, name="norm")(cls)
        if c.num_classes == 0:
            out = cls.astype(jnp.float32)
        else:
            out = Dense(
                (c.num_classes,),
                ("embed", "classes"),
                dt,
                pdt,
                kernel_init=init,
                output_dtype=jnp.float32,
                name="head",
            )(cls)
        return (out, attn) if return_attention else out
