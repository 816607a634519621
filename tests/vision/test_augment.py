"""Host augmentations (herd.vision.augment) against the semantics of torchvision / timm / deit.

The reference PyTorch transforms need torchvision, which is not installed here, so the checks
are independent formulas (luma, solarize, reflect padding, crop offsets, box areas) and the
published ranges of each draw.
"""

import math

import numpy as np
import pytest
from PIL import Image

from herd.vision import augment as va


def _image(h=48, w=64, seed=0):
    """A smooth random RGB image (blur and crops then act visibly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# 3-Augment
# --------------------------------------------------------------------------------------------


def _which_op(src: np.ndarray, out: np.ndarray) -> str:
    """Which 3-Augment op turned src into out (colour jitter off), by independent formulas."""
    src = src.astype(np.int64)
    out = out.astype(np.int64)
    # ITU-R 601-2 luma in PIL's fixed point
    luma = (src[..., 0] * 19595 + src[..., 1] * 38470 + src[..., 2] * 7471 + 0x8000) >> 16
    if np.array_equal(out, np.repeat(luma[..., None], 3, -1)):
        return "grayscale"
    if np.array_equal(out, np.where(src >= 128, 255 - src, src)):
        return "solarize"
    # a Gaussian blur keeps the mean and lowers the variation between neighbours
    tv = lambda x: np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()
    if abs(out.mean() - src.mean()) < 1.5 and tv(out) <= tv(src):  # sigma 0.1: ~identity
        return "gaussian_blur"
    return "none of them"


def test_three_augment_applies_exactly_one_op(monkeypatch):
    calls = []
    for name in va.THREE_AUGMENT_OPS:
        real = getattr(va, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(va, name, spy)
    img = _image()
    src = np.asarray(img)
    seen = []
    for seed in range(240):
        calls.clear()
        out = va.three_augment(img, np.random.default_rng(seed), color_jitter_strength=0.0)
        assert len(calls) == 1, calls  # never two, never none
        assert _which_op(src, np.asarray(out)) == calls[0]
        seen.append(calls[0])
    counts = {name: seen.count(name) for name in va.THREE_AUGMENT_OPS}
    # uniform choice: 80 expected each, binomial sd ~7.3
    assert all(50 <= c <= 110 for c in counts.values()), counts


def test_three_augment_then_colour_jitter_changes_the_op_output(monkeypatch):
    img = _image()
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    plain = np.asarray(va.three_augment(img, rng_a, color_jitter_strength=0.0))
    jittered = np.asarray(va.three_augment(img, rng_b, color_jitter_strength=0.3))
    assert jittered.shape == plain.shape and not np.array_equal(plain, jittered)


def test_solarize_threshold_and_blur_sigma_range(monkeypatch):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    out = np.asarray(va.solarize(Image.fromarray(arr)))
    np.testing.assert_array_equal(
        out[..., 0].ravel(), [v if v < 128 else 255 - v for v in range(256)]
    )
    radii = []
    real = va.ImageFilter.GaussianBlur
    monkeypatch.setattr(
        va.ImageFilter, "GaussianBlur", lambda radius: radii.append(radius) or real(radius)
    )
    for seed in range(200):
        va.gaussian_blur(_image(16, 16), np.random.default_rng(seed))
    assert 0.1 <= min(radii) < 0.3 and 1.8 < max(radii) <= 2.0


def test_color_jitter_factor_ranges():
    """Brightness alone scales every pixel by one factor in [0.7, 1.3]."""
    arr = np.full((8, 8, 3), 100, np.uint8)
    factors = []
    for seed in range(200):
        out = np.asarray(va.color_jitter(Image.fromarray(arr), seed, 0.3, 0.0, 0.0))
        assert (out == out[0, 0, 0]).all()
        factors.append(out[0, 0, 0] / 100.0)
    assert 0.69 <= min(factors) < 0.75 and 1.25 < max(factors) <= 1.31


# --------------------------------------------------------------------------------------------
# Crops and flips
# --------------------------------------------------------------------------------------------


def test_random_resized_crop_scale_ratio_and_shape():
    W, H = 400, 300
    fracs, aspects = [], []
    for seed in range(2000):
        top, left, h, w = va.rrc_params(W, H, np.random.default_rng(seed))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        fracs.append(h * w / (H * W))
        aspects.append(w / h)
    # w, h are rounded to integers: allow a pixel of slack on the bounds
    assert 0.08 * 0.95 <= min(fracs) < 0.1 and 0.9 < max(fracs) <= 1.0
    assert 0.75 * 0.97 <= min(aspects) < 0.8 and 1.25 < max(aspects) <= 4 / 3 * 1.03
    out = va.random_resized_crop(_image(300, 400), 224, np.random.default_rng(0))
    assert out.size == (224, 224) and out.mode == "RGB"


def test_random_resized_crop_falls_back_to_the_centre_crop():
    # a 1000x10 strip: no box of area >= 8% with aspect in [3/4, 4/3] fits in 10 rows, so all
    # ten tries fail and timm's fallback takes the centre, height 10, width round(10 * 4/3)
    assert va.rrc_params(1000, 10, np.random.default_rng(0)) == (0, (1000 - 13) // 2, 10, 13)
    assert va.rrc_params(10, 1000, np.random.default_rng(0)) == ((1000 - 13) // 2, 0, 13, 10)


def test_simple_random_crop_is_a_window_of_the_reflect_padded_image():
    img = _image(40, 40, seed=1)
    padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets = set()
    for seed in range(300):
        out = np.asarray(va.simple_random_crop(img, 40, np.random.default_rng(seed), padding=4))
        assert out.shape == (40, 40, 3)
        hits = [
            (i, j)
            for i in range(9)
            for j in range(9)
            if np.array_equal(out, padded[i : i + 40, j : j + 40])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 70  # uniform over the 81 placements
    # a larger image: resized so its shorter side is the crop size, then padded by 4
    out = va.simple_random_crop(_image(80, 120), 40, 0)
    assert out.size == (40, 40)


def test_eval_centre_crop_ratio():
    arr = np.asarray(_image(256, 300, seed=2))
    img = Image.fromarray(arr)
    # crop ratio 0.875 at 224: shorter side to int(224 / 0.875) = 256 (this image already), then
    # the centre 224 x 224: top round(32 / 2) = 16, left round(76 / 2) = 38
    out = np.asarray(va.eval_resize_crop(img, 224, crop_ratio=0.875))
    np.testing.assert_array_equal(out, arr[16:240, 38:262])
    # crop ratio 1.0 (DeiT III): the shorter side is resized to the crop size itself
    out = va.eval_resize_crop(img, 128, crop_ratio=1.0)
    assert out.size == (128, 128)
    assert va.resize_shorter(img, 128).size == (int(128 * 300 / 256), 128)
    with pytest.raises(ValueError, match="crop_ratio"):
        va.eval_resize_crop(img, 224, crop_ratio=1.2)


def test_horizontal_flip():
    img = _image(8, 12)
    np.testing.assert_array_equal(
        np.asarray(va.horizontal_flip(img, 0, p=1.0)), np.asarray(img)[:, ::-1]
    )
    assert va.horizontal_flip(img, 0, p=0.0) is img
    flips = sum(va.horizontal_flip(img, s) is not img for s in range(400))
    assert 160 < flips < 240


@pytest.mark.parametrize("augment", va.AUGMENTS)
def test_train_transform_recipes_give_the_image_size(augment):
    img = _image(60, 90)
    out = va.train_transform(img, np.random.default_rng(0), augment=augment, image_size=32)
    assert out.size == (32, 32) and out.mode == "RGB"


def test_train_transform_rejects_unknown_recipe_and_interpolation():
    with pytest.raises(ValueError, match="augment must be one of"):
        va.train_transform(_image(), 0, augment="autoaug", image_size=32)
    with pytest.raises(ValueError, match="interpolation"):
        va.random_resized_crop(_image(), 32, 0, interpolation="cubic")


# --------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------


def test_parse_rand_augment_spec():
    assert va.parse_rand_augment("rand-m9-mstd0.5-inc1") == dict(
        num_ops=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, increasing=True
    )
    assert va.parse_rand_augment("rand-n3-m7")["num_ops"] == 3
    for bad in ("augmix-m9", "rand-m9-w0", "rand-x"):
        with pytest.raises(ValueError):
            va.parse_rand_augment(bad)


def test_rand_augment_ops_and_probability():
    img = _image(32, 32)
    applied = []
    for seed in range(600):
        record = []
        out = va.rand_augment(img, np.random.default_rng(seed), record=record)
        assert out.size == img.size
        assert len(record) <= 2
        applied += record
    assert set(applied) == set(va.RAND_AUGMENT_INCREASING_OPS)  # all 15 ops occur
    # two ops drawn per image, each applied with probability 0.5: 1 per image on average
    assert abs(len(applied) / 600 - 1.0) < 0.1


def test_rand_augment_increasing_solarize_threshold():
    """SolarizeIncreasing at magnitude 9 (std 0): threshold 256 - int(0.9 * 256) = 26."""
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    args = va._op_args("SolarizeIncreasing", 9.0, np.random.default_rng(0))
    assert args == (26,)
    out = va._apply_op("SolarizeIncreasing", Image.fromarray(arr), args, (0, 0, 0), None)
    np.testing.assert_array_equal(
        np.asarray(out)[..., 0].ravel(), [v if v < 26 else 255 - v for v in range(256)]
    )


# --------------------------------------------------------------------------------------------
# Mixup / CutMix
# --------------------------------------------------------------------------------------------


def _constant_batch(b=8, h=16, w=20):
    """Image i is the constant i: a pixel's value tells which image it came from."""
    return np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None], (b, h, w, 3)).copy()


