"""Mesh from config, logical rules, sharded init, batch sharding (8 fake CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from herd.core import mesh as mesh_lib


def test_make_mesh_fills_minus_one():
    assert jax.device_count() == 8
    m = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    m = mesh_lib.make_mesh({"fsdp": -1})
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh_lib.data_parallel_size(m) == 8


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"data": 2, "fsdp": 2, "tensor": 3}, "multiply to 12 but there are 8"),
        ({"data": 3, "fsdp": -1, "tensor": 1}, "multiply to 3"),
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"data": 0, "fsdp": -1}, "positive"),
        ({"pipeline": 2, "fsdp": -1}, "pipeline"),
    ],
)
def test_bad_mesh(cfg, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.make_mesh(cfg)


def test_global_batch_check():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    mesh_lib.check_global_batch(8, m)
    with pytest.raises(ValueError, match="global batch 6 .* data-parallel size 4"):
        mesh_lib.check_global_batch(6, m)
    with pytest.raises(ValueError, match="grad_accum_steps 3"):
        mesh_lib.check_global_batch(8, m, grad_accum_steps=3)
    with pytest.raises(ValueError, match="microbatch 4 .*data-parallel size 8"):
        mesh_lib.check_global_batch(8, mesh_lib.make_mesh({"fsdp": -1}), grad_accum_steps=2)


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param(
            "w", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (8, 16)
        )
        s = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (8,))
        return (x * s) @ w


def test_init_sharded_follows_rules():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = _Toy()

    def init(rng):
        return model.init(rng, jnp.ones((1, 8)))["params"]

    params, shardings = mesh_lib.init_sharded(init, jax.random.key(0), m)
    assert params["w"].sharding.spec == P("fsdp", "tensor")
    assert params["scale"].sharding.spec in (P(None), P())
    # each device holds a quarter of w (fsdp=2 x tensor=2), not all of it
    shard = params["w"].addressable_shards[0].data
    assert shard.shape == (4, 8)
    ref = nn.meta.unbox(init(jax.random.key(0)))
    np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(ref["w"]), rtol=1e-6)


def test_shard_batch():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = {"inputs": np.arange(32, dtype=np.int32).reshape(8, 4)}
    out = mesh_lib.shard_batch(b, m)
    assert out["inputs"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out["inputs"]), b["inputs"])
