"""ViT (herd.vision.vit / models): sizes against the papers, the hMLP stem's patch
independence, stochastic depth, scan vs unrolled, position-embedding interpolation, logical
axis names and bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.vision.convert import unstack_blocks
from herd.vision.models import abstract_variables, count_params, make_model, model_config
from herd.vision.patchconvnet import ConvStem, PatchConvNetConfig
from herd.vision.sharding import VISION_RULES
from herd.vision.vit import (
    AttentionBranch,
    Block,
    HMLPStem,
    MlpBranch,
    ViT,
    ViTConfig,
    bicubic_resize_matrix,
    drop_path,
    interpolate_pos_emb,
)

TINY = dict(dim=32, depth=2, n_heads=2, image_size=32, num_classes=5)


def _init(config, seed=0, batch=2):
    images = jnp.zeros((batch, config.image_size, config.image_size, 3))
    return jax.jit(make_model(config).init)(jax.random.PRNGKey(seed), images)


def _images(config, batch=2, seed=1):
    s = config.image_size
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, s, s, 3))


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------

# Published totals at 224x224 with a 1000-class head, in millions: DeiT III release
# (facebookresearch/deit README_revenge.md, the #params column of the model zoo; the paper's
# Table 1 lists the same models). ViT-S is listed as 22.0 there but timm's model card of the
# same network (deit3_small_patch16_224.fb_in1k) gives 22.1; the exact count is 22.06M, so
# ViT-S is checked against both with the rounding of each (+-0.05M plus 0.01M slack).
PUBLISHED_VIT_M = {"vit_s": (22.0, 22.1), "vit_b": (86.6,), "vit_l": (304.4,), "vit_h": (632.1,)}


def _vit_closed_form(c: ViTConfig) -> int:
    """Parameter count from the architecture, written out (timm's module list)."""
    d, f, n = c.dim, c.mlp_dim, c.num_patches
    stem = c.patch_size**2 * 3 * d + d
    attn = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + d  # norm, qkv, proj, LayerScale
    mlp = 2 * d + (d * f + f) + (f * d + d) + d  # norm, fc1, fc2, LayerScale
    return stem + d + n * d + c.depth * c.n_parallel * (attn + mlp) + 2 * d + d * 1000 + 1000


@pytest.mark.parametrize("name", sorted(PUBLISHED_VIT_M))
def test_vit_param_counts_match_the_papers(name):
    config = model_config(name)
    n = count_params(config)  # jax.eval_shape: nothing allocated (ViT-H is 632M params)
    assert n == _vit_closed_form(config)
    assert any(abs(n / 1e6 - m) <= 0.06 for m in PUBLISHED_VIT_M[name]), (name, n)


def test_parallel_vit_has_the_params_of_the_deep_one():
    # "Three things" Table 1: ViT-S 18x2 and 36x1 have the same number of parameters.
    assert count_params(model_config("vit_s_18x2")) == count_params(model_config("vit_s_36x1"))
    assert count_params(model_config("vit_s_18x2")) == _vit_closed_form(model_config("vit_s_18x2"))


def test_every_param_has_logical_axis_names_the_rules_know():
    known = {name for name, _ in VISION_RULES}
    for config in (
        ViTConfig(**TINY, n_parallel=2),
        ViTConfig(**TINY, stem="hmlp_bn", patch_size=16),
        ViTConfig(**TINY, scan_blocks=False, stem="hmlp_ln"),
    ):
        boxed = abstract_variables(config)["params"]  # shapes only: fast
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == len(leaf.value.shape)
            assert set(leaf.names) <= known, leaf.names
            # flax refuses to shard a param that names one logical axis twice
            named = [n for n in leaf.names if n is not None]
            assert len(named) == len(set(named)), leaf.names


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown vision model 'vit_xl'.*vit_s.*patchconvnet_s60"):
        model_config("vit_xl")


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image_size=225 is not divisible by patch_size=16"):
        model_config("vit_s", image_size=225)
    with pytest.raises(ValueError, match="image_size=230 is not divisible by patch_size=14"):
        ViTConfig(dim=64, depth=1, n_heads=2, patch_size=14, image_size=230)


def test_other_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        model_config("vit_s", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="unknown stem 'conv'; valid: patch, hmlp_ln, hmlp_bn"):
        ViTConfig(**{**TINY, "stem": "conv"})
    with pytest.raises(ValueError, match="dim=30 is not divisible by n_heads=4"):
        ViTConfig(dim=30, depth=1, n_heads=4)
    config = ViTConfig(**TINY)
    variables = _init(config)
    with pytest.raises(ValueError, match=r"NHWC images \[batch, 32, 32, 3\].*\(2, 3, 32, 32\)"):
        ViT(config).apply(variables, jnp.zeros((2, 3, 32, 32)))


# ---------------------------------------------------------------------------------------
# hMLP stem: patches are processed independently
# ---------------------------------------------------------------------------------------


def _mask_patches(images, token_mask, patch):
    """Zero the pixels of masked patches: token_mask [B, h, w] -> images [B, H, W, C]."""
    pixel_mask = jnp.repeat(jnp.repeat(token_mask, patch, axis=1), patch, axis=2)
    return jnp.where(pixel_mask[..., None], 0.0, images)


@pytest.mark.parametrize("stem", ["hmlp_ln", "hmlp_bn"])
def test_hmlp_masking_before_or_after_the_stem_is_the_same(stem):
    config = ViTConfig(dim=32, depth=1, n_heads=2, image_size=64, stem=stem)
    module = HMLPStem(config, train=False)  # BatchNorm in eval mode: running statistics
    images = _images(config, batch=3)
    variables = module.init(jax.random.PRNGKey(0), images)
    if stem == "hmlp_bn":  # non-trivial running statistics
        stats = variables["batch_stats"]
        stats = jax.tree.map(
            lambda x: x + 0.3 * jax.random.uniform(jax.random.PRNGKey(2), x.shape), stats
        )
        variables = {**variables, "batch_stats": stats}
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (3, 4, 4))
    apply = jax.jit(module.apply)
    before = apply(variables, _mask_patches(images, mask, 16))
    tokens = apply(variables, images)
    masked_token = apply(variables, jnp.zeros_like(images))  # a masked patch's token
    after = jnp.where(mask[..., None], masked_token, tokens)
    assert before.shape == (3, 4, 4, 32)
    np.testing.assert_allclose(before, after, atol=1e-6, rtol=0)
    # ... and the check has teeth: unmasked tokens do change when they differ
    assert not np.allclose(before, masked_token, atol=1e-3)


