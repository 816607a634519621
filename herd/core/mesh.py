"""Device mesh from config, logical axis rules, sharded init and batch sharding.

The mesh has the axes ('data', 'fsdp', 'tensor'). Models name their parameter and
activation axes logically ('embed', 'mlp', 'batch', ...); rules map those names to mesh
axes, so the same model runs replicated on one CPU, FSDP on a TPU pod, or FSDP x
tensor-parallel on GPUs by changing three numbers in the config. The core holds the
generic names (`CORE_RULES`); each domain adds its own with `axis_rules`, e.g. the LM's
vocab and heads, without editing the core:

    LM_RULES = axis_rules(("vocab", "tensor"), ("heads", "tensor"), ...)

    mesh = make_mesh(cfg.mesh)               # {'data': 1, 'fsdp': -1, 'tensor': 1}
    state = init_sharded(init_fn, rng, mesh)  # never materialises full params on one host
    batch = shard_batch(host_batch, mesh)     # host-local numpy -> global jax.Array
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "CORE_RULES",
    "axis_rules",
    "BATCH_AXES",
    "make_mesh",
    "mesh_shape",
    "data_parallel_size",
    "check_global_batch",
    "logical_to_sharding",
    "abstract_state",
    "init_sharded",
    "batch_sharding",
    "shard_batch",
    "replicated",
]

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes a batch dimension is split over (data parallel and FSDP both split it).
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated), for the names every
# domain uses: the batch is split data-parallel, the model width FSDP, the hidden width
# of an MLP tensor-parallel; stacked layers, sequence length and norm scales replicated.
CORE_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("norm", None),
)


def axis_rules(*domain_rules: tuple[str, Any]) -> tuple[tuple[str, Any], ...]:
    """CORE_RULES plus a domain's own (name, mesh axes) pairs.

    A domain may not map a core name differently, nor one name twice: flax takes the
    first rule that matches, so a second mapping would be silently ignored.
    """
    rules = dict(CORE_RULES)
    for name, axes in domain_rules:
        if name in rules:
            raise ValueError(
                f"logical axis {name!r} is already mapped to {rules[name]!r}; "
                f"cannot map it to {axes!r} as well"
            )
        rules[name] = axes
    return tuple(rules.items())


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int | None = None) -> dict[str, int]:
    """Resolves the sizes of ('data', 'fsdp', 'tensor'); one -1 takes the rest of the devices.

    Raises ValueError naming the values when the product is not the device count.
    """
    n = jax.device_count() if n_devices is None else n_devices
    unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; valid axes are {list(MESH_AXES)}")
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % known:
            raise ValueError(
                f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide "
                f"the device count {n}"
            )
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {sizes}: the axes multiply to {math.prod(sizes.values())} but there are "
            f"{n} devices (set one axis to -1 to take the rest)"
        )
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') Mesh from config (default: all devices on fsdp)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(dict(mesh_cfg or {"fsdp": -1}), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # Auto axes: sharding follows the in/out shardings and the logical constraints the
    # model places (jax.make_mesh defaults to Explicit axes in this JAX).
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split (product of the BATCH_AXES sizes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raises ValueError unless each microbatch splits evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if global_batch <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch}")
    if global_batch % grad_accum_steps:
        raise ValueError(
            f"global batch {global_batch} is not divisible by grad_accum_steps {grad_accum_steps}"
        )
    micro = global_batch // grad_accum_steps
    if micro % dp:
        raise ValueError(
            f"global batch {global_batch} (microbatch {micro} with grad_accum_steps "
            f"{grad_accum_steps}) is not divisible by the data-parallel size {dp} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"global batch {global_batch} is not divisible by the process count "
            f"{jax.process_count()}"
        )


def logical_to_sharding(tree: Any, mesh: Mesh, rules=CORE_RULES) -> Any:
    """Tree of logical PartitionSpecs (or boxed / abstract values) -> tree of NamedShardings.

    Accepts the output of `jax.eval_shape(init)` with `nn.LogicallyPartitioned` boxes, or a
    tree of logical PartitionSpecs directly. Unboxed leaves become replicated.
    """
    rules = list(rules)

    def sharding(x):
        if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x.value):
            return x.value  # a box around an empty node (optax's MaskedNode): keep it
        if isinstance(x, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(x.names, rules)
        elif isinstance(x, nn.Partitioned):  # names that already are mesh axes
            spec = PartitionSpec(*x.names)
        elif isinstance(x, PartitionSpec):
            spec = nn.logical_to_mesh_axes(tuple(x), rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    # Mapped box by box, so empty nodes (optax's MaskedNode for frozen params, boxed when
    # the optimiser state is built from boxed params) keep their place; flax's tree-wide
    # helpers turned them into shardings that match no array.
    return jax.tree.map(
        sharding, tree, is_leaf=lambda x: isinstance(x, (nn.Partitioned, PartitionSpec))
    )


def abstract_state(init_fn: Callable, *args, mesh: Mesh, rules=CORE_RULES):
    """(unboxed abstract state with shardings, tree of NamedShardings) of `init_fn(*args)`."""
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_to_sharding(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_sharded(init_fn: Callable, rng, mesh: Mesh, rules=CORE_RULES):
    """Runs `init_fn(rng)` directly into its sharded layout; returns (state, shardings).

    `init_fn` may return parameters (and optimiser state built from them) boxed with
    `nn.LogicallyPartitioned`; the result is unboxed. The full state is never built on one
    device: the shapes come from `jax.eval_shape`, and jit writes each shard in place.
    """
    _, shardings = abstract_state(init_fn, rng, mesh=mesh, rules=rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the global batch (numpy) -> global jax.Arrays on the mesh.

    Each process passes only its own rows (batch // process_count of them); with one
    process this is the whole batch.
    """
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out
