"""Optimisers, schedules, weight-decay masks and token-weighted gradient accumulation.

The Llama recipe (LLaMA 1 sec. 2.2, Llama 2 sec. 2.2, Llama 3 sec. 3.4.1): AdamW with
beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1, global gradient-norm clipping at 1.0,
linear warmup then cosine decay to 10% of the peak learning rate. Weight decay applies to
every matrix (embeddings and the output head included, as in Meta's code) and not to
norm scales or biases.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "warmup_cosine",
    "make_schedule",
    "decay_mask",
    "make_optimizer",
    "accumulate_gradients",
]

# Params whose path matches this are never decayed (RMSNorm / LayerNorm scales, biases).
DEFAULT_NO_DECAY = r"(^|/)([^/]*norm[^/]*|scale|bias)(/|$)"


def warmup_cosine(
    peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `min_ratio * peak`.

    The cosine ends at `total_steps` and stays at the floor after it.
    """
    warmup_steps = int(max(0, min(warmup_steps, total_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(int(total_steps), warmup_steps + 1),
        end_value=peak_lr * min_ratio,
    )


def make_schedule(optim_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    name = optim_cfg.get("schedule", "warmup_cosine")
    if name == "warmup_cosine":
        return warmup_cosine(
            optim_cfg["lr"],
            optim_cfg["warmup_steps"],
            total_steps,
            optim_cfg.get("min_lr_ratio", 0.1),
        )
    if name == "constant":
        return optax.constant_schedule(optim_cfg["lr"])
    raise ValueError(f"unknown schedule {name!r}; valid: 'warmup_cosine', 'constant'")


def _path_str(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: Any, no_decay: str = DEFAULT_NO_DECAY) -> Any:
    """True for params that get weight decay: arrays with >= 2 dims not matching `no_decay`.

    Works on boxed (nn.LogicallyPartitioned) params too. Scanned norm scales are 2-D
    ([layers, dim]), which is why the rule is by name and not only by rank.
    """
    pattern = re.compile(no_decay)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: bool(jnp.ndim(x) >= 2 and not pattern.search(_path_str(path))),
        params,
    )


def make_optimizer(
    optim_cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the Llama recipe from `cfg.optim`; returns (optimizer, lr schedule).

    Fields: lr, warmup_steps, min_lr_ratio (0.1), b1 (0.9), b2 (0.95), eps (1e-5),
    weight_decay (0.1), clip_norm (1.0; 0 = off), no_decay (regex), schedule.
    """
    schedule = make_schedule(optim_cfg, total_steps)
    no_decay = optim_cfg.get("no_decay", DEFAULT_NO_DECAY)
    parts = []
    clip = optim_cfg.get("clip_norm", 1.0)
    if clip:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=optim_cfg.get("b1", 0.9),
            b2=optim_cfg.get("b2", 0.95),
            eps=optim_cfg.get("eps", 1e-5),
            weight_decay=optim_cfg.get("weight_decay", 0.1),
            mask=lambda p: decay_mask(p, no_decay),
        )
    )
    return optax.chain(*parts), schedule


def _split_microbatches(batch: Any, n: int, constrain: Callable | None) -> Any:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...

    Strided rather than contiguous: each device's block of rows holds an equal share of
    every microbatch, so splitting needs no communication when B is sharded.
    """

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum_steps {n}")
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(y) if constrain is not None else y

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array]],
    params: Any,
    batch: Any,
    n_microbatches: int = 1,
    constrain_microbatch: Callable | None = None,
):
    """Token-weighted gradient of `loss_fn` over `batch`, in `n_microbatches` pieces.

    `loss_fn(params, microbatch) -> (sum_nll, n_tokens)`. The sums and their gradients are
    added over the microbatches and divided once by the total token count, so the result
    equals one big batch exactly (up to float summation order) even when microbatches hold
    different numbers of real tokens. Returns (mean loss, grads, total tokens).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n_microbatches == 1:
        (sum_loss, n_tokens), grads = grad_fn(params, batch)
    else:
        micro = _split_microbatches(batch, n_microbatches, constrain_microbatch)

        def body(carry, mb):
            acc_loss, acc_tokens, acc_grads = carry
            (loss, tokens), grads = grad_fn(params, mb)
            acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)
            return (acc_loss + loss, acc_tokens + tokens, acc_grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (sum_loss, n_tokens, grads), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(n_tokens.astype(jnp.float32), 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return sum_loss / denom, grads, n_tokens