def test_an_overlapping_conv_stem_is_not_patch_independent():
    # The same check on PatchConvNet's 3x3 stride-2 convolutional stem fails: its receptive
    # fields overlap neighbouring patches, which is why "Three things" proposes the hMLP.
    config = PatchConvNetConfig(dim=32, depth=1, image_size=64)
    module = ConvStem(config)
    images = _images(config, batch=3)
    variables = module.init(jax.random.PRNGKey(0), images)
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (3, 4, 4))
    apply = jax.jit(module.apply)
    before = apply(variables, _mask_patches(images, mask, 16))
    after = jnp.where(
        mask[..., None], apply(variables, jnp.zeros_like(images)), apply(variables, images)
    )
    assert np.abs(before - after).max() > 1e-3


def test_hmlp_batchnorm_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 8)).astype(np.float32) * 2 + 1
    from herd.vision.vit import BatchNorm

    bn = BatchNorm(train=True)
    variables = bn.init(jax.random.PRNGKey(0), x)
    y, updated = bn.apply(variables, x, mutable=["batch_stats"])
    ref = torch.nn.BatchNorm2d(8)
    ref.train()
    y_ref = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), atol=1e-6)
    ref.eval()
    y_eval = BatchNorm(train=False).apply({**variables, **updated}, x)
    y_ref = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(y_eval, y_ref, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------


def test_drop_path_zeroes_whole_samples_and_rescales_survivors():
    x = jnp.ones((4000, 3, 5))
    y = np.asarray(drop_path(x, 0.25, jax.random.PRNGKey(0)))
    per_sample = y.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    values = set(np.unique(per_sample[:, 0]).tolist())
    assert values == {0.0, float(np.float32(1.0) / np.float32(0.75))}
    kept = float(np.mean(per_sample[:, 0] > 0))
    assert abs(kept - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)
    assert abs(float(y.mean()) - 1.0) < 0.05  # unbiased in expectation


def test_eval_is_deterministic_and_train_is_not():
    config = ViTConfig(**TINY, drop_path=0.5)
    variables = _init(config)
    images = _images(config, batch=8)
    model = ViT(config)
    a = model.apply(variables, images)
    b = model.apply(variables, images, rngs={"drop_path": jax.random.PRNGKey(5)})
    np.testing.assert_array_equal(a, b)
    t1 = model.apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(1)})
    t2 = model.apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(2)})
    assert not np.allclose(t1, a) and not np.allclose(t1, t2)
    # rate 0: training equals eval
    c0 = config.replace(drop_path=0.0)
    t0 = ViT(c0).apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(t0, a, atol=1e-6)


