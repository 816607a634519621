"""herd.vision.train: cosub through the train step, attention-only fine-tuning at a new
resolution, sharded == one device, resume == uninterrupted, bad input, and the digits
default's held-out accuracy. Tiny models (configs/vision/tiny.py) unless stated."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.core import step as step_lib
from herd.core.config import load_config
from herd.core.optim import frozen_mask
from herd.vision import losses, models
from herd.vision import train as vision_train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_DEVICE = ["--config.mesh.fsdp=1"]


def _cfg(*overrides, config="vision/tiny.py"):
    return load_config(config, list(overrides))


def _run(tmp, name, *overrides, devices=None, config="vision/tiny.py"):
    one = devices is None
    cfg = _cfg(*(ONE_DEVICE if one else []), *overrides, config=config)
    devices = jax.devices()[:1] if one else devices
    return vision_train.run(cfg, str(tmp / name), progress=False, devices=devices)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, atol):
    flat_a = jax.tree_util.tree_leaves_with_path(_host(a))
    flat_b = jax.tree.leaves(_host(b))
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- cosub


def test_cosub_loss_through_the_train_step():
    """The step's loss is the four-term cosub loss of two different drop-path submodels."""
    cfg = _cfg()
    config = vision_train.build_model_config(cfg.model)
    model = models.make_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    labels = rng.integers(0, 10, 8)
    targets = 0.6 * np.eye(10)[labels] + 0.4 * np.eye(10)[np.roll(labels, 1)]  # mixup-like
    batch = {"image": images, "target": jnp.asarray(targets, jnp.float32)}
    key = jax.random.key_data(jax.random.key(3))

    loss_fn = vision_train.make_loss_fn(model, "bce", cosub=True)
    loss, grads, weight, _, _ = step_lib.accumulate_gradients(loss_fn, params, batch, key)
    assert float(weight) == 8

    # the same forward pass, by hand: the duplicated batch under the step's drop-path key
    both = jnp.concatenate([images, images])
    logits = np.asarray(
        model.apply(
            {"params": params}, both, train=True, rngs={"drop_path": jax.random.wrap_key_data(key)}
        ),
        np.float64,
    )
    z1, z2 = logits[:8], logits[8:]
    assert np.abs(z1 - z2).max() > 1e-4, "the two copies must be two different submodels"
    y = (targets > 0) * 1.0

    def bce(z, t):
        s = 1 / (1 + np.exp(-z))
        return np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)), -1)

    s1, s2 = 1 / (1 + np.exp(-z1)), 1 / (1 + np.exp(-z2))
    want = np.mean(0.25 * (bce(z1, y) + bce(z2, y) + bce(z1, s2) + bce(z2, s1)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)

    # the gradient equals that of the loss with the cross-term targets as constants
    def explicit(p):
        z = model.apply(
            {"params": p}, both, train=True, rngs={"drop_path": jax.random.wrap_key_data(key)}
        )
        t1, t2 = jnp.asarray(s1, jnp.float32), jnp.asarray(s2, jnp.float32)
        a, b = z[:8], z[8:]
        yy = jnp.asarray(y, jnp.float32)
        return jnp.mean(
            0.25
            * (
                losses.binary_cross_entropy(a, yy)
                + losses.binary_cross_entropy(b, yy)
                + losses.binary_cross_entropy(a, t2)
                + losses.binary_cross_entropy(b, t1)
            )
        )

    _assert_trees_close(grads, jax.grad(explicit)(params), atol=1e-6)


def test_cosub_trains_on_the_mesh(tmp_path):
    s = _run(tmp_path, "cosub", "--config.cosub=true", "--config.train.steps=3",
             devices=jax.devices())  # fmt: skip
    assert s["final_step"] == 3
    assert all(np.isfinite(v) for v in s["loss"].values())
    # cosub runs every image twice: the MFU accounting counts both copies
    rows = [json.loads(x) for x in open(os.path.join(s["workdir"], "metrics.jsonl"))]
    assert rows[0]["flops_per_image"] > 0


# ------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny ViT trained 3 steps at 16 px (its workdir and final state)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    return _run(tmp, "pre", "--config.train.steps=3")


def test_attention_only_finetuning_freezes_everything_else(tmp_path, pretrained):
    pre = _host(pretrained["state"].params)
    s = _run(
        tmp_path,
        "ft",
        f"--config.finetune.init_from={pretrained['workdir']}",
        "--config.finetune.attention_only=true",
        "--config.model.image_size=24",  # a new resolution: 4x4 -> 6x6 patches
        "--config.train.steps=3",
    )
    assert s["final_step"] == 3
    ft = _host(s["state"].params)
    frozen = frozen_mask(ft, None, vision_train.ATTENTION_ONLY_TRAINABLE)
    n_frozen = n_trained = 0
    for (path, new), old, is_frozen in zip(
        jax.tree_util.tree_leaves_with_path(ft),
        jax.tree.leaves(pre),
        jax.tree.leaves(frozen),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        if "pos_embed" in name:
            assert new.shape == (36, 32) and old.shape == (16, 32)
            assert not is_frozen
            continue
        if is_frozen:
            n_frozen += 1
            np.testing.assert_array_equal(new, old, err_msg=name)  # bit-identical
        else:
            n_trained += 1
            assert not np.array_equal(new, old), name
    # attention qkv / proj kernels and biases, the head; everything else frozen
    assert n_trained == 6 and n_frozen > 10, (n_trained, n_frozen)
    assert s["trainable_params"] < s["n_params"] / 2


def test_finetune_at_new_resolution_interpolates_pos_emb(tmp_path, pretrained):
    """Full fine-tuning at 24 px starts from the pre-trained weights with a bicubically
    resized position embedding (checked at step 0 against V1's interpolate_pos_emb)."""
    from herd.vision.vit import interpolate_pos_emb

    s = _run(
        tmp_path,
        "ft0",
        f"--config.finetune.init_from={pretrained['workdir']}",
        "--config.model.image_size=24",
        "--config.train.steps=1",
        "--config.optim.lr=0",
        "--config.optim.start_lr=0",
        "--config.optim.min_lr=0",
        "--config.optim.weight_decay=0",
    )
    src = vision_train.build_model_config(_cfg().model)
    want = interpolate_pos_emb(_host(pretrained["state"].params), src, 24)
    _assert_trees_close(s["state"].params, want, atol=0)


# ------------------------------------------------------------- mesh and resume


def test_sharded_training_equals_one_device(tmp_path):
    steps = ["--config.train.steps=3"]
    one = _run(tmp_path, "one", *steps)
    mesh = ["--config.mesh.data=4", "--config.mesh.fsdp=2"]
    sharded = _run(tmp_path, "mesh", *steps, *mesh, devices=jax.devices())
    spec = sharded["state"].params["head"]["kernel"].sharding
    assert spec.mesh.shape["data"] == 4 and spec.mesh.shape["fsdp"] == 2
    for s in sorted(one["loss"]):
        np.testing.assert_allclose(sharded["loss"][s], one["loss"][s], rtol=1e-5)
    _assert_trees_close(sharded["state"].params, one["state"].params, atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path, "full", "--config.train.steps=4")
    first = _run(tmp_path, "split", "--config.train.steps=4", "--config.train.stop_after=2")
    assert first["final_step"] == 2
    second = _run(tmp_path, "split", "--config.train.steps=4")
    assert second["final_step"] == 4
    assert second["loss"][4] == full["loss"][4]
    _assert_trees_close(second["state"].params, full["state"].params, atol=0)
    _assert_trees_close(second["state"].opt_state, full["state"].opt_state, atol=0)


def test_patchconvnet_trains_on_the_mesh(tmp_path):
    """A PatchConvNet step through the trainer on data x fsdp x tensor = 2 x 2 x 2 (the
    vision axis rules once refused its stem kernels, then split its single pooling head
    over tensor): a finite BCE near ln 2 at init, the trunk's hidden width split over
    tensor, an evaluation and the pooling map PNG (configs/vision/patchconvnet_tiny.py:
    width 32, 2 blocks, 32 px)."""
    pcn = "vision/patchconvnet_tiny.py"
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    s = _run(tmp_path, "pcn", *mesh, "--config.train.steps=1",
             "--config.train.attention_maps=2", devices=jax.devices(), config=pcn)  # fmt: skip
    assert s["final_step"] == 1
    assert 0.5 < s["loss"][1] < 0.9, s["loss"]  # BCE over 10 classes of a fresh model
    config = vision_train.build_model_config(_cfg(config=pcn).model)
    assert s["n_params"] == models.count_params(config)
    hidden = s["state"].params["blocks"]["conv_in"]["kernel"].sharding.spec
    assert tuple(hidden) == (None, "fsdp", "tensor"), hidden
    assert 0.0 <= s["top1"] <= s["top5"] <= 1.0
    assert os.path.getsize(s["attention_png"]) > 1000


# ---------------------------------------------------------------------- recipes

VISION_CONFIGS = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(REPO, "configs", "vision", "*.py"))
    if "def get_config" in open(p).read()
)


