"""Seeded, non-trivial weights and images for the timm parity tests, in pure numpy.

The golden files ``tests/golden/vision_<model>.npz`` (made by tools/make_golden_vision.py
with a real timm model) store no weights: they store the timm state dict's entry list
(``entries_json``: ``[name, shape]`` in timm's order) and a ``seed``. Both timm (when the
golden file is made) and herd's tests (without torch) rebuild the same weights with
:func:`seeded_state_dict` and the same input images with :func:`golden_images`, so a
converter ``from_timm(seeded_state_dict(entries, seed), model)`` must reproduce the stored
timm logits.

Why the distributions are what they are: timm initialises LayerScale gammas to 1e-6 / 1e-5 /
1e-4 (DeiT III: 1e-4 for ViT-S/B; the 18x2 models 1e-5) and LayerNorms to weight 1, bias 0.
At those values the residual branches and the norm affine parameters barely move the logits,
so a converter that dropped them, swapped ``ls1`` with ``ls2`` or misplaced a norm would still
"match". Here every gamma is O(0.3) with per-channel spread and mixed signs, every norm weight
is ``1 + 0.1 * normal`` and every norm bias ``0.1 * normal``. Linear / conv weights are
``normal / sqrt(fan_in)`` so the attention maps are far from uniform (see
:func:`seeded_state_dict` for every rule).

Determinism: entry ``i`` draws from ``np.random.default_rng([seed, i])`` (numpy's PCG64 and
its normal sampler are bit-stable across platforms), in float64, then casts to float32. The
images draw from ``np.random.default_rng([seed, IMAGE_STREAM])``. The golden files also store
the SHA-256 of the state dict and of the images (:func:`state_dict_sha256`), so a numpy
release that changed these streams would fail loudly instead of looking like a model bug.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np

#: Stream index of the images; far above any entry index (timm ViTs have < 1000 entries).
IMAGE_STREAM = 0xFFFF_FFFF

#: Std of a linear / conv weight times sqrt(fan_in): outputs have ~unit scale per unit input.
WEIGHT_GAIN = 1.0
#: Std of linear / conv biases.
BIAS_STD = 0.02
#: Std of position embeddings, class and register tokens (timm's trunc_normal(std=.02) init).
TOKEN_STD = 0.02
#: Norm weights are 1 + NORM_STD * normal, norm biases NORM_STD * normal.
NORM_STD = 0.1
#: LayerScale gammas are LAYERSCALE_STD * normal (timm inits them to 1e-6..1e-4).
LAYERSCALE_STD = 0.3

_TOKEN_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")


def _kind(name: str, shape: tuple[int, ...]) -> str:
    """What a timm state-dict entry is, from its name and shape (see the rules in the table of
    :func:`seeded_state_dict`)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _TOKEN_NAMES:
        return "token"
    if leaf == "gamma":  # timm LayerScale: blocks.i.ls1.gamma, blocks.i.attns.j.ls.gamma, ...
        return "layerscale"
    if leaf in ("running_mean", "running_var", "num_batches_tracked"):  # BatchNorm buffers
        return leaf
    if leaf == "weight" and len(shape) >= 2:
        return "weight"
    if leaf == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm / GroupNorm scale
        return "norm_weight"
    if leaf == "bias" and len(shape) == 1:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        return "norm_bias" if "norm" in module or module.startswith("bn") else "bias"
    raise ValueError(
        f"seeded_state_dict: no rule for entry {name!r} with shape {shape}; known kinds: "
        f"tokens {_TOKEN_NAMES}, '*.gamma' (LayerScale), '*.weight' (>= 2-D: linear/conv, "
        "1-D: norm scale), '*.bias' (1-D), BatchNorm running_mean/running_var/"
        "num_batches_tracked"
    )