@pytest.mark.parametrize("n_parallel", [1, 2])
def test_train_block_drops_each_branch_per_sample(n_parallel):
    """Each sample's block output equals x + sum_j m_j a_j / keep, then + sum_j m'_j f_j /
    keep, for one choice of 0/1 masks per branch and sample: whole residual branches are
    dropped per sample, survivors rescaled."""
    rate, keep = 0.5, 0.5
    config = ViTConfig(dim=16, depth=1, n_heads=2, image_size=16, n_parallel=n_parallel)
    config = config.replace(drop_path=rate, layerscale_init=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 5, 16))
    block = Block(config, train=True)
    params = block.init(jax.random.PRNGKey(1), x)["params"]
    out, _ = block.apply({"params": params}, x, rngs={"drop_path": jax.random.PRNGKey(7)})
    attn = [
        AttentionBranch(config).apply({"params": params[f"attn_{j}"]}, x)[0]
        for j in range(n_parallel)
    ]
    chosen = set()
    for b in range(x.shape[0]):
        matches = []
        for masks in np.ndindex(*(2,) * (2 * n_parallel)):
            ma, mm = masks[:n_parallel], masks[n_parallel:]
            h = x[b : b + 1] + sum(m * a[b : b + 1] / keep for m, a in zip(ma, attn, strict=True))
            mlp = [
                MlpBranch(config).apply({"params": params[f"mlp_{j}"]}, h)
                for j in range(n_parallel)
            ]
            h = h + sum(m * f / keep for m, f in zip(mm, mlp, strict=True))
            if np.allclose(h, out[b : b + 1], atol=1e-5):
                matches.append(masks)
        assert len(matches) == 1, (b, matches)
        chosen.add(matches[0])
    assert len(chosen) > 1  # samples drew different masks


# ---------------------------------------------------------------------------------------
# Scan vs unrolled, remat, attention maps
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_parallel", [1, 2])
def test_scan_and_unrolled_blocks_give_equal_logits(n_parallel):
    config = ViTConfig(**TINY, n_parallel=n_parallel, layerscale_init=0.3)
    images = _images(config)
    params = nn.meta.unbox(_init(config)["params"])

    def run(c, p):
        return jax.jit(lambda p: ViT(c).apply({"params": p}, images, return_attention=True))(p)

    logits, maps = run(config, params)
    unrolled = config.replace(scan_blocks=False)
    flat = unstack_blocks(params, config.depth)
    logits2, maps2 = run(unrolled, flat)
    np.testing.assert_allclose(logits, logits2, atol=1e-5)
    np.testing.assert_allclose(maps, maps2, atol=1e-6)
    t = 1 + config.num_patches
    assert maps.shape == (config.depth * n_parallel, 2, config.n_heads, t, t)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    # the unrolled init names the same params (shapes without the layers axis)
    fresh = nn.meta.unbox(_init(unrolled)["params"])
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, flat)


