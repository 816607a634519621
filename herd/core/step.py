"""The train step every domain shares: its contract, gradient accumulation, mesh plumbing.

A domain writes one function,

    loss_fn(params, batch, rng, extra) -> (loss_sum, weight, aux)

`loss_sum` is the summed loss of the batch and `weight` what it is a sum over (tokens for
a language model, images for a classifier), so microbatches of unequal weight add up to
exactly the big batch. `rng` is this microbatch's own key (drop-path, mixup and cosub
need one). `extra` is the state's optional non-trained collection (batch statistics,
EMA params, ...); `aux` is a dict of scalar metrics that are summed over microbatches,
and if it holds the key 'extra', that is the collection's new value (threaded through the
microbatches in order, as running batch statistics are).

    step = make_train_step(loss_fn, optimizer, mesh=mesh, state_shardings=sh,
                           batch_shardings=bsh, rules=rules, grad_accum_steps=4)
    state, metrics = step(state, batch)      # metrics: loss, grad_norm, weight, aux...

The step is jitted once with explicit in/out shardings and the state donated, and runs
with the mesh and the logical axis rules in context (MeshCall).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from herd.core import mesh as mesh_lib
from herd.core.loop import TrainState

__all__ = [
    "MeshCall",
    "accumulate_gradients",
    "step_rng",
    "make_train_step",
    "make_eval_step",
    "init_or_restore",
]


class MeshCall:
    """Calls a jitted function with the mesh and the logical axis rules in context.

    The contexts matter at trace time: they turn the model's logical constraints into
    sharding constraints on this mesh.
    """

    def __init__(self, fn, mesh, rules):
        self.fn, self.mesh, self.rules = fn, mesh, list(rules)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.fn.lower(*args)


def step_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The key of one step: a function of the run's key and the step alone.

    Folding in the step (rather than splitting and carrying the key) makes a resumed run
    draw exactly the numbers the uninterrupted one drew.
    """
    return jax.random.fold_in(rng, step)


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
    loss_fn: Callable,
    params: Any,
    batch: Any,
    rng: jax.Array,
    extra: Any = None,
    n_microbatches: int = 1,
    constrain_microbatch: Callable | None = None,
):
    """Weighted gradient of `loss_fn` (the contract above) over `batch`, in pieces.

    The loss sums, their gradients and the aux metrics are added over the microbatches
    and the loss and gradients divided once by the total weight, so the result equals one
    big batch (up to float summation order) even when microbatches hold different weights.
    Microbatch i gets the key `fold_in(rng, i)` (with one microbatch: `rng` itself).
    Returns (mean loss, grads, total weight, summed aux, new extra).
    """

    def split_aux(p, mb, key, ex):  # (loss, weight, aux) -> value_and_grad's (loss, aux) form
        loss_sum, weight, aux = loss_fn(p, mb, key, ex)
        return loss_sum, (weight, aux)

    grad_fn = jax.value_and_grad(split_aux, has_aux=True)

    def one(mb, key, ex):
        (loss_sum, (weight, aux)), grads = grad_fn(params, mb, key, ex)
        aux = dict(aux)
        new_extra = aux.pop("extra", ex)
        return loss_sum, weight, aux, new_extra, grads

    if n_microbatches == 1:
        sum_loss, weight, aux, extra, grads = one(batch, rng, extra)
    else:
        micro = _split_microbatches(batch, n_microbatches, constrain_microbatch)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n_microbatches))
        # The aux structure (and dtype) comes from tracing one microbatch abstractly.
        first = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: one(first, keys[0], extra)[2])

        def body(carry, xs):
            acc_loss, acc_weight, acc_aux, ex, acc_grads = carry
            mb, key = xs
            loss, weight, aux, ex, grads = one(mb, key, ex)
            acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)
            acc_aux = jax.tree.map(lambda a, v: a + v, acc_aux, aux)
            return (acc_loss + loss, acc_weight + weight, acc_aux, ex, acc_grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        f32 = jnp.zeros((), jnp.float32)
        init = (f32, f32, aux0, extra, zeros)
        (sum_loss, weight, aux, extra, grads), _ = jax.lax.scan(body, init, (micro, keys))
    denom = jnp.maximum(jnp.asarray(weight, jnp.float32), 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return sum_loss / denom, grads, weight, aux, extra


def _microbatch_constraint(mesh):
    def constrain(x):
        spec = PartitionSpec(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    mesh,
    state_shardings,
    batch_shardings,
    rules: Sequence = mesh_lib.CORE_RULES,
    grad_accum_steps: int = 1,
    weight_name: str = "weight",
    after_update: Callable[[TrainState], Any] | None = None,
):
    """The jitted train step `(state, batch) -> (state, metrics)` for `loss_fn`.

    metrics: loss (weighted mean), grad_norm (before clipping), `weight_name` (the total
    weight, e.g. 'tokens') and the summed aux metrics. `after_update(new_state) -> extra`
    computes the extra collection after the optimiser step (an EMA of the params).
    """
    constrain = _microbatch_constraint(mesh)

    def step(state: TrainState, batch):
        rng = step_rng(state.rng, state.step)
        loss, grads, weight, aux, extra = accumulate_gradients(
            loss_fn, state.params, batch, rng, state.extra, grad_accum_steps, constrain
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extra=extra
        )
        if after_update is not None:
            new_state = new_state.replace(extra=after_update(new_state))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), weight_name: weight}
        metrics.update(aux)
        return new_state, metrics

    rep = mesh_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return MeshCall(jitted, mesh, rules)


def make_eval_step(
    loss_fn: Callable,
    *,
    mesh,
    param_shardings,
    batch_shardings,
    extra_shardings=None,
    rules: Sequence = mesh_lib.CORE_RULES,
):
    """Jitted `(params, batch, extra) -> (loss_sum, weight, aux)`; no gradients, fixed key.

    Average over batches by summing both and dividing once.
    """

    def evaluate(params, batch, extra):
        return loss_fn(params, batch, jax.random.key_data(jax.random.key(0)), extra)

    rep = mesh_lib.replicated(mesh)
    jitted = jax.jit(
        evaluate,
        in_shardings=(param_shardings, batch_shardings, extra_shardings),
        out_shardings=rep,
    )
    return MeshCall(jitted, mesh, rules)


def init_or_restore(checkpointer, init: Callable, abstract: Any, rng, data_iter=None, say=None):
    """The latest checkpoint's state (and data-iterator state), else `init(rng)`.

    Returns (state, restored_step or None). `abstract` holds the target shapes and
    shardings, so each host reads only its own shards.
    """
    start = checkpointer.latest_step() if checkpointer is not None else None
    if start is None:
        return init(rng), None
    if say is not None:
        say(f"resuming from checkpoint step {start} in {checkpointer.directory}")
    return checkpointer.restore(abstract, data_iter), start