def test_mixup_targets_sum_to_one_and_mix_the_right_labels():
    b, c = 8, 10
    images = _constant_batch(b)
    labels = np.array([3, 1, 4, 0, 5, 9, 2, 6])
    keep = images.copy()
    for seed in range(20):
        out, target = va.mixup_cutmix(
            images, labels, seed, num_classes=c, mixup_alpha=0.8, cutmix_alpha=0.0
        )
        np.testing.assert_array_equal(images, keep)  # input untouched
        np.testing.assert_allclose(target.sum(1), 1.0, rtol=1e-6)
        # image i = lam * i + (1 - lam) * (b - 1 - i): recover lam from image 0
        lam = 1.0 - out[0, 0, 0, 0] / (b - 1)
        for i in range(b):
            np.testing.assert_allclose(out[i], lam * i + (1 - lam) * (b - 1 - i), atol=1e-5)
            np.testing.assert_allclose(target[i, labels[i]], lam, atol=1e-6)
            np.testing.assert_allclose(target[i, labels[b - 1 - i]], 1 - lam, atol=1e-6)
            assert np.count_nonzero(target[i]) == 2


def test_mixup_label_smoothing():
    labels = np.array([0, 1, 2, 3])
    _, target = va.mixup_cutmix(
        _constant_batch(4), labels, 0, num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0,
        label_smoothing=0.1,
    )  # fmt: skip
    expected = np.full((4, 5), 0.1 / 5, np.float32)
    expected[np.arange(4), labels] = 0.9 + 0.1 / 5
    np.testing.assert_allclose(target, expected, rtol=1e-6)  # no mixing: lam = 1