@pytest.mark.parametrize("policy", ["full", "save_attn"])
def test_remat_policies_keep_loss_and_grads(policy):
    config = ViTConfig(**TINY, drop_path=0.2)
    images = _images(config)
    params = nn.meta.unbox(_init(config)["params"])

    def loss(p, c):
        rngs = {"drop_path": jax.random.PRNGKey(3)}
        return jnp.sum(ViT(c).apply({"params": p}, images, train=True, rngs=rngs) ** 2)

    ref_l, ref_g = jax.value_and_grad(loss)(params, config)
    loss_value, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, config.replace(remat_policy=policy)
    )
    np.testing.assert_allclose(loss_value, ref_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)


def test_pos_embed_has_a_class_token_row_only_when_asked():
    # DeiT III: pos_embed covers the patches only; timm's 18x2 models embed the class too.
    # (That each is wired as its reference has it is checked against timm's logits in
    # test_convert.py: deit3_* without, vit_small_patch16_18x2_224 with.)
    for cls_pos, rows in ((False, 4), (True, 5)):
        config = ViTConfig(**TINY, class_token_pos_emb=cls_pos, layerscale_init=0.5)
        params = nn.meta.unbox(_init(config)["params"])
        assert params["pos_embed"].shape == (rows, 32)
        # moving pos_embed's patch rows changes the logits; with cls_pos, row 0 too
        images = _images(config)
        apply = jax.jit(lambda p, c=config, x=images: ViT(c).apply({"params": p}, x))
        base = apply(params)
        # (a random vector: a constant shift of a token is invisible to LayerNorm)
        bump = jax.random.normal(jax.random.PRNGKey(9), (32,))
        bumped = dict(params, pos_embed=params["pos_embed"].at[0].add(bump))
        changed = apply(bumped)
        assert not np.allclose(base, changed)


def test_bfloat16_compute_is_close_to_float32():
    config = ViTConfig(**TINY)
    params = nn.meta.unbox(_init(config)["params"])
    images = _images(config)
    ref = ViT(config).apply({"params": params}, images)
    low = ViT(config.replace(dtype="bfloat16")).apply({"params": params}, images)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, atol=0.05 * float(jnp.abs(ref).max()))


# ---------------------------------------------------------------------------------------
# Position-embedding interpolation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_pos", [False, True])
def test_pos_emb_interpolation_shapes_and_identity(cls_pos):
    config = ViTConfig(**TINY, class_token_pos_emb=cls_pos)
    params = nn.meta.unbox(_init(config)["params"])
    same = interpolate_pos_emb(params, config, 32)
    np.testing.assert_array_equal(same["pos_embed"], params["pos_embed"])
    bigger = interpolate_pos_emb({"params": params}, config, 64)["params"]
    assert bigger["pos_embed"].shape == (16 + cls_pos, 32)
    if cls_pos:  # the class token's row is carried over unchanged
        np.testing.assert_array_equal(bigger["pos_embed"][0], params["pos_embed"][0])
    big = config.replace(image_size=64)
    logits = ViT(big).apply({"params": bigger}, _images(big))
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match="image_size=40 is not divisible by patch_size=16"):
        interpolate_pos_emb(params, config, 40)


