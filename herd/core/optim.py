"""Optimisers, schedules and parameter masks (gradient accumulation: herd.core.step).

Domain-free: every trainer builds its optimiser here from a config mapping with
`make_optimizer(optim_cfg, total_steps, steps_per_epoch=None) -> (tx, schedule)`.

- 'adamw', the Llama recipe (LLaMA 1 sec. 2.2, Llama 2 sec. 2.2, Llama 3 sec. 3.4.1):
  beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1,
  global gradient-norm clipping at 1.0, linear warmup from 0 then cosine to 10% of the
  peak. Decay applies to every matrix (embeddings and output head included, as in Meta's
  code) and not to norm scales or biases. Preset: `LLAMA_ADAMW`.
- 'lamb', the DeiT III recipe (Touvron et al. 2022, "DeiT III: Revenge of the ViT",
  Table 1, ImageNet-1k; the official code uses timm's `Lamb`). Preset: `DEIT3_LAMB`.
- 'sgd': momentum (PyTorch semantics, optional Nesterov), weight decay coupled as L2.

Masks and rules are regexes searched in '/'-joined parameter paths ('blocks_3/attn/qkv/
kernel'): `no_decay` (plus the rank rule: 1-D params are never decayed), `frozen` or
`trainable` (frozen params get exactly-zero updates and no optimiser state), `lr_scales`
(per-parameter learning-rate multipliers, first match wins; see `vit_layer_decay`).

Bad input raises ValueError naming the key or regex: unknown config keys, optimiser or
schedule names when `make_optimizer` runs; `frozen` / `trainable` / `lr_scales` regexes
that match no parameter when the optimiser's `init` first sees the params (our trainers
call it inside jax.eval_shape, before anything compiles) or earlier via `validate`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "DEFAULT_NO_DECAY",
    "DEIT3_NO_DECAY",
    "LLAMA_ADAMW",
    "DEIT3_LAMB",
    "preset",
    "warmup_cosine",
    "make_schedule",
    "decay_mask",
    "frozen_mask",
    "lamb",
    "scale_by_lr_rules",
    "vit_layer_decay",
    "validate",
    "make_optimizer",
]

# Params whose path matches this are never decayed (RMSNorm / LayerNorm scales, biases).
DEFAULT_NO_DECAY = r"(^|/)([^/]*norm[^/]*|scale|bias)(/|$)"
# DeiT III adds the position embedding and the class / distillation token (the models'
# `no_weight_decay()` in the official code); LayerScale gammas are 1-D, so the rank rule.
DEIT3_NO_DECAY = r"(^|/)(pos_embed|cls_token|dist_token|[^/]*norm[^/]*|scale|bias)(/|$)"

# LLaMA 1 / Llama 2 sec. 2.2, Llama 3 sec. 3.4.1 (peak lr of the 7B/8B/13B models).
LLAMA_ADAMW = dict(
    optimizer="adamw",
    schedule="warmup_cosine",
    lr=3e-4,
    warmup_steps=2000,
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-5,
    weight_decay=0.1,
    clip_norm=1.0,
)

# DeiT III Table 1, ImageNet-1k recipe (batch 2048): LAMB, lr 3e-3 (B/L/H; S uses
# 4e-3), wd 0.05, global clip 1.0, 5 warmup epochs from 1e-6, per-epoch cosine to 1e-5.
# The cosine clock starts at epoch 0 (timm's CosineLRScheduler, warmup_prefix=False).
# betas are timm Lamb's defaults; eps 1e-8 is the DeiT code's --opt-eps default (verify).
DEIT3_LAMB = dict(
    optimizer="lamb",
    schedule="warmup_cosine",
    lr=3e-3,
    warmup_epochs=5,
    start_lr=1e-6,
    min_lr=1e-5,
    per_epoch=True,
    warmup_prefix=False,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    clip_norm=1.0,
    no_decay=DEIT3_NO_DECAY,
)

_PRESETS = {"llama": LLAMA_ADAMW, "deit3": DEIT3_LAMB}


def preset(name: str, **overrides) -> dict:
    """A fresh copy of a named recipe ('llama', 'deit3') with `overrides` applied."""
    if name not in _PRESETS:
        raise ValueError(f"unknown optimiser preset {name!r}; valid: {sorted(_PRESETS)}")
    return {**_PRESETS[name], **overrides}


# ------------------------------------------------------------------------- schedules


def warmup_cosine(
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.1,
    *,
    start_lr: float = 0.0,
    min_lr: float | None = None,
    warmup_prefix: bool = True,
    steps_per_epoch: int | None = None,
) -> optax.Schedule:
    """Linear warmup `start_lr` -> peak over `warmup_steps`, then cosine to the floor.

    The floor is `min_lr` if given, else `min_ratio * peak_lr`. The cosine ends at
    `total_steps` and stays at the floor after it. `warmup_prefix=True` (Llama): the cosine
    runs from the end of the warmup to `total_steps`. False (timm's CosineLRScheduler
    default, as in DeiT III): the cosine clock starts at step 0 and the warmup replaces
    its first steps. `steps_per_epoch`: the lr changes only at epoch boundaries (timm's
    epoch-based scheduler), lr(step) = f(epoch start).
    """
    warmup_steps = int(max(0, min(warmup_steps, total_steps)))
    floor = peak_lr * min_ratio if min_lr is None else min_lr
    if warmup_prefix and start_lr == 0.0:
        # The Llama schedule: optax's, kept as it was so existing runs stay bit-identical.
        sched = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak_lr,
            warmup_steps=warmup_steps,
            decay_steps=max(int(total_steps), warmup_steps + 1),
            end_value=floor,
        )
    else:
        # Written out as timm does it: start + t * slope is exact at t = 0, where optax's
        # (start - peak) * (1 - t / w) + peak loses a tiny start (1e-6) to float32 rounding.
        cos_start = warmup_steps if warmup_prefix else 0
        cos_len = max(int(total_steps) - cos_start, 1)

        def sched(step):
            t = jnp.asarray(step, jnp.float32)
            warm = start_lr + (peak_lr - start_lr) * t / max(warmup_steps, 1)
            frac = jnp.clip((t - cos_start) / cos_len, 0.0, 1.0)
            cosine = floor + 0.5 * (peak_lr - floor) * (1.0 + jnp.cos(jnp.pi * frac))
            return jnp.where(t < warmup_steps, warm, cosine)

    if steps_per_epoch:
        spe = int(steps_per_epoch)
        per_step = sched
        return lambda step: per_step(spe * (step // spe))
    return sched


SCHEDULES = ("warmup_cosine", "constant")


def _opt(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """cfg[key], with None meaning 'the default' (configs use None for 'family value')."""
    value = cfg.get(key)
    return default if value is None else value


def _warmup_steps(cfg: Mapping[str, Any], steps_per_epoch: int | None) -> int:
    if cfg.get("warmup_epochs") is not None:
        if cfg.get("warmup_steps") is not None:
            raise ValueError("optim sets both warmup_steps and warmup_epochs; set one")
        if not steps_per_epoch:
            raise ValueError("optim.warmup_epochs needs steps_per_epoch in make_optimizer")
        return int(round(cfg["warmup_epochs"] * steps_per_epoch))
    return int(_opt(cfg, "warmup_steps", 0))


def make_schedule(
    optim_cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int | None = None
) -> optax.Schedule:
    """The lr schedule of `optim_cfg`.

    Fields: schedule ('warmup_cosine' | 'constant'), lr, warmup_steps or warmup_epochs,
    start_lr (start of the warmup, 0; timm: warmup_lr), min_lr (absolute) or min_lr_ratio (0.1),
    warmup_prefix (True), per_epoch (False; needs steps_per_epoch).
    """
    name = _opt(optim_cfg, "schedule", "warmup_cosine")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(map(repr, SCHEDULES))}")
    if optim_cfg.get("lr") is None:
        raise ValueError("optim.lr is not set")
    if name == "constant":
        return optax.constant_schedule(optim_cfg["lr"])
    if optim_cfg.get("min_lr") is not None and optim_cfg.get("min_lr_ratio") is not None:
        raise ValueError("optim sets both min_lr and min_lr_ratio; set one")
    per_epoch = bool(optim_cfg.get("per_epoch", False))
    if per_epoch and not steps_per_epoch:
        raise ValueError("optim.per_epoch is set but make_optimizer got no steps_per_epoch")
    return warmup_cosine(
        optim_cfg["lr"],
        _warmup_steps(optim_cfg, steps_per_epoch),
        total_steps,
        _opt(optim_cfg, "min_lr_ratio", 0.1),
        start_lr=_opt(optim_cfg, "start_lr", 0.0),
        min_lr=optim_cfg.get("min_lr"),
        warmup_prefix=_opt(optim_cfg, "warmup_prefix", True),
        steps_per_epoch=steps_per_epoch if per_epoch else None,
    )


# ----------------------------------------------------------------------------- masks


def _path_str(path) -> str:
    """'/'-joined dict keys / sequence indices. Attribute steps (the `.value` inside a
    flax LogicallyPartitioned box) are left out, so boxed and plain trees name alike."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            continue
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def _param_paths(params: Any) -> list[str]:
    return [_path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def _search(pattern: str | None) -> Callable[[str], bool]:
    if not pattern:
        return lambda name: False
    return re.compile(pattern).search


def decay_mask(params: Any, no_decay: str = DEFAULT_NO_DECAY, stacked: str | None = None) -> Any:
    """True for params that get weight decay: arrays with >= 2 dims not matching `no_decay`.

    Works on boxed (nn.LogicallyPartitioned) params too. Scanned norm scales are 2-D
    ([layers, dim]), which is why the rule is by name and not only by rank; params matching
    `stacked` (nn.scan stacks) have their leading layer axis left out of the rank.
    """
    skip, is_stacked = _search(no_decay), _search(stacked)

    def rule(path, x):
        name = _path_str(path)
        return bool(jnp.ndim(x) - int(bool(is_stacked(name))) >= 2 and not skip(name))

    return jax.tree_util.tree_map_with_path(rule, params)


def frozen_mask(params: Any, frozen: str | None = None, trainable: str | None = None) -> Any:
    """True for frozen params: those matching `frozen`, or (if given) not matching `trainable`.

    Attention-only fine-tuning ("Three things everyone should know about Vision
    Transformers", Touvron et al. 2022, the second thing):
    trainable=r'(^|/)(attn|head|pos_embed)(/|$)'.
    """
    is_frozen, is_trainable = _search(frozen), _search(trainable)

    def rule(path, _):
        name = _path_str(path)
        return bool(is_frozen(name) or (trainable is not None and not is_trainable(name)))

    return jax.tree_util.tree_map_with_path(rule, params)


# --------------------------------------------------------------- per-parameter lr scale


def _rule_scale(rules, name: str, x) -> Any:
    """The first matching rule's scale for `x`, or None. A 1-D scale is per slice of the
    leading axis (one lr per layer of an nn.scan stack)."""
    for pattern, scale in rules:
        if pattern.search(name):
            scale = np.asarray(scale, np.float32)
            if scale.ndim == 0:
                return jnp.asarray(scale, x.dtype)
            if scale.ndim != 1 or jnp.ndim(x) < 1 or scale.shape[0] != x.shape[0]:
                raise ValueError(
                    f"lr_scales rule {pattern.pattern!r}: scale of shape {scale.shape} does "
                    f"not fit param {name!r} of shape {tuple(x.shape)} (want a number or one "
                    "value per slice of the leading axis)"
                )
            return jnp.asarray(scale, x.dtype).reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
    return None


def scale_by_lr_rules(rules: Sequence[tuple[str, Any]]) -> optax.GradientTransformation:
    """Multiplies each update by the scale of the first rule (regex, scale) its path matches.

    Applied last, after the learning rate, which is what a per-group lr multiplier does in
    PyTorch for AdamW / LAMB (decoupled decay is scaled too) and momentum SGD.
    """
    compiled = [(re.compile(pattern), scale) for pattern, scale in rules]

    def update(updates, state, params=None):
        del params

        def one(path, u):
            scale = _rule_scale(compiled, _path_str(path), u)
            return u if scale is None else u * scale

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def vit_layer_decay(
    n_layers: int,
    decay: float,
    *,
    block: str = r"(^|/)blocks_{i}/",
    embed: str = r"(^|/)(patch_embed|stem|pos_embed|cls_token|dist_token|reg_token)(/|$)",
    scanned: str | None = None,
) -> list[tuple[str, Any]]:
    """`lr_scales` rules for layer-wise lr decay of a ViT with `n_layers` blocks (BEiT / timm).

    Layer ids: 0 the embeddings, i + 1 block i, n_layers + 1 everything after (final norm,
    head). scale = decay ** (n_layers + 1 - layer_id): the head trains at the full lr,
    block i at decay ** (n_layers - i), the embeddings at decay ** (n_layers + 1).
    `block` is formatted with i; `scanned` instead names the one nn.scan stack of all
    blocks, which gets a per-layer vector of scales.
    """
    rules: list[tuple[str, Any]] = [(embed, decay ** (n_layers + 1))]
    if scanned is not None:
        rules.append((scanned, np.asarray([decay ** (n_layers - i) for i in range(n_layers)])))
    else:
        rules += [(block.format(i=i), decay ** (n_layers - i)) for i in range(n_layers)]
    return rules


# ------------------------------------------------------------------------------ LAMB


def _trust_ratio(stacked: str | None) -> optax.GradientTransformation:
    """optax's trust ratio ||p|| / ||u|| (1 when either is 0) applied per tensor; for an
    nn.scan stack per layer slice (vmap over the leading axis), as timm sees one tensor per
    layer. optax's scale_by_trust_ratio alone would take one norm over the whole stack."""
    rule, is_stacked = optax.scale_by_trust_ratio(), _search(stacked)

    def one(u, p):
        return rule.update(u, optax.EmptyState(), p)[0]

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def leaf(path, u, p):
            return (jax.vmap(one) if is_stacked(_path_str(path)) else one)(u, p)

        return jax.tree_util.tree_map_with_path(leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    decay: Any = decay_mask,
    always_adapt: bool = False,
    stacked: str | None = None,
) -> optax.GradientTransformation:
    """LAMB as timm's `Lamb` (used by the DeiT III code); defaults are timm's.

    Per step: clip the global gradient norm of the whole tree to `clip_norm` (timm's
    max_grad_norm); Adam moments with bias correction (grad averaging); add
    `weight_decay * p` to the params `decay` selects (a mask tree or a callable); scale
    each such update by ||p|| / ||update|| (1 if either norm is 0); multiply by -lr.
    timm uses the trust ratio only for groups with weight_decay != 0, so the no-decay
    params (1-D, pos-emb, class token in DeiT III) take plain Adam steps, unless
    `always_adapt`. optax's `lamb` instead adapts every param, hence this chain.
    """
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay))
    if always_adapt:
        parts.append(_trust_ratio(stacked))
    elif weight_decay:
        parts.append(optax.masked(_trust_ratio(stacked), decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# ------------------------------------------------------------------------ optimisers

_COMMON_KEYS = set(
    "optimizer name schedule lr warmup_steps warmup_epochs start_lr min_lr min_lr_ratio "
    "warmup_prefix per_epoch weight_decay clip_norm no_decay stacked frozen trainable "
    "lr_scales".split()
)
# Per-optimiser defaults: AdamW the Llama recipe (today's numbers), LAMB timm's Lamb,
# SGD PyTorch's with momentum 0.9 and no decay.
_DEFAULTS = {
    "adamw": dict(b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0),
    "lamb": dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_norm=1.0, always_adapt=False),
    "sgd": dict(momentum=0.9, nesterov=False, weight_decay=0.0, clip_norm=0.0),
}
OPTIMIZERS = tuple(_DEFAULTS)


def _optimizer_name(optim_cfg: Mapping[str, Any]) -> str:
    names = {optim_cfg.get(k) for k in ("optimizer", "name")} - {None}
    if len(names) > 1:
        raise ValueError(f"optim.optimizer and optim.name disagree: {sorted(names)}")
    name = names.pop() if names else "adamw"
    if name not in _DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(map(repr, OPTIMIZERS))}")
    unknown = sorted(set(optim_cfg) - _COMMON_KEYS - set(_DEFAULTS[name]))
    if unknown:
        valid = sorted(_COMMON_KEYS | set(_DEFAULTS[name]))
        raise ValueError(f"unknown optim keys {unknown} for {name!r}; valid: {valid}")
    return name