def test_cutmix_box_area_matches_lambda():
    b, h, w = 6, 16, 20
    images = _constant_batch(b, h, w)
    labels = np.arange(b)
    clipped = 0
    for seed in range(300):
        out, target = va.mixup_cutmix(
            images, labels, seed, num_classes=b, mixup_alpha=0.0, cutmix_alpha=1.0
        )
        for i in range(b):
            pasted = out[i, ..., 0] != i
            frac = pasted.mean()
            # the pasted pixels come from the reversed batch and form one box
            assert np.all(out[i, ..., 0][pasted] == b - 1 - i)
            if pasted.any():
                rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
                assert pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
            np.testing.assert_allclose(target[i, labels[i]], 1.0 - frac, atol=1e-6)
            np.testing.assert_allclose(target[i, labels[b - 1 - i]], frac, atol=1e-6)
        # rerun the draw to see whether the box was clipped (the correction then matters)
        rng = np.random.default_rng(seed)
        rng.random()
        lam0 = rng.beta(1.0, 1.0)
        (y0, y1, x0, x1), lam = va.cutmix_box(h, w, lam0, rng)
        cut_h, cut_w = int(h * math.sqrt(1 - lam0)), int(w * math.sqrt(1 - lam0))
        clipped += (y1 - y0, x1 - x0) != (cut_h, cut_w)
    assert clipped > 50  # boxes at the borders were clipped, and lambda still matched