@pytest.mark.parametrize("name", VISION_CONFIGS)
def test_every_vision_config_builds_and_validates(name):
    """Each configs/vision/*.py gives a valid model config and passes the trainer's checks
    (on one device) with a known augment recipe: no compile, no data."""
    from herd.core.mesh import make_mesh
    from herd.vision.augment import AUGMENTS

    cfg = _cfg(config=f"vision/{name}")
    config = vision_train.build_model_config(cfg.model)
    assert config.image_size % config.patch_size == 0
    vision_train.validate_config(cfg, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    assert cfg.data.augment in AUGMENTS


def test_in21k_recipes_follow_the_official_commands():
    """DeiT III IN-21k pre-training (README_revenge.md): CE with smoothing 0.1, cutmix only,
    simple random crop + 3-Augment, lr 1e-3, wd 0.02, 240 epochs, per-size drop path."""
    for size, drop_path in (("vit_s", 0.05), ("vit_b", 0.1), ("vit_l", 0.3)):
        c = _cfg(config=f"vision/deit3_in21k.py:{size}")
        assert (c.loss.name, c.loss.label_smoothing) == ("ce", 0.1)
        assert (c.data.mixup_alpha, c.data.cutmix_alpha) == (0.0, 1.0)
        assert (c.data.augment, c.data.repeated_aug) == ("3aug_simple_crop", 1)
        assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay) == ("lamb", 1e-3, 0.02)
        assert (c.train.epochs, c.model.drop_path, c.model.image_size) == (240.0, drop_path, 224)
    ft = _cfg(config="vision/deit3_in21k_finetune.py:vit_b")
    assert (ft.optim.lr, ft.train.epochs, ft.model.drop_path) == (3e-4, 50.0, 0.15)
    assert ft.model.num_classes == 1000 and ft.finetune.reinit_head


