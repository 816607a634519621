"""One entry to the vision models: a config from a variant name, the module, its size.

    config = model_config("vit_s", image_size=192, drop_path=0.05)
    model = make_model(config)              # ViT or PatchConvNet (flax.linen Module)
    logits = model.apply({"params": params}, images, train=False)
    count_params(config)                    # from shapes only (jax.eval_shape)

Names are the keys of ``VIT_VARIANTS`` (vit_ti, vit_s, vit_m, vit_b, vit_l, vit_h and the
parallel / deep "three things" shapes vit_s_18x2, ...) and ``PATCHCONVNET_VARIANTS``
(patchconvnet_s60 ... patchconvnet_l120).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from herd.vision.patchconvnet import PATCHCONVNET_VARIANTS, PatchConvNet, PatchConvNetConfig
from herd.vision.vit import VIT_VARIANTS, ViT, ViTConfig

__all__ = [
    "MODEL_VARIANTS",
    "VisionConfig",
    "model_config",
    "make_model",
    "count_params",
    "abstract_variables",
]

VisionConfig = ViTConfig | PatchConvNetConfig
MODEL_VARIANTS: tuple[str, ...] = tuple(VIT_VARIANTS) + tuple(PATCHCONVNET_VARIANTS)


def model_config(name: str, **overrides) -> VisionConfig:
    """The config of variant ``name`` with field overrides (validated: an image size not
    divisible by the patch size, an unknown field, ... raise one ValueError)."""
    if name in VIT_VARIANTS:
        cls, base = ViTConfig, VIT_VARIANTS[name]
    elif name in PATCHCONVNET_VARIANTS:
        cls, base = PatchConvNetConfig, PATCHCONVNET_VARIANTS[name]
    else:
        raise ValueError(f"unknown vision model {name!r}; valid: {', '.join(MODEL_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown} for {name!r}; valid: {sorted(fields)}"
        )
    return cls(**{**base, **overrides})


def make_model(config: VisionConfig) -> nn.Module:
    """ViT(config) or PatchConvNet(config)."""
    if isinstance(config, ViTConfig):
        return ViT(config)
    if isinstance(config, PatchConvNetConfig):
        return PatchConvNet(config)
    raise TypeError(
        f"make_model takes a ViTConfig or PatchConvNetConfig, got {type(config).__name__}"
    )


def abstract_variables(config: VisionConfig, batch: int = 1):
    """The model's variables ({'params', maybe 'batch_stats'}) as boxed ShapeDtypeStructs
    (logical axis names kept), from jax.eval_shape: nothing is allocated."""
    images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.float32)
    model = make_model(config)
    return jax.eval_shape(lambda r, x: model.init(r, x), jax.random.PRNGKey(0), images)


def count_params(config: VisionConfig) -> int:
    """Number of trainable parameters (the 'params' collection; BatchNorm running
    statistics excluded, as torch's ``sum(p.numel() for p in model.parameters())``)."""
    params = nn.meta.unbox(abstract_variables(config)["params"])
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