def test_bicubic_matrix_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).normal(size=(14, 14, 6)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None],
            size=(24, 24),
            mode="bicubic",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    m = bicubic_resize_matrix(14, 24)
    ours = np.einsum("ih,jw,hwd->ijd", m, m, grid.astype(np.float64))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # through interpolate_pos_emb (196 -> 576 patch rows)
    config = ViTConfig(dim=6, depth=1, n_heads=1, image_size=224)
    params = {"pos_embed": jnp.asarray(grid.reshape(196, 6))}
    new = interpolate_pos_emb(params, config, 384)["pos_embed"]
    np.testing.assert_allclose(np.asarray(new).reshape(24, 24, 6), ref, atol=1e-5)
    # downsampling, too (no antialiasing, like DeiT's fine-tuning script)
    ref_down = (
        torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None],
            size=(10, 10),
            mode="bicubic",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    m = bicubic_resize_matrix(14, 10)
    np.testing.assert_allclose(np.einsum("ih,jw,hwd->ijd", m, m, grid), ref_down, atol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_hmlp_stem_matches_torch_with_official_keys(norm):
    """The official hMLP_stem (models_v2.py) is nn.Sequential(Conv2d(3, D/4, 4, 4), norm,
    GELU, Conv2d(D/4, D/4, 2, 2), norm, GELU, Conv2d(D/4, D, 2, 2), norm); built here from
    torch layers (BatchNorm2d in eval mode with non-trivial statistics, or a LayerNorm over
    channels), its state dict converted, the tokens compared."""
    torch = pytest.importorskip("torch")
    from herd.vision.convert import from_timm_variables, to_timm

    d = 32
    torch.manual_seed(0)

    class ChannelLN(torch.nn.LayerNorm):  # LayerNorm over channels of an NCHW map
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def make_norm(c):
        return torch.nn.BatchNorm2d(c) if norm == "bn" else ChannelLN(c, eps=1e-6)

    stem = torch.nn.Sequential(
        torch.nn.Conv2d(3, d // 4, 4, 4), make_norm(d // 4), torch.nn.GELU(),
        torch.nn.Conv2d(d // 4, d // 4, 2, 2), make_norm(d // 4), torch.nn.GELU(),
        torch.nn.Conv2d(d // 4, d, 2, 2), make_norm(d),
    )  # fmt: skip
    with torch.no_grad():
        for m in stem:
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    stem.eval()
    config = ViTConfig(dim=d, depth=1, n_heads=2, image_size=32, stem=f"hmlp_{norm}")
    sd = {f"patch_embed.proj.{k}": v.numpy() for k, v in stem.state_dict().items()}
    full = to_timm(config, nn.meta.unbox(_init(config)["params"]))  # the rest of a model
    full.update(sd)
    _, variables = from_timm_variables(full, "vit_s", dim=d, depth=1, n_heads=2)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = stem(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach()
    stem_vars = {k: v["hmlp_stem"] for k, v in variables.items()}
    ours = HMLPStem(config).apply(stem_vars, images)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def _reference_attention(params, x, config):
    """Multi-head self-attention written plainly (scaled queries, softmax, context), on
    the branch's own params: what the head-major, folded-scale, late-normalised form in
    AttentionBranch must equal."""
    p = params
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    xn = (x - mean) / jnp.sqrt(var + config.norm_eps) * p["norm"]["scale"] + p["norm"]["bias"]
    hp = jax.lax.Precision.HIGHEST
    qkv = jnp.einsum("btd,dshe->btshe", xn, p["qkv"]["kernel"], precision=hp) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.einsum("bqhe,bkhe->bhqk", q / math.sqrt(config.head_dim), k, precision=hp)
    probs = jax.nn.softmax(s, axis=-1)
    ctx = jnp.einsum("bhqk,bkhe->bqhe", probs, v, precision=hp)
    y = jnp.einsum("bthe,hed->btd", ctx, p["proj"]["kernel"], precision=hp) + p["proj"]["bias"]
    return y * p["layerscale"], probs


def test_attention_branch_equals_plain_softmax_attention():
    """Output, probabilities and parameter gradients of AttentionBranch match the plain
    form; the params are a Dense's (qkv kernel [D, 3, H, hd], bias [3, H, hd])."""
    config = ViTConfig(dim=48, depth=1, n_heads=3, image_size=16, layerscale_init=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 48)) * 3.0
    branch = AttentionBranch(config)
    params = nn.meta.unbox(branch.init(jax.random.PRNGKey(1), x)["params"])
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params
    )
    assert params["qkv"]["kernel"].shape == (48, 3, 3, 16)
    assert params["qkv"]["bias"].shape == (3, 3, 16)
    y, probs = branch.apply({"params": params}, x)
    y_ref, probs_ref = _reference_attention(params, x, config)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(probs, probs_ref, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    def loss(fn):
        return lambda p: jnp.sum(jnp.sin(fn(p)))

    g = jax.grad(loss(lambda p: branch.apply({"params": p}, x)[0]))(params)
    g_ref = jax.grad(loss(lambda p: _reference_attention(p, x, config)[0]))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
