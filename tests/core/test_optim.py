"""Schedule values, the weight-decay mask and token-weighted gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.core.optim import accumulate_gradients, decay_mask, make_optimizer, warmup_cosine


def test_warmup_cosine_values():
    s = warmup_cosine(1.0, warmup_steps=10, total_steps=110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine
    assert float(s(110)) == pytest.approx(0.1)  # floor: 10% of the peak
    assert float(s(500)) == pytest.approx(0.1)
    vals = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b - 1e-7 for a, b in zip(vals, vals[1:], strict=False))


def test_decay_mask():
    params = {
        "tok_embeddings": {"embedding": jnp.zeros((10, 4))},
        "layers": {
            "attention": {"wq": jnp.zeros((2, 4, 2, 2))},
            "attention_norm": {"scale": jnp.zeros((2, 4))},  # scanned: 2-D but a norm
        },
        "norm": {"scale": jnp.zeros((4,))},
        "output": {"kernel": jnp.zeros((4, 10)), "bias": jnp.zeros((10,))},
    }
    m = decay_mask(params)
    assert m["tok_embeddings"]["embedding"] is True  # Meta decays every matrix
    assert m["layers"]["attention"]["wq"] is True
    assert m["layers"]["attention_norm"]["scale"] is False
    assert m["norm"]["scale"] is False
    assert m["output"]["kernel"] is True and m["output"]["bias"] is False


def test_optimizer_decays_only_masked_and_clips():
    tx, _ = make_optimizer(
        {"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.5, "schedule": "constant"}, 10
    )
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
    # clipping: a huge gradient gives the same Adam step as a unit one (direction only)
    big = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    updates, _ = tx.update(big, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def _loss_fn(params, batch):
    logits = batch["x"] @ params["w"]  # [B, T, V]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]
    mask = batch["mask"]
    return jnp.sum(nll * mask), jnp.sum(mask)


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
    loss1, g1, n1 = jax.jit(lambda p, b: accumulate_gradients(_loss_fn, p, b, 1))(params, batch)
    loss2, g2, n2 = jax.jit(lambda p, b: accumulate_gradients(_loss_fn, p, b, n_micro))(
        params, batch
    )
    assert float(n1) == float(n2) == float(batch["mask"].sum())
    np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
    np.testing.assert_allclose(g1["w"], g2["w"], rtol=1e-5, atol=1e-7)
    # and it really is the token-weighted mean (not the mean of microbatch means)
    s, n = _loss_fn(params, batch)
    np.testing.assert_allclose(loss1, s / n, rtol=1e-6)
