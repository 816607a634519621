"""The train loop with checkpoints: bit-exact resume, NaN guard, SIGTERM, metrics.

Uses a toy Flax model (not herd.lm) so that core is tested on its own.
"""

import functools
import json
import os
import signal

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.core import mesh as mesh_lib
from herd.core import step as step_lib
from herd.core.checkpoint import Checkpointer, abstract_like
from herd.core.loop import NonFiniteLossError, TrainState, train_loop
from herd.core.metrics import MetricsWriter, matmul_peak_flops
from herd.core.optim import make_optimizer

V, D, T, B = 16, 8, 6, 8
RULES = mesh_lib.axis_rules(("vocab", "tensor"))


class _ToyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        lp = nn.with_logical_partitioning
        emb = self.param("embedding", lp(nn.initializers.normal(1.0), ("vocab", "embed")), (V, D))
        w = self.param("w", lp(nn.initializers.normal(0.3), ("embed", "mlp")), (D, 32))
        out = self.param("out", lp(nn.initializers.normal(0.3), ("mlp", "vocab")), (32, V))
        h = jnp.take(emb, tokens, axis=0)
        return jnp.tanh(h @ w) @ out


def _data_iter(seed=0):
    rng = np.random.default_rng(123)
    rows = rng.integers(0, V, size=(64, T + 1)).astype(np.int32)

    def to_batch(x):
        return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((B, T), "f4")}

    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None).batch(B).map(to_batch)
    return iter(ds.to_iter_dataset())


@functools.cache
def _compiled(total_steps):
    """Model, jitted init and step: built once (compiling is most of these tests' time)."""
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = _ToyLM()
    tx, _ = make_optimizer({"lr": 0.05, "warmup_steps": 2}, total_steps)

    def init(rng):
        rng, k = jax.random.split(rng)
        params = model.init(k, jnp.zeros((1, T), jnp.int32))["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)

    def loss_fn(params, b, rng, extra):
        logp = jax.nn.log_softmax(model.apply({"params": params}, b["inputs"]))
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * b["loss_mask"]), jnp.sum(b["loss_mask"]), {}

    rng = jax.random.key_data(jax.random.key(0))
    _, shardings = mesh_lib.abstract_state(init, rng, mesh=mesh, rules=RULES)
    jinit = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)
    bsh = {k: mesh_lib.batch_sharding(mesh) for k in ("inputs", "targets", "loss_mask")}
    jstep = step_lib.make_train_step(
        loss_fn,
        tx,
        mesh=mesh,
        state_shardings=shardings,
        batch_shardings=bsh,
        rules=RULES,
        grad_accum_steps=2,
    )
    return mesh, jinit, jstep


def _setup(total_steps=10):
    mesh, jinit, jstep = _compiled(total_steps)
    state = jinit(jax.random.key_data(jax.random.key(0)))
    return mesh, state, jstep, lambda b: mesh_lib.shard_batch(b, mesh)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_is_bit_exact(tmp_path):
    n = 3
    # 2N steps straight
    _, state, step, put = _setup()
    full, hist_full = train_loop(
        state, step, _data_iter(), num_steps=2 * n, put_batch=put, log_every=1
    )
    # N steps, checkpoint, fresh process state, restore, N more
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    _, state, step, put = _setup()
    it = _data_iter()
    half, hist_a = train_loop(
        state, step, it, num_steps=n, put_batch=put, checkpointer=ckpt, log_every=1
    )
    ckpt.close()
    del half, it
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert ckpt.latest_step() == n
    _, state, step, put = _setup()  # a different init is overwritten by the restore
    it = _data_iter()
    state = ckpt.restore(abstract_like(state), it)
    assert int(state.step) == n
    assert state.params["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    resumed, hist_b = train_loop(
        state, step, it, num_steps=2 * n, put_batch=put, checkpointer=ckpt, log_every=1
    )
    ckpt.close()
    losses = {**hist_a["loss"], **hist_b["loss"]}
    assert losses == hist_full["loss"]  # exact float equality, every step
    for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    _, state, step, put = _setup()

    def poisoned(st, batch):
        st, m = step(st, batch)
        bad = st.step == 5
        m["loss"] = jnp.where(bad, jnp.nan, m["loss"])
        return st, m

    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=5)
    with pytest.raises(NonFiniteLossError, match="at step 5") as err:
        train_loop(
            state,
            poisoned,
            _data_iter(),
            num_steps=10,
            put_batch=put,
            checkpointer=ckpt,
            checkpoint_every=2,
            log_every=100,
        )
    assert err.value.step == 5
    assert "last good checkpoint is step 4" in str(err.value)
    assert ckpt.latest_step() == 4  # step 6 (after the NaN) was never written
    restored = ckpt.restore(abstract_like(state))
    assert int(restored.step) == 4
    assert all(np.all(np.isfinite(x)) for x in _leaves(restored.params))
    ckpt.close()


