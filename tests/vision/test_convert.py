"""herd.vision.convert: timm / official DeiT III / official PatchConvNet state dicts.

Parity: tests/golden/vision_<model>.npz hold timm's logits for seeded weights
(tests/vision/timm_weights.seeded_state_dict) on seeded images (golden_images), made with a
real timm by tools/make_golden_vision.py; herd's converted model must give the same logits.
"""

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from herd.vision.convert import detect_layout, from_timm, from_timm_variables, to_timm
from herd.vision.models import abstract_variables, make_model, model_config
from herd.vision.vit import interpolate_pos_emb
from tests.vision.timm_weights import golden_images, seeded_state_dict

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = ["deit3_small_patch16_224", "deit3_base_patch16_224", "vit_small_patch16_18x2_224"]


def _golden(case):
    path = GOLDEN / f"vision_{case}.npz"
    if not path.exists():
        pytest.skip(f"{path.name} not made yet (tools/make_golden_vision.py writes it)")
    z = np.load(path)
    entries = json.loads(str(z["entries_json"]))
    sd = seeded_state_dict(entries, int(z["seed"]))
    images = golden_images(int(z["image_seed"]), int(z["num_images"]), int(z["image_size"]))
    return z, entries, sd, images


def _logits(config, params, images):
    model = make_model(config)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))


@pytest.mark.parametrize("case", CASES)
def test_converted_timm_model_gives_timms_logits(case):
    z, entries, sd, images = _golden(case)
    assert str(z["model"]) == case
    config, params = from_timm(sd, case)
    logits = _logits(config, params, images)
    assert logits.shape == z["logits"].shape == (2, 1000)
    np.testing.assert_allclose(logits, z["logits"], atol=1e-4, rtol=0)
    # the check has teeth: timm's logits differ between the two images by far more
    assert np.abs(z["logits"][0] - z["logits"][1]).max() > 0.1


