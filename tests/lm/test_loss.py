"""Tests for herd.lm.loss: the chunked cross-entropy against the full-logits one (values,
gradients, no [B*T, vocab] intermediate). The model with it: tests/lm/test_model.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.lm.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [16, 24, 64, None])
def test_chunked_cross_entropy_matches_full(chunk):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 8, 12, 64
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)

    def full(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask)

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk)[0]

    ref, (gh_ref, gw_ref) = jax.value_and_grad(full, argnums=(0, 1))(hidden, w)
    val, (gh, gw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, w)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    np.testing.assert_allclose(gh, gh_ref, atol=1e-5)
    np.testing.assert_allclose(gw, gw_ref, atol=1e-5)
    assert float(chunked_cross_entropy(hidden, w, targets, mask, chunk)[1]) == float(mask.sum())
    if chunk is not None and chunk < v:  # no [B*T, V] intermediate in the compiled graph
        hlo = jax.jit(jax.grad(chunked)).lower(hidden, w).as_text()
        assert f"{b * t}x{v}x" not in hlo and f"{b},{t},{v}" not in hlo.replace(" ", "")
