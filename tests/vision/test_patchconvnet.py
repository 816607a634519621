"""PatchConvNet (herd.vision.patchconvnet): sizes against the paper, parity with the
official code, the pooling attention map, stochastic depth, scan vs unrolled, sharded on a
mesh under the vision axis rules, bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from herd.core.mesh import batch_sharding, init_sharded, make_mesh
from herd.vision.convert import from_timm, to_timm, unstack_blocks
from herd.vision.models import count_params, make_model, model_config
from herd.vision.patchconvnet import PatchConvNet, PatchConvNetConfig, depthwise_conv3x3
from herd.vision.sharding import VISION_RULES

TINY = dict(dim=64, depth=3, image_size=32, num_classes=7)

# Published totals at 224, 1000 classes, in millions: PatchConvNet paper (Touvron et al.
# 2021, arXiv:2112.13692) Table 1 / facebookresearch/deit README_patchconvnet.md model zoo.
PUBLISHED_M = {
    "patchconvnet_s60": 25.2,
    "patchconvnet_s120": 47.7,
    "patchconvnet_b60": 99.4,
    "patchconvnet_b120": 188.6,
}


def _closed_form(c: PatchConvNetConfig) -> int:
    d, r, f = c.dim, c.se_dim, c.pool_mlp_dim
    stem = 9 * (3 * d // 8 + d // 8 * d // 4 + d // 4 * d // 2 + d // 2 * d)  # no biases
    block = 2 * d + (d * d + d) + (9 * d + d) + (d * r + r) + (r * d + d) + (d * d + d) + d
    pool = 2 * d + 4 * (d * d + d) + d + 2 * d + (d * f + f) + (f * d + d) + d
    return stem + d + c.depth * block + pool + 2 * d + d * 1000 + 1000


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_counts_match_the_paper(name):
    config = model_config(name)
    n = count_params(config)
    assert n == _closed_form(config)
    assert abs(n / 1e6 - PUBLISHED_M[name]) <= 0.05, (name, n)


# ---------------------------------------------------------------------------------------
# Parity with the official code
# ---------------------------------------------------------------------------------------
# Expected values computed once with the official model definition (facebookresearch/deit
# patchconvnet_models.py, PatchConvnet as S60 builds it: qkv_bias=True, LayerNorm eps 1e-6,
# timm 1.0.31's SqueezeExcite; torch 2.14.1) at embed_dim=64, depth=3, 7 classes, 32x32
# input, eval mode, with its state_dict filled by `_seeded` below and run on `_images(0)`
# (NCHW there). The same run counted the official S60 / B60 at 25,231,096 / 99,388,936
# parameters, the counts herd gets.
OFFICIAL_LOGITS = [
    [0.3676086962223053, 1.6715953350067139, -0.25082889199256897, 0.7431101202964783,
     1.6836826801300049, 0.8083605766296387, -0.11590887606143951],
    [0.3293946087360382, 1.4312931299209595, -0.014539937488734722, 0.5829833745956421,
     1.2541247606277466, 0.8643339276313782, -0.5698527097702026],
]  # fmt: skip
# The class token's attention over [cls; 4 patches] in the pooling block (single head).
OFFICIAL_POOL_ATTENTION = [
    [[0.2234017699956894, 0.3068599998950958, 0.08503574877977371, 0.25693127512931824,
      0.12777121365070343]],
    [[0.2931109070777893, 0.32148507237434387, 0.03655800223350525, 0.16291210055351257,
      0.185933917760849]],
]  # fmt: skip


def _seeded(entries, seed):
    """Official-key weights: entry i draws from default_rng([seed, i]); LayerScale and norm
    affine parameters far from their init so that misplacing one changes the logits."""
    out = {}
    for i, (name, shape) in enumerate(entries):
        z = np.random.default_rng([seed, i]).standard_normal(shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("gamma_"):
            v = 0.3 * z
        elif name == "cls_token":
            v = 0.5 * z
        elif "norm" in name and leaf == "weight":
            v = 1.0 + 0.1 * z
        elif "norm" in name and leaf == "bias":
            v = 0.1 * z
        elif leaf == "weight":
            v = z / math.sqrt(math.prod(shape[1:]))
        else:
            v = 0.02 * z
        out[name] = v.astype(np.float32)
    return out


def _images(seed):
    return np.random.default_rng([seed, 99]).standard_normal((2, 32, 32, 3)).astype(np.float32)


def _official_entries(config):
    """(name, torch shape) of the official state dict, in its order (to_timm writes it)."""
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    params = nn.meta.unbox(jax.jit(PatchConvNet(config).init)(jax.random.PRNGKey(0), images))
    return [(k, v.shape) for k, v in to_timm(config, params["params"]).items()]


def test_matches_the_official_patchconvnet():
    config = model_config("patchconvnet_s60", **TINY)
    sd = _seeded(_official_entries(config), 0)
    converted, params = from_timm({"model": sd}, "S60", dim=64, depth=3, image_size=32)
    assert converted == config
    model = make_model(converted)
    logits, attn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True))(
        params, _images(0)
    )
    np.testing.assert_allclose(logits, OFFICIAL_LOGITS, atol=1e-4, rtol=0)
    np.testing.assert_allclose(attn, OFFICIAL_POOL_ATTENTION, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------


def _variables(config):
    images = jnp.zeros((2, config.image_size, config.image_size, 3))
    return nn.meta.unbox(jax.jit(PatchConvNet(config).init)(jax.random.PRNGKey(0), images))


def test_pooling_attention_map_and_scan_vs_unrolled():
    config = PatchConvNetConfig(**TINY, layerscale_init=0.3)
    params = _variables(config)["params"]
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    logits, attn = PatchConvNet(config).apply({"params": params}, images, return_attention=True)
    assert logits.shape == (2, 7) and attn.shape == (2, 1, 1 + 4)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-6)
    unrolled = config.replace(scan_blocks=False)
    flat = unstack_blocks(params, config.depth)
    logits2, attn2 = PatchConvNet(unrolled).apply({"params": flat}, images, return_attention=True)
    np.testing.assert_allclose(logits, logits2, atol=1e-5)
    np.testing.assert_allclose(attn, attn2, atol=1e-6)


def test_drop_path_only_in_training():
    config = PatchConvNetConfig(**TINY, layerscale_init=0.3, drop_path=0.5)
    variables = _variables(config)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    model = PatchConvNet(config)
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(variables, images)
    b = apply(variables, images, rngs={"drop_path": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(a, b)
    t1 = apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(1)})
    t2 = apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(2)})
    assert not np.allclose(t1, a) and not np.allclose(t1, t2)


def test_s60_applies_under_the_vision_rules_on_a_mesh():
    """PatchConvNet-S60 (full width and depth, 32 px images) initialises and applies sharded
    over data x fsdp x tensor = 2 x 2 x 2 under VISION_RULES: every param has one logical
    name per axis, none twice in one array (flax refuses that: a stem kernel once read and
    wrote 'stem_channels'), every name mapped; the sharded logits and pooling map equal the
    unsharded ones."""
    config = model_config("patchconvnet_s60", image_size=32, num_classes=10)
    model = PatchConvNet(config)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))

    def init(rng):
        return model.init(rng, images[:1])["params"]

    def is_boxed(x):
        return isinstance(x, nn.LogicallyPartitioned)

    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    mapped = {name for name, _ in VISION_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_boxed)
    assert len(leaves) > 30
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert is_boxed(leaf), where
        names = tuple(leaf.names)
        assert len(names) == len(leaf.value.shape), (where, names)
        assert len(set(names)) == len(names), (where, names)
        assert set(names) <= mapped, (where, set(names) - mapped)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, shardings = init_sharded(init, jax.random.PRNGKey(0), mesh, VISION_RULES)
    # trunk 1x1 conv [layers, D, D]: width over fsdp, hidden over tensor; the single-head
    # pooling block is not split over tensor; the stem's kernels are replicated but for embed
    assert shardings["blocks"]["conv_in"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["pool"]["q"]["kernel"].spec == P("fsdp", None, None)
    assert shardings["stem"]["conv_1"].spec == P(None, None, None, None)
    assert shardings["stem"]["conv_3"].spec == P(None, None, None, "fsdp")

    def apply(p, x):
        return model.apply({"params": p}, x, return_attention=True)

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(VISION_RULES)):
        logits, attn = jax.jit(apply)(params, jax.device_put(images, batch_sharding(mesh, 4)))
    assert logits.shape == (8, 10) and attn.shape == (8, 1, 1 + 4)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-6)
    want_logits, want_attn = jax.jit(apply)(jax.device_get(params), images)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attn, want_attn, atol=1e-6)


def test_shifted_depthwise_equals_the_lax_conv():
    """The nine shifted multiply-adds are lax.conv_general_dilated(feature_group_count=D):
    forward, input gradient and kernel gradient, float32, on a non-square grid (so that a
    swapped height / width or a flipped kernel shows)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 8)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 5, 7, 8)), jnp.float32)

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k[:, :, None, :], (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=8,
        )  # fmt: skip

    def vjp(f):
        y, pull = jax.vjp(jax.jit(f), x, k)
        return (y, *pull(dy))

    want = vjp(lax_conv)
    for impl in ("shifted", "conv"):
        got = vjp(lambda x, k, impl=impl: depthwise_conv3x3(x, k, impl))
        for a, b, what in zip(got, want, ("y", "dx", "dk"), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {what}")
    # a corner output sees only the 2 x 2 in-bounds taps (zero padding)
    corner = float(jnp.sum(x[0, :2, :2, 3] * k[1:, 1:, 3]))
    np.testing.assert_allclose(want[0][0, 0, 0, 3], corner, rtol=1e-5)


def test_depthwise_impls_give_the_same_model_and_gradients():
    """config.depthwise only changes how the trunk's depthwise conv is computed: the same
    params give the same logits and parameter gradients, blocks scanned."""
    config = PatchConvNetConfig(**TINY, layerscale_init=0.3)
    params = _variables(config)["params"]
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))

    def loss_and_grads(impl):
        model = PatchConvNet(config.replace(depthwise=impl))
        loss = lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (la, ga), (lb, gb) = loss_and_grads("shifted"), loss_and_grads("conv")
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bad_input():
    with pytest.raises(ValueError, match="image_size=200 is not divisible by the stem's stride 16"):
        model_config("patchconvnet_s60", image_size=200)
    with pytest.raises(
        ValueError, match="unknown vision model 'patchconvnet_s30'.*patchconvnet_s60"
    ):
        model_config("patchconvnet_s30")
    with pytest.raises(ValueError, match="unknown depthwise 'dense'; valid: shifted, conv"):
        PatchConvNetConfig(**TINY, depthwise="dense")
    config = PatchConvNetConfig(**TINY)
    with pytest.raises(ValueError, match=r"PatchConvNet expects NHWC images \[batch, 32, 32, 3\]"):
        PatchConvNet(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