def _draw(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "num_batches_tracked":
        return np.zeros(shape, np.int64)
    z = rng.standard_normal(shape)  # float64, then cast: one well-defined stream per entry
    if kind == "weight":
        fan_in = math.prod(shape[1:])  # torch layout: [out, in] or [out, in, kh, kw]
        out = (WEIGHT_GAIN / math.sqrt(fan_in)) * z
    elif kind == "bias":
        out = BIAS_STD * z
    elif kind == "token":
        out = TOKEN_STD * z
    elif kind == "norm_weight":
        out = 1.0 + NORM_STD * z
    elif kind == "norm_bias":
        out = NORM_STD * z
    elif kind == "layerscale":
        out = LAYERSCALE_STD * z
    elif kind == "running_mean":
        out = NORM_STD * z
    elif kind == "running_var":
        out = 1.0 + NORM_STD * np.abs(z)
    else:  # pragma: no cover - _kind only returns the kinds above
        raise AssertionError(kind)
    return out.astype(np.float32)


def entry_kinds(entries: Iterable[Sequence]) -> dict[str, str]:
    """name -> kind ('weight', 'bias', 'token', 'norm_weight', 'norm_bias', 'layerscale', or a
    BatchNorm buffer name) for each ``(name, shape)`` entry."""
    return {str(name): _kind(str(name), tuple(int(d) for d in shape)) for name, shape in entries}


def seeded_state_dict(entries: Iterable[Sequence], seed: int) -> dict[str, np.ndarray]:
    """A timm-layout state dict (torch layouts, float32 numpy arrays) with seeded values.

    ``entries``: ``(name, shape)`` pairs in timm's ``state_dict()`` order (the golden files'
    ``entries_json``). Entry ``i`` draws ``z ~ normal`` of its shape from
    ``np.random.default_rng([seed, i])`` and becomes, by kind:

    ========================================  =========================================
    kind (from the name)                      value
    ========================================  =========================================
    ``*.weight`` with >= 2 dims (linear,      ``WEIGHT_GAIN / sqrt(fan_in) * z``
    conv; fan_in = prod(shape[1:]))
    ``*.bias`` (not of a norm)                ``BIAS_STD * z`` (0.02)
    ``cls_token``, ``pos_embed``,             ``TOKEN_STD * z`` (0.02)
    ``reg_token``, ``dist_token``
    ``*.weight`` 1-D (LayerNorm, BatchNorm)   ``1 + NORM_STD * z`` (0.1)
    ``*.bias`` of a ``*norm*`` / ``bn*``      ``NORM_STD * z``
    module
    ``*.gamma`` (LayerScale ``ls1``,          ``LAYERSCALE_STD * z`` (0.3)
    ``ls2``, ``attns.j.ls``, ``ffns.j.ls``)
    BatchNorm ``running_mean`` /              ``0.1 * z`` / ``1 + 0.1 * |z|`` /
    ``running_var`` / ``num_batches_tracked`` ``0`` (int64)
    ========================================  =========================================

    Linear weights scale as 1/sqrt(fan_in) rather than timm's fixed trunc_normal(0.02) so that
    attention logits are O(1) and the attention maps far from uniform: with near-uniform
    attention, a converter that swapped q and k or mis-split heads would change the logits by
    less than the test's tolerance.

    An unknown entry name raises ValueError (before any drawing).
    """
    entries = [(str(name), tuple(int(d) for d in shape)) for name, shape in entries]
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seeded_state_dict: seed must be >= 0, got {seed}")
    kinds = [_kind(name, shape) for name, shape in entries]
    out: dict[str, np.ndarray] = {}
    for i, ((name, shape), kind) in enumerate(zip(entries, kinds, strict=True)):
        if name in out:
            raise ValueError(f"seeded_state_dict: entry {name!r} appears twice")
        out[name] = _draw(kind, shape, np.random.default_rng([seed, i]))
    return out


def golden_images(seed: int, n: int = 2, size: int = 224) -> np.ndarray:
    """``n`` float32 NHWC images [n, size, size, 3] in normalised-image range (what herd's
    model takes; timm takes ``images.transpose(0, 3, 1, 2)``).

    Each image is a smooth random field (a coarse 14x14 grid of normal values, upsampled by
    nearest-neighbour repetition and blended) plus pixel noise, so patches differ from each
    other like those of real images do, rather than being i.i.d. noise.
    """
    seed, n, size = int(seed), int(n), int(size)
    if seed < 0 or n < 1 or size < 1:
        raise ValueError(
            f"golden_images: need seed >= 0, n >= 1, size >= 1; got {seed}, {n}, {size}"
        )
    rng = np.random.default_rng([seed, IMAGE_STREAM])
    coarse = rng.standard_normal((n, 14, 14, 3))
    reps = -(-size // 14)
    smooth = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size]
    noise = rng.standard_normal((n, size, size, 3))
    return (0.8 * smooth + 0.6 * noise).astype(np.float32)


def state_dict_sha256(state_dict: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, in its order."""
    h = hashlib.sha256()
    for name, value in state_dict.items():
        value = np.ascontiguousarray(value)
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(array.tobytes())
    return h.hexdigest()