def test_mixup_cutmix_switch_probability():
    images, labels = _constant_batch(4), np.arange(4)
    cutmix = 0
    for seed in range(400):
        out, _ = va.mixup_cutmix(images, labels, seed, num_classes=4)
        # mixup makes every pixel of image 0 the same blend; cutmix leaves some at 0
        cutmix += bool((out[0] == 0).any() and (out[0] != out[0, 0, 0, 0]).any())
    assert 160 < cutmix < 240


def test_mixup_cutmix_bad_input():
    images, labels = _constant_batch(4), np.arange(4)
    with pytest.raises(ValueError, match="labels must be in"):
        va.mixup_cutmix(images, labels, 0, num_classes=3)
    with pytest.raises(ValueError, match="switch_prob"):
        va.mixup_cutmix(images, labels, 0, num_classes=4, switch_prob=1.5)
    with pytest.raises(ValueError, match="images"):
        va.mixup_cutmix(images[0], labels, 0, num_classes=4)


def test_normalisation_is_imagenet_mean_std():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = va.to_normalized_array(Image.fromarray(arr))
    ref = (arr / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert x.dtype == np.float32 and x.shape == (5, 7, 3)
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_posterize_to_zero_bits_is_black():
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits (older PIL: a black image)."""
    img = _image(8, 8)
    out = va._apply_op("PosterizeIncreasing", img, (0,), (0, 0, 0), None)
    assert not np.asarray(out).any()
    out = va._apply_op("PosterizeIncreasing", img, (2,), (0, 0, 0), None)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img) & 0b11000000)


# --------------------------------------------------------------------------------------------
# Live parity with torchvision / timm (where both are installed; the CI image has neither)
# --------------------------------------------------------------------------------------------


class _PinnedDraws:
    """A Generator stand-in whose random() / integers() return given values (pins the draws
    that decide a negation or a box centre, so both implementations see the same ones)."""

    def __init__(self, random=0.3, integers=()):
        self._random, self._integers = random, list(integers)

    def random(self):
        return self._random

    def integers(self, low, high=None):
        return self._integers.pop(0)

    def uniform(self, low, high):
        raise AssertionError("not used")


def test_ops_match_torchvision_and_timm(monkeypatch):
    """With the same parameters every op gives torchvision's / timm's pixels exactly: the crop
    and resize of a random resized crop, its fallback, reflect padding, the evaluation resize +
    centre crop, grayscale, solarize, colour jitter, the 15 (+15) RandAugment ops and their
    level arguments, mixup targets and the cutmix box with its corrected lambda."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from timm.data import auto_augment as taa
    from timm.data import mixup as tmix
    from timm.data.transforms import RandomResizedCropAndInterpolation

    bicubic = T.InterpolationMode.BICUBIC
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for h, w in ((75, 100), (120, 64)):
        img = _image(h, w, seed=h)
        for top, left, ch, cw in ((0, 0, h, w), (5, 7, 40, 33), (h - 20, w - 30, 20, 30)):
            crop = img.crop((left, top, left + cw, top + ch)).resize(
                (32, 32), va.resample("bicubic")
            )
            same(TF.resized_crop(img, top, left, ch, cw, [32, 32], bicubic), crop)
        for ratio in (0.875, 1.0):
            ref = T.Compose([T.Resize(int(32 / ratio), interpolation=bicubic), T.CenterCrop(32)])
            same(ref(img), va.eval_resize_crop(img, 32, ratio))
        same(TF.pad(img, 4, padding_mode="reflect"),
             np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect"))  # fmt: skip
        same(TF.rgb_to_grayscale(img, 3), va.grayscale(img))
        same(TF.solarize(img, 128), va.solarize(img))
        # colour jitter: replay our draws (order, then factors) through torchvision's ops
        rng = np.random.default_rng(h)
        order = rng.permutation(4)
        factors = [rng.uniform(0.7, 1.3) for _ in range(3)]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        ref = img
        for k in order:
            if k < 3:
                ref = ops[k](ref, float(factors[k]))
        same(ref, va.color_jitter(img, np.random.default_rng(h), 0.3, 0.3, 0.3))
    strip = _image(10, 1000)
    assert RandomResizedCropAndInterpolation.get_params(strip, (0.08, 1.0), (3 / 4, 4 / 3)) == (
        va.rrc_params(1000, 10, 0)
    )

    img = _image(40, 48, seed=5)
    hparams = dict(translate_const=int(32 * 0.45), img_mean=va.IMAGENET_MEAN_FILL)
    for name in sorted(set(va.RAND_AUGMENT_OPS + va.RAND_AUGMENT_INCREASING_OPS)):
        for level in (3.0, 9.0, 10.0):
            for r in (0.2, 0.8):  # timm negates when random.random() > 0.5
                monkeypatch.setattr(taa.random, "random", lambda r=r: r)
                fn = taa.LEVEL_TO_ARG[name]
                want_args = fn(level, hparams) if fn is not None else ()
                got_args = va._op_args(name, level, _PinnedDraws(random=r))
                np.testing.assert_allclose(got_args, want_args, rtol=1e-12)
                if name.startswith("Posterize") and want_args[0] <= 0:
                    continue  # PIL >= 11 refuses 0 bits, timm then raises; ours: black (above)
                want = taa.NAME_TO_OP[name](img, *want_args, fillcolor=va.IMAGENET_MEAN_FILL,
                                            resample=va.resample("bicubic"))  # fmt: skip
                same(want, va._apply_op(name, img, got_args, va.IMAGENET_MEAN_FILL,
                                        va.resample("bicubic")))  # fmt: skip

    labels = np.array([3, 1, 4, 0, 2, 2])
    for lam, smoothing in ((0.3, 0.0), (0.7, 0.1)):
        want = tmix.mixup_target(torch.tensor(labels), 5, lam, smoothing).numpy()
        np.testing.assert_allclose(va.mixup_target(labels, 5, lam, smoothing), want, atol=1e-7)
    for lam, cy, cx in ((0.3, 10, 3), (0.55, 0, 19), (0.9, 15, 10), (0.05, 7, 7)):
        centres = iter([cy, cx])
        monkeypatch.setattr(tmix.np.random, "randint", lambda lo, hi, size=None, c=centres: next(c))
        (y0, y1, x0, x1), want_lam = tmix.cutmix_bbox_and_lam((2, 3, 16, 20), lam)
        box, got_lam = va.cutmix_box(16, 20, lam, _PinnedDraws(integers=[cy, cx]))
        assert box == tuple(int(v) for v in (y0, y1, x0, x1))
        np.testing.assert_allclose(got_lam, want_lam, rtol=1e-12)
