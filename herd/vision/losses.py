"""Classification losses of the DeiT III line, per image, in float32.

Every function returns one loss per image ([B]); the trainer sums them (the core step
contract divides the sum by the image count once), so microbatches add up exactly.

- `binary_cross_entropy`: sigmoid BCE averaged over the classes, as PyTorch's
  `BCEWithLogitsLoss()` (mean reduction over batch x classes) that the DeiT III code uses.
- `binarize_targets`: DeiT III trains with `--bce-loss`, which turns the mixup / cutmix
  soft targets into multi-hot ones: `targets.gt(0.0)` (DeiT III, Touvron et al. 2022,
  sec. 3 "Binary Cross Entropy"; the official engine.py). Both mixed classes become 1.
- `cross_entropy`: softmax CE against integer labels or soft targets, with label
  smoothing (the fine-tuning recipe and the IN-21k one use CE; fine-tuning at 224 uses
  smoothing 0.1, DeiT III Table 1 / sec. 4.2).
- `cosub_loss`: co-training of two stochastic-depth submodels on the same (mixed) batch
  (cosub, Touvron et al. 2022, "Co-training 2L submodels for visual recognition", eq. 2;
  the official code's `0.25 * (criterion(z1, y) + criterion(z2, y) + criterion(z1,
  z2.detach().sigmoid()) + criterion(z2, z1.detach().sigmoid()))`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "LOSSES",
    "binarize_targets",
    "one_hot_targets",
    "binary_cross_entropy",
    "cross_entropy",
    "cosub_loss",
    "classification_loss",
]

LOSSES = ("bce", "ce")


def binarize_targets(targets: jax.Array) -> jax.Array:
    """Mixed (soft) targets -> multi-hot: 1 where a target is > 0, else 0 (DeiT III)."""
    return (targets > 0).astype(jnp.float32)


def one_hot_targets(labels: jax.Array, num_classes: int) -> jax.Array:
    """Integer labels [B] -> float32 one-hot targets [B, num_classes]."""
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _as_targets(targets: jax.Array, num_classes: int) -> jax.Array:
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return one_hot_targets(targets, num_classes)
    return targets.astype(jnp.float32)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-image sigmoid BCE [B], averaged over the classes.

    `targets` are probabilities in [0, 1] of shape [B, C] (or integer labels [B], taken
    one-hot). Written in the numerically stable form of PyTorch's BCEWithLogitsLoss:
    max(z, 0) - z * y + log(1 + exp(-|z|)).
    """
    z = logits.astype(jnp.float32)
    y = _as_targets(targets, z.shape[-1])
    per_class = jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return jnp.mean(per_class, axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-image softmax cross-entropy [B] against labels [B] or soft targets [B, C].

    Label smoothing mixes the targets with the uniform distribution:
    (1 - eps) * y + eps / C (timm's LabelSmoothingCrossEntropy for labels). Targets that
    mixup already smoothed should come with `label_smoothing=0`.
    """
    z = logits.astype(jnp.float32)
    n_classes = z.shape[-1]
    y = _as_targets(targets, n_classes)
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + label_smoothing / n_classes
    return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)


def cosub_loss(logits_1: jax.Array, logits_2: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-image cosub loss [B] of two submodels' logits on the same images.

    0.25 [BCE(z1, y) + BCE(z2, y) + BCE(z1, sg(sigmoid z2)) + BCE(z2, sg(sigmoid z1))]:
    each submodel learns from the targets and from the other one's (stopped) prediction,
    so the gradient of a cross term flows only into the logits that are not detached.
    `targets` as given (the trainer binarises mixed targets first, as DeiT III's BCE does).
    """
    teacher_2 = jax.lax.stop_gradient(jax.nn.sigmoid(logits_2.astype(jnp.float32)))
    teacher_1 = jax.lax.stop_gradient(jax.nn.sigmoid(logits_1.astype(jnp.float32)))
    return 0.25 * (
        binary_cross_entropy(logits_1, targets)
        + binary_cross_entropy(logits_2, targets)
        + binary_cross_entropy(logits_1, teacher_2)
        + binary_cross_entropy(logits_2, teacher_1)
    )


def classification_loss(
    logits: jax.Array,
    targets: jax.Array,
    loss: str = "bce",
    *,
    label_smoothing: float = 0.0,
    binarize: bool = True,
) -> jax.Array:
    """Per-image loss [B] by name: 'bce' (targets binarised if `binarize`) or 'ce'."""
    if loss == "bce":
        y = _as_targets(targets, logits.shape[-1])
        return binary_cross_entropy(logits, binarize_targets(y) if binarize else y)
    if loss == "ce":
        return cross_entropy(logits, targets, label_smoothing)
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(map(repr, LOSSES))}")