# ------------------------------------------------------------------------ entry


def _entry(args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "herd.vision.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_variant_is_one_error_line(tmp_path):
    out = _entry(
        ["--config=configs/vision/tiny.py", "--config.model.name=vit_x", f"--workdir={tmp_path}"]
    )
    _one_line_error(out, "'vit_x'", "vit_s", "patchconvnet_s60")


def test_num_classes_against_the_checkpoint_head(tmp_path, pretrained):
    out = _entry(
        [
            "--config=configs/vision/tiny.py",
            f"--config.finetune.init_from={pretrained['workdir']}",
            "--config.model.num_classes=5",
            f"--workdir={tmp_path}",
        ]
    )
    _one_line_error(out, "num_classes 5", "10 classes", "finetune.reinit_head=true")


# ----------------------------------------------------------------------- the default


def test_default_reaches_95_percent_on_the_digits(tmp_path):
    """The no-argument default (configs/vision/default.py), on one device: >= 95% held-out
    top-1 on the digits and a PNG of attention maps (about 2 CPU minutes)."""
    s = _run(tmp_path, "default", config="vision/default.py")
    assert s["top1"] >= 0.95, s["top1"]
    assert s["top5"] >= s["top1"]
    assert os.path.getsize(s["attention_png"]) > 1000
    assert s["images_per_second"] > 0


# ------------------------------------------------------------------- FLOPs per image


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("vit_ti", dict(dim=32, depth=5, n_heads=2, image_size=32, patch_size=8)),
        ("vit_s_18x2", dict(dim=32, depth=4, n_heads=2, image_size=32, stem="hmlp_bn")),
        ("patchconvnet_s60", dict(dim=32, depth=5, image_size=32)),
    ],
)
def test_flops_per_image_counts_every_scanned_block(name, overrides):
    """XLA counts a while loop's body once: the scanned model must still count depth blocks,
    i.e. equal 3 x the fully unrolled forward's cost analysis (and the unrolled config)."""
    config = models.model_config(name, num_classes=10, **overrides)
    scanned = vision_train.flops_per_image(config.replace(scan_blocks=True))
    unrolled = vision_train.flops_per_image(config.replace(scan_blocks=False))
    want = 3.0 * vision_train.forward_flops(config.replace(scan_blocks=False))
    assert want > 0
    np.testing.assert_allclose(scanned, want, rtol=0.01)
    np.testing.assert_allclose(unrolled, want, rtol=0.01)


def test_flops_per_image_of_vit_s16_matches_the_analytic_count():
    """ViT-S/16 at 224, 1000 classes. Analytic forward (2 FLOPs per multiply-add):
    depth * (2 T (4 d^2 + 2 d f) + 4 T^2 d)   qkv, proj, fc1, fc2; q k^T and probs v
    + 2 N (3 p^2) d + 2 d classes             patch embedding, head
    with T = 197 tokens, N = 196 patches, d = 384, f = 1536, p = 16, depth 12: 9.20 G;
    training = 3 x forward = 27.6 G. XLA also counts element-wise ops (LN, GELU, softmax,
    residuals): ~3% more (28.4 G), so the count must lie in [analytic, 1.05 x analytic]."""
    config = models.model_config("vit_s")
    t, n, d, f, p = 197, 196, 384, 1536, 16
    forward = 12 * (2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d)
    forward += 2 * n * 3 * p * p * d + 2 * d * 1000
    got = vision_train.flops_per_image(config)
    assert 3 * forward <= got <= 1.05 * 3 * forward, (got / 1e9, 3 * forward / 1e9)