@pytest.mark.parametrize("case", CASES)
def test_to_timm_inverts_from_timm_exactly(case):
    _, entries, sd, _ = _golden(case)
    for scan in (True, False):
        config, params = from_timm(sd, case, scan_blocks=scan)
        back = to_timm(config, params)
        assert list(back) == [name for name, _ in entries]  # timm's own order
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def _timm_to_official(sd):
    """timm keys -> the official DeiT III release's (models_v2.py): LayerScale gamma_1/2,
    a parallel block's branch j=1 as norm11/attn1/gamma_1_1/norm21/mlp1/gamma_2_1."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k)
        m = re.match(r"(blocks\.\d+\.)(attns|ffns)\.(\d)\.(norm|attn|mlp|ls\.gamma)(.*)", k)
        if m:
            pre, kind, j, mod, rest = m.groups()
            s = "" if j == "0" else "1"
            n = "1" if kind == "attns" else "2"
            if mod == "norm":
                mod = f"norm{n}{s}"
            elif mod == "ls.gamma":
                mod = f"gamma_{n}" + ("" if j == "0" else "_1")
            else:
                mod = mod + s
            k = pre + mod + rest
        out[k] = v
    return out


@pytest.mark.parametrize("case", ["deit3_small_patch16_224", "vit_small_patch16_18x2_224"])
def test_official_deit_layout_is_the_same_model(case):
    _, _, sd, _ = _golden(case)
    official = _timm_to_official(sd)
    assert detect_layout(official) == "official" and detect_layout(sd) == "timm"
    name = {"deit3_small_patch16_224": "deit_small_patch16_LS"}.get(case, case)
    config, params = from_timm({"model": official}, name)  # a .pth holds it under 'model'
    ref_config, ref_params = from_timm(sd, case)
    assert config.replace(layerscale_init=None) == ref_config.replace(layerscale_init=None)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    back = to_timm(config, params, layout="official")
    assert set(back) == set(official)
    for k in official:
        np.testing.assert_array_equal(back[k], official[k], err_msg=k)


def test_official_names_resolve_like_the_release():
    _, _, sd, _ = _golden("deit3_small_patch16_224")
    config, _ = from_timm(_timm_to_official(sd), "deit_small_patch16_LS")
    assert (config.dim, config.depth, config.n_heads, config.image_size) == (384, 12, 6, 224)
    assert not config.class_token_pos_emb and config.layerscale_init == 1e-4


def test_head_mismatch_says_how_to_reinitialise_it():
    _, _, sd, images = _golden("deit3_small_patch16_224")
    with pytest.raises(
        ValueError, match=r"num_classes=10 disagrees.*1000 classes.*reinit_head=True"
    ):
        from_timm(sd, "deit3_small_patch16_224", num_classes=10)
    config, params = from_timm(sd, "deit3_small_patch16_224", num_classes=10, reinit_head=True)
    assert config.num_classes == 10
    assert params["head"]["kernel"].shape == (384, 10)
    np.testing.assert_array_equal(params["head"]["bias"], 0)
    assert 0.01 < np.std(params["head"]["kernel"]) < 0.03  # normal(0.02)
    _, ref = from_timm(sd, "deit3_small_patch16_224")
    np.testing.assert_array_equal(params["blocks"]["attn_0"]["qkv"]["kernel"],
                                  ref["blocks"]["attn_0"]["qkv"]["kernel"])  # fmt: skip
    # num_classes=0: no head, the model returns class-token features (timm's pre_logits)
    config0, params0 = from_timm(sd, "deit3_small_patch16_224", num_classes=0, reinit_head=True)
    assert "head" not in params0
    z, *_ = _golden("deit3_small_patch16_224")
    feats = _logits(config0, params0, images)
    np.testing.assert_allclose(feats, z["pre_logits"], atol=1e-4)


def test_bad_checkpoints_are_one_clear_error():
    _, _, sd, _ = _golden("deit3_small_patch16_224")
    with pytest.raises(ValueError, match="unknown model name 'deit4_small'.*deit3_"):
        from_timm(sd, "deit4_small")
    broken = dict(sd)
    del broken["blocks.3.ls2.gamma"]
    broken["blocks.3.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing \['blocks.3.ls2.gamma'\].*unexpected"):
        from_timm(broken, "deit3_small_patch16_224")
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 384\).*needs \(1, 1, 768\)"):
        from_timm(sd, "deit3_base_patch16_224")  # base wants 768 wide
    with pytest.raises(ValueError, match="is a ViT but the state dict has 'patchconvnet'"):
        from_timm({"blocks_token_only.0.gamma_1": np.zeros(3)}, "deit3_small_patch16_224")


def test_new_resolution_interpolates_the_position_embedding():
    _, _, sd, _ = _golden("deit3_small_patch16_224")
    config, params = from_timm(sd, "deit3_small_patch16_224")
    big, big_params = from_timm(sd, "deit3_small_patch16_224", image_size=384)
    assert big.image_size == 384 and big_params["pos_embed"].shape == (576, 384)
    expected = interpolate_pos_emb(params, config, 384)["pos_embed"]
    np.testing.assert_allclose(big_params["pos_embed"], expected, atol=1e-7)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    _, _, sd, _ = _golden("deit3_small_patch16_224")
    as_torch = {"module." + k: torch.from_numpy(v) for k, v in sd.items()}
    _, params = from_timm(as_torch, "deit3_small_patch16_224")
    _, ref = from_timm(sd, "deit3_small_patch16_224")
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    half = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    _, params = from_timm(half, "deit3_small_patch16_224")
    assert params["pos_embed"].dtype == np.float32


def _random_variables(config, seed=0):
    """Random params (and BatchNorm statistics) of the model's shapes (eval_shape: no
    compilation), every value distinct."""
    shapes = nn.meta.unbox(abstract_variables(config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def test_patchconvnet_official_layout_round_trip():
    config = model_config("patchconvnet_s60", dim=64, depth=3, image_size=32, num_classes=7)
    params = _random_variables(config)["params"]
    sd = to_timm(config, params)
    assert detect_layout(sd) == "patchconvnet"
    # the official key names (patchconvnet_models.py) and torch shapes
    assert sd["patch_embed.proj.0.0.weight"].shape == (8, 3, 3, 3)
    assert sd["blocks.2.attn.qkv_pos.2.weight"].shape == (64, 1, 3, 3)  # depthwise
    assert sd["blocks.0.attn.qkv_pos.4.conv_reduce.weight"].shape == (16, 64, 1, 1)
    assert sd["blocks_token_only.0.attn.q.weight"].shape == (64, 64)
    assert sd["cls_token"].shape == (1, 1, 64) and sd["head.weight"].shape == (7, 64)
    assert list(sd)[:2] == ["cls_token", "patch_embed.proj.0.0.weight"]
    back_config, back = from_timm(sd, "S60", dim=64, depth=3, image_size=32)
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_official_hmlp_batchnorm_stem_round_trip():
    config = model_config("vit_s", dim=32, depth=2, n_heads=2, image_size=32, stem="hmlp_bn")
    variables = _random_variables(config)
    sd = to_timm(config, variables["params"], batch_stats=variables["batch_stats"])
    assert sd["patch_embed.proj.0.weight"].shape == (8, 3, 4, 4)
    assert sd["patch_embed.proj.7.running_var"].shape == (32,)
    sd["patch_embed.proj.1.num_batches_tracked"] = np.array(5)  # torch's counter: ignored
    back_config, back = from_timm_variables(sd, "vit_s", dim=32, depth=2, n_heads=2)
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, variables)