def validate(optim_cfg: Mapping[str, Any], params: Any) -> None:
    """Raises ValueError if a frozen / trainable / lr_scales regex matches no parameter.

    `make_optimizer`'s optimiser runs this in its `init`; call it directly to fail earlier.
    Works on abstract (jax.eval_shape) and boxed params.
    """
    paths = _param_paths(params)
    sample = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    for key in ("frozen", "trainable"):
        pattern = optim_cfg.get(key)
        if pattern and not any(re.search(pattern, p) for p in paths):
            raise ValueError(f"optim.{key} regex {pattern!r} matches no parameter ({sample})")
    for pattern, _ in optim_cfg.get("lr_scales") or ():
        if not any(re.search(pattern, p) for p in paths):
            raise ValueError(f"optim.lr_scales regex {pattern!r} matches no parameter ({sample})")
    if optim_cfg.get("trainable") and all(
        jax.tree.leaves(frozen_mask(params, optim_cfg.get("frozen"), optim_cfg["trainable"]))
    ):
        raise ValueError("optim.frozen / optim.trainable leave no parameter to train")


def make_optimizer(
    optim_cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser `optim_cfg` describes; returns (optimizer, lr schedule).

    Fields: optimizer or name ('adamw' | 'lamb' | 'sgd'; default 'adamw'); schedule fields
    (see `make_schedule`); weight_decay, clip_norm (0 = off), no_decay (regex;
    DEFAULT_NO_DECAY), stacked (regex of nn.scan stacks: rank rule and LAMB trust ratio per
    layer); frozen / trainable (regexes); lr_scales ([(regex, scale), ...]).
    adamw: b1, b2, eps. lamb: b1, b2, eps, always_adapt. sgd: momentum, nesterov.
    Defaults: `_DEFAULTS` (AdamW = the Llama recipe). None means the default.
    """
    name = _optimizer_name(optim_cfg)
    schedule = make_schedule(optim_cfg, total_steps, steps_per_epoch)
    hp = {k: _opt(optim_cfg, k, v) for k, v in _DEFAULTS[name].items()}
    no_decay, stacked = _opt(optim_cfg, "no_decay", DEFAULT_NO_DECAY), optim_cfg.get("stacked")

    def decay(p):
        return decay_mask(p, no_decay, stacked)

    clip = [optax.clip_by_global_norm(hp["clip_norm"])] if hp["clip_norm"] else []
    if name == "adamw":
        # Exactly the construction the Llama trainer has always used (bitwise: tested).
        tx = optax.chain(
            *clip,
            optax.adamw(
                learning_rate=schedule,
                b1=hp["b1"],
                b2=hp["b2"],
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                mask=decay,
            ),
        )
    elif name == "lamb":
        tx = lamb(schedule, decay=decay, stacked=stacked, **hp)
    else:
        # PyTorch SGD: weight decay is L2 added to the gradient before the momentum.
        wd = hp["weight_decay"]
        wd = [optax.add_decayed_weights(wd, mask=decay)] if wd else []
        tx = optax.chain(*clip, *wd, optax.sgd(schedule, hp["momentum"] or None, hp["nesterov"]))

    if optim_cfg.get("lr_scales"):
        tx = optax.chain(tx, scale_by_lr_rules(optim_cfg["lr_scales"]))
    frozen, trainable = optim_cfg.get("frozen"), optim_cfg.get("trainable")
    if frozen or trainable:
        # Frozen params get exact zeros and, through the mask, no state; the clip norm and
        # everything else see only the trainable ones (as PyTorch with requires_grad=False).
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda p: jax.tree.map(
                lambda f: "frozen" if f else "train", frozen_mask(p, frozen, trainable)
            ),
        )
    if frozen or trainable or optim_cfg.get("lr_scales"):
        inner = tx

        def init(params):
            validate(optim_cfg, params)
            return inner.init(params)

        tx = optax.GradientTransformationExtraArgs(init, inner.update)
    return tx, schedule
