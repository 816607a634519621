"""The core step and loop drive a model that is not a language model.

An MLP classifier with BatchNorm and dropout on scikit-learn's handwritten digits (real
data shipped with the package) trains through herd.core alone: LAMB, a frozen-parameter
mask, a key per microbatch, aux metrics summed over microbatches, batch statistics in the
state's `extra` collection, on a data x fsdp x tensor mesh of 8 devices; it learns, and
a checkpointed, restored run continues bit for bit like the uninterrupted one.
"""

import functools

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

from herd.core import mesh as mesh_lib
from herd.core import step as step_lib
from herd.core.checkpoint import Checkpointer, abstract_like, read_config, restore_params
from herd.core.loop import TrainState, train_loop
from herd.core.optim import make_optimizer

BATCH, HIDDEN, CLASSES = 64, 32, 10
# The classifier's own logical axis name, added to the core's generic ones.
RULES = mesh_lib.axis_rules(("classes", None))


class DigitsMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        lp = nn.with_logical_partitioning
        x = nn.Dense(
            HIDDEN,
            name="stem",
            kernel_init=lp(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=lp(nn.initializers.zeros, ("mlp",)),
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(
            CLASSES,
            name="head",
            kernel_init=lp(nn.initializers.lecun_normal(), ("mlp", "classes")),
            bias_init=lp(nn.initializers.zeros, ("classes",)),
        )(x)


def _digits():
    d = datasets.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _train_iter(seed=0):
    x, y, _, _ = _digits()
    rows = [{"image": x[i], "label": y[i]} for i in range(len(x))]
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None).batch(BATCH)
    return iter(ds.to_iter_dataset())


def loss_fn(model):
    def fn(params, batch, rng, extra):
        logits, updates = model.apply(
            {"params": params, "batch_stats": extra},
            batch["image"],
            train=True,
            rngs={"dropout": jax.random.wrap_key_data(rng)},
            mutable=["batch_stats"],
        )
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["label"][:, None], -1)[:, 0]
        correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
        n = jnp.asarray(batch["label"].shape[0], jnp.float32)
        return jnp.sum(nll), n, {"correct": correct, "extra": updates["batch_stats"]}

    return fn


@functools.cache
def _setup(grad_accum_steps=2, total_steps=60):
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = DigitsMLP()
    optimizer, _ = make_optimizer(
        {
            "name": "lamb",
            "lr": 0.05,
            "warmup_steps": 5,
            "start_lr": 1e-6,
            "min_lr": 1e-5,
            "weight_decay": 0.05,
            "clip_norm": 1.0,
            "frozen": r"^stem/bias$",
        },
        total_steps,
    )

    def init(rng):
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64)), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=rng,
            extra=variables["batch_stats"],
        )

    rng = jax.random.key_data(jax.random.key(1))
    abstract, shardings = mesh_lib.abstract_state(init, rng, mesh=mesh, rules=RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(RULES)):
        jinit = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)
    batch_sh = {
        "image": mesh_lib.batch_sharding(mesh, 2),
        "label": mesh_lib.batch_sharding(mesh, 1),
    }
    step = step_lib.make_train_step(
        loss_fn(model),
        optimizer,
        mesh=mesh,
        state_shardings=shardings,
        batch_shardings=batch_sh,
        rules=RULES,
        grad_accum_steps=grad_accum_steps,
        weight_name="images",
    )
    return mesh, model, abstract, jinit, step, rng


def _run(num_steps, state=None, it=None, checkpointer=None):
    mesh, _, _, jinit, step, rng = _setup()
    state = jinit(rng) if state is None else state
    it = _train_iter() if it is None else it
    return train_loop(
        state,
        step,
        it,
        num_steps=num_steps,
        put_batch=lambda b: mesh_lib.shard_batch(b, mesh),
        checkpointer=checkpointer,
        log_every=1,
    ), it