def test_sigterm_checkpoints_and_returns(tmp_path):
    _, state, step, put = _setup()

    def step_then_term(st, batch):
        st, m = step(st, batch)
        if int(st.step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return st, m

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    _, hist = train_loop(
        state, step_then_term, _data_iter(), num_steps=10, put_batch=put, checkpointer=ckpt
    )
    ckpt.close()
    assert hist["preempted"] and hist["final_step"] == 3
    assert Checkpointer(str(tmp_path / "ckpt")).latest_step() == 3


def test_metrics_writer_round_trip(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    w.write(1, {"loss": np.float32(2.5), "tokens_per_second": 100.0})
    w.write(2, {"loss": jnp.asarray(2.0)})
    w.close()
    rows = MetricsWriter.read(os.path.join(tmp_path, "metrics.jsonl"))
    assert rows == [{"step": 1, "loss": 2.5, "tokens_per_second": 100.0}, {"step": 2, "loss": 2.0}]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    peak = matmul_peak_flops(n=128, use_cache=False)
    assert 1e6 < peak < 1e14
    json.dumps(peak)


def test_loop_logs_throughput_and_mfu_of_each_step(tmp_path):
    """Each log row's units/s and MFU follow from its own seconds per step and the
    per-step functions at the step it ends at (a batch ramp doubles them at step 4)."""
    _, state, step, put = _setup()
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    _, hist = train_loop(
        state,
        step,
        _data_iter(),
        num_steps=6,
        put_batch=put,
        writer=writer,
        log_every=2,
        units_per_step=lambda s: 48.0 if s < 4 else 96.0,
        unit="tokens",
        flops_per_step=lambda s: 1e6 if s < 4 else 2e6,
        peak_flops=1e9,
    )
    rows = [r for r in MetricsWriter.read(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        units, flops = (48.0, 1e6) if r["step"] <= 4 else (96.0, 2e6)
        dt = r["seconds_per_step"]
        assert dt > 0
        assert r["tokens_per_second"] == pytest.approx(units / dt, rel=1e-9)
        assert r["mfu"] == pytest.approx(flops / dt / 1e9, rel=1e-9)
        assert r["loss"] == hist["loss"][r["step"]]


def test_half_written_step_is_ignored(tmp_path):
    _, state, _, _ = _setup()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(2, state)
    ckpt.close()
    # a save interrupted mid-way leaves orbax's temporary directory behind
    junk = tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "state").mkdir()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1)
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(abstract_like(state))
    assert int(restored.step) == int(state.step)
    # keep=1 never deletes the newest complete step
    ckpt.save(4, state)
    ckpt.wait()
    assert ckpt.all_steps() == [4]
    ckpt.close()


def test_checkpoints_from_before_the_extra_field_restore(tmp_path):
    """A train state saved before TrainState had `extra` restores into today's."""
    import flax.struct

    @flax.struct.dataclass
    class OldTrainState:  # TrainState as it was
        step: jax.Array
        params: object
        opt_state: object
        rng: jax.Array

    _, state, _, _ = _setup()
    old = OldTrainState(state.step + 5, state.params, state.opt_state, state.rng)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(5, old)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    restored = ckpt.restore(abstract_like(state))
    ckpt.close()
    assert isinstance(restored, TrainState) and restored.extra is None and int(restored.step) == 5
    for a, b in zip(_leaves(old.params), _leaves(restored.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert restored.params["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
