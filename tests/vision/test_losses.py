"""The DeiT III / cosub losses against independent formulas: numpy (float64) for values
and hand-derived gradients, and PyTorch's own losses where torch is installed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.vision import losses

B, C = 6, 5


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_bce(z, y):
    """-[y log s + (1 - y) log(1 - s)], mean over classes, float64."""
    s = _np_sigmoid(z)
    return np.mean(-(y * np.log(s) + (1 - y) * np.log(1 - s)), axis=-1)


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(0, 3, (B, C))
    z2 = rng.normal(0, 3, (B, C))
    labels = rng.integers(0, C, B)
    lam = 0.7
    perm = np.roll(np.arange(B), 1)
    onehot = np.eye(C)[labels]
    mixed = lam * onehot + (1 - lam) * onehot[perm]  # a mixup batch's soft targets
    return z1, z2, labels, mixed


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def test_binarize_makes_both_mixed_classes_one():
    _, _, labels, mixed = _data()
    got = np.asarray(losses.binarize_targets(_f32(mixed)))
    want = np.zeros((B, C))
    want[np.arange(B), labels] = 1
    want[np.arange(B), labels[np.roll(np.arange(B), 1)]] = 1
    np.testing.assert_array_equal(got, want)


def test_bce_value_and_gradient():
    z, _, labels, mixed = _data()
    y = (mixed > 0).astype(np.float64)
    got = losses.binary_cross_entropy(_f32(z), _f32(y))
    np.testing.assert_allclose(np.asarray(got), _np_bce(z, y), rtol=1e-5, atol=1e-6)
    # large logits stay finite (stable form)
    big = np.array([[80.0, -80.0, 0.0, 30.0, -30.0]])
    assert np.all(np.isfinite(np.asarray(losses.binary_cross_entropy(_f32(big), _f32(big > 0)))))
    # d/dz mean_c BCE = (sigmoid(z) - y) / C
    grad = jax.grad(lambda q: jnp.sum(losses.binary_cross_entropy(q, _f32(y))))(_f32(z))
    np.testing.assert_allclose(np.asarray(grad), (_np_sigmoid(z) - y) / C, rtol=1e-5, atol=1e-7)
    # integer labels mean one-hot targets
    np.testing.assert_allclose(
        np.asarray(losses.binary_cross_entropy(_f32(z), jnp.asarray(labels))),
        _np_bce(z, np.eye(C)[labels]),
        rtol=1e-5,
    )


def test_classification_loss_bce_binarises_mixed_targets():
    z, _, _, mixed = _data()
    got = losses.classification_loss(_f32(z), _f32(mixed), "bce")
    np.testing.assert_allclose(np.asarray(got), _np_bce(z, (mixed > 0) * 1.0), rtol=1e-5)
    raw = losses.classification_loss(_f32(z), _f32(mixed), "bce", binarize=False)
    np.testing.assert_allclose(np.asarray(raw), _np_bce(z, mixed), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'mse'.*'bce', 'ce'"):
        losses.classification_loss(_f32(z), _f32(mixed), "mse")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_with_label_smoothing(smoothing):
    z, _, labels, mixed = _data(1)
    logp = _np_log_softmax(z)
    # labels: (1 - eps) * NLL + eps * mean over classes of -log p
    want = (1 - smoothing) * -logp[np.arange(B), labels] + smoothing * -logp.mean(-1)
    got = losses.cross_entropy(_f32(z), jnp.asarray(labels), smoothing)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # soft targets
    y = (1 - smoothing) * mixed + smoothing / C
    got = losses.cross_entropy(_f32(z), _f32(mixed), smoothing)
    np.testing.assert_allclose(np.asarray(got), -(y * logp).sum(-1), rtol=1e-5)
    # gradient: softmax(z) - y
    grad = jax.grad(lambda q: jnp.sum(losses.cross_entropy(q, _f32(mixed), smoothing)))(_f32(z))
    np.testing.assert_allclose(np.asarray(grad), np.exp(logp) - y, rtol=1e-5, atol=1e-7)


def test_cosub_value_and_stop_gradient():
    z1, z2, _, mixed = _data(2)
    y = (mixed > 0) * 1.0
    s1, s2 = _np_sigmoid(z1), _np_sigmoid(z2)
    want = 0.25 * (_np_bce(z1, y) + _np_bce(z2, y) + _np_bce(z1, s2) + _np_bce(z2, s1))
    got = losses.cosub_loss(_f32(z1), _f32(z2), _f32(y))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)

    g1, g2 = jax.grad(lambda a, b: jnp.sum(losses.cosub_loss(a, b, _f32(y))), argnums=(0, 1))(
        _f32(z1), _f32(z2)
    )
    # Through the two target terms and its own cross term only: the other submodel's
    # prediction is a constant target, so d/dz1 = 0.25 [(s1 - y) + (s1 - s2)] / C.
    np.testing.assert_allclose(np.asarray(g1), 0.25 * ((s1 - y) + (s1 - s2)) / C, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g2), 0.25 * ((s2 - y) + (s2 - s1)) / C, atol=1e-7)
    # Without the stop-gradient the gradient would differ (so the check above can fail):
    # d/dz1 BCE(z2, sigmoid(z1)) = -(z2 / C) s1 (1 - s1) is added.
    leak = 0.25 * -(z2 / C) * s1 * (1 - s1)
    assert np.max(np.abs(leak)) > 1e-3


def test_cosub_cross_terms_alone_move_only_the_student():
    """The cross terms with equal logits are minimal for the student side only."""
    z1, z2, _, _ = _data(3)
    zero_targets = jnp.zeros((B, C))

    def cross_only(a, b):  # loss minus the two target terms
        full = losses.cosub_loss(a, b, zero_targets)
        target_terms = 0.25 * (
            losses.binary_cross_entropy(a, zero_targets)
            + losses.binary_cross_entropy(b, zero_targets)
        )
        return jnp.sum(full - target_terms)

    g1 = jax.grad(cross_only)(_f32(z1), _f32(z2))
    np.testing.assert_allclose(
        np.asarray(g1), 0.25 * (_np_sigmoid(z1) - _np_sigmoid(z2)) / C, atol=1e-7
    )


def test_against_torch():
    torch = pytest.importorskip("torch")
    z1, z2, labels, mixed = _data(4)
    y = (mixed > 0) * 1.0
    t1 = torch.tensor(z1, dtype=torch.float32, requires_grad=True)
    t2 = torch.tensor(z2, dtype=torch.float32, requires_grad=True)
    ty = torch.tensor(y, dtype=torch.float32)
    crit = torch.nn.BCEWithLogitsLoss()  # the DeiT III / cosub criterion (mean)
    ref = 0.25 * crit(t1, ty) + 0.25 * crit(t2, ty)
    ref = ref + 0.25 * crit(t1, t2.detach().sigmoid()) + 0.25 * crit(t2, t1.detach().sigmoid())
    ref.backward()

    def mean_cosub(a, b):
        return jnp.mean(losses.cosub_loss(a, b, _f32(y)))

    val, (g1, g2) = jax.value_and_grad(mean_cosub, argnums=(0, 1))(_f32(z1), _f32(z2))
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), t1.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g2), t2.grad.numpy(), rtol=1e-4, atol=1e-7)

    ce = torch.nn.functional.cross_entropy(
        torch.tensor(z1, dtype=torch.float32), torch.tensor(labels), label_smoothing=0.1
    )
    ours = jnp.mean(losses.cross_entropy(_f32(z1), jnp.asarray(labels), 0.1))
    np.testing.assert_allclose(float(ours), ce.item(), rtol=1e-5)