def _held_out_accuracy(state):
    _, model, _, _, _, _ = _setup()
    _, _, x, y = _digits()
    logits = model.apply({"params": state.params, "batch_stats": state.extra}, x, train=False)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_classifier_learns_through_the_core_loop():
    mesh, _, _, jinit, step, rng = _setup()
    first = jinit(rng)
    stem_bias = np.asarray(first.params["stem"]["bias"]).copy()
    stem_kernel = np.asarray(first.params["stem"]["kernel"]).copy()
    mean0 = np.asarray(first.extra["norm"]["mean"]).copy()
    assert first.params["stem"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    (state, history), _ = _run(60, state=first)
    assert _held_out_accuracy(state) >= 0.85
    # the frozen bias is bit-identical; the trained kernel moved
    np.testing.assert_array_equal(np.asarray(state.params["stem"]["bias"]), stem_bias)
    assert not np.array_equal(np.asarray(state.params["stem"]["kernel"]), stem_kernel)
    # batch statistics came back through `extra`, sharded like the rest of the state
    assert not np.allclose(np.asarray(state.extra["norm"]["mean"]), mean0)
    # losses fell
    losses = [history["loss"][s] for s in sorted(history["loss"])]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_microbatches_get_their_own_keys_and_sum_aux():
    """Two microbatches of a batch: aux sums over both; each draws its own dropout mask."""
    _, model, _, jinit, _, rng = _setup()
    state = jinit(rng)
    x, y, _, _ = _digits()
    batch = {"image": jnp.asarray(x[:BATCH]), "label": jnp.asarray(y[:BATCH])}
    fn = loss_fn(model)
    key = jax.random.key_data(jax.random.key(7))
    _, _, weight, aux, _ = step_lib.accumulate_gradients(
        fn, state.params, batch, key, state.extra, 2
    )
    assert float(weight) == BATCH
    # the summed correct count equals the two microbatches counted separately
    halves = [jax.tree.map(lambda v, i=i: v[i::2], batch) for i in range(2)]
    keys = [jax.random.fold_in(key, i) for i in range(2)]
    extra = state.extra
    total = 0
    for half, k in zip(halves, keys, strict=True):
        _, _, a = fn(state.params, half, k, extra)
        total += int(a["correct"])
        extra = a["extra"]  # batch statistics flow from one microbatch to the next
    assert int(aux["correct"]) == total
    # the same microbatch under the two keys drops different units
    l0 = fn(state.params, halves[0], keys[0], state.extra)[0]
    l1 = fn(state.params, halves[0], keys[1], state.extra)[0]
    assert float(l0) != float(l1)


def test_resume_is_bit_exact_with_extra_and_config(tmp_path):
    n = 6
    (full, hist_full), _ = _run(2 * n)
    config = {"optim": {"name": "lamb"}, "ks": (3, 2)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, config=config)
    (_, hist_a), it = _run(n, checkpointer=ckpt)
    ckpt.close()

    _, _, abstract, jinit, _, rng = _setup()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, config=config)
    it = _train_iter()
    template = jinit(jax.random.key_data(jax.random.key(99)))  # overwritten by the restore
    state = ckpt.restore(abstract_like(template), it)
    assert int(state.step) == n
    (resumed, hist_b), _ = _run(2 * n, state=state, it=it, checkpointer=ckpt)
    ckpt.close()
    assert {**hist_a["loss"], **hist_b["loss"]} == hist_full["loss"]  # exact, every step
    for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    # the config travels with each step (tuples come back as JSON lists)
    assert read_config(str(tmp_path / "ckpt")) == {"optim": {"name": "lamb"}, "ks": [3, 2]}
    # params alone, onto the mesh's shardings, equal those of the full restore
    params = restore_params(str(tmp_path / "ckpt"), abstract.params)
    assert params["stem"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(_leaves(params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _masked_nll(params, batch, rng, extra):
    del rng, extra
    logp = jax.nn.log_softmax(batch["x"] @ params["w"])  # [B, T, V]
    nll = -jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]
    mask = batch["mask"]
    return jnp.sum(nll * mask), jnp.sum(mask), {"rows": jnp.float32(batch["x"].shape[0])}


@pytest.mark.parametrize("n_micro", [2, 4])
def test_accumulation_equals_one_batch(n_micro):
    rng = np.random.default_rng(0)
    B, T, D, V = 8, 5, 3, 7
    batch = {
        "x": jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
        # very unequal real-token counts per row, so per-microbatch means would be wrong
        "mask": jnp.asarray(np.arange(T)[None, :] < rng.integers(0, T + 1, size=(B, 1)), "f4"),
    }
    params = {"w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}
    key = jax.random.key_data(jax.random.key(0))

    def accumulate(n):
        return jax.jit(lambda p, b: step_lib.accumulate_gradients(_masked_nll, p, b, key, None, n))(
            params, batch
        )

    loss1, g1, n1, aux1, _ = accumulate(1)
    loss2, g2, n2, aux2, _ = accumulate(n_micro)
    assert float(n1) == float(n2) == float(batch["mask"].sum())
    assert float(aux1["rows"]) == float(aux2["rows"]) == B  # aux summed over microbatches
    np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
    np.testing.assert_allclose(g1["w"], g2["w"], rtol=1e-5, atol=1e-7)
    # and it really is the token-weighted mean (not the mean of microbatch means)
    s, n, _ = _masked_nll(params, batch, None, None)
    np.testing.assert_allclose(loss1, s / n, rtol=1e-6)


def test_params_only_restore_refuses_another_model(tmp_path):
    _, _, abstract, jinit, _, rng = _setup()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, jinit(rng))
    ckpt.close()
    more = {**abstract.params, "head2": abstract.params["head"]}
    with pytest.raises(ValueError, match=r"1/state holds no params \['head2'\]"):
        restore_params(str(tmp_path / "ckpt"), more)
    kernel = abstract.params["head"]["kernel"]
    wider = jax.ShapeDtypeStruct((HIDDEN, CLASSES + 1), kernel.dtype, sharding=kernel.sharding)
    other = {**abstract.params, "head": {**abstract.params["head"], "kernel": wider}}
    with pytest.raises(ValueError, match="does not hold params of the requested shapes"):
        restore_params(str(tmp_path / "ckpt"), other)
    with pytest.raises(FileNotFoundError, match="no checkpoint step 7"):
        restore_params(str(tmp_path / "ckpt"), abstract.params, step=7)
