"""Host-side image augmentations of the DeiT III line (PIL + numpy; run inside grain maps).

Every random op takes a ``numpy.random.Generator`` (or an int seed) and draws from it alone, so
an image's augmentation is a pure function of (image, generator): herd.vision.data keys one
generator per (seed, process, stream position), which makes pipelines reproducible under
threads and exact on resume. The ops follow the PIL code paths of the PyTorch references
(torchvision transforms on PIL images, timm, facebookresearch/deit ``augment.py``), with
Python's ``random`` replaced by the generator; what is drawn and in what ranges is theirs.

Per image (PIL RGB in, PIL RGB out)::

    rrc_params(width, height, rng, scale=(0.08, 1), ratio=(3/4, 4/3)) -> (top, left, h, w)
    random_resized_crop(img, size, rng, scale, ratio, interpolation='bicubic')
    resize_shorter(img, size, interpolation) / center_crop(img, size)
    eval_resize_crop(img, size, crop_ratio=1.0, interpolation='bicubic')
    simple_random_crop(img, size, rng, padding=4)      # resize, reflect-pad, random crop
    horizontal_flip(img, rng, p=0.5)
    grayscale(img) / solarize(img, threshold=128) / gaussian_blur(img, rng, sigma=(0.1, 2))
    three_augment(img, rng, color_jitter_strength=0.3)  # one of the three, then jitter
    color_jitter(img, rng, brightness, contrast, saturation)
    rand_augment(img, rng, spec='rand-m9-mstd0.5-inc1', fill=..., interpolation='bicubic')
    train_transform(img, rng, augment=..., image_size=...)  # a whole recipe, see AUGMENTS
    (RandAugment implements timm's 15 ops, RAND_AUGMENT_INCREASING_OPS for inc1 (DeiT's
    fine-tuning: AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing,
    SolarizeIncreasing, SolarizeAdd, Color/Contrast/Brightness/SharpnessIncreasing, ShearX,
    ShearY, TranslateXRel, TranslateYRel) or RAND_AUGMENT_OPS; no Cutout, no weighted choice)
    to_normalized_array(img) -> float32 HWC, (x / 255 - ImageNet mean) / std

Per batch (numpy, NHWC float images, int labels)::

    mixup_cutmix(images, labels, rng, *, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, label_smoothing=0.0, prob=1.0) -> (images, targets [B, C])
    cutmix_box(height, width, lam, rng) -> ((y0, y1, x0, x1), lam corrected by the box area)
    mixup_target(labels, num_classes, lam, label_smoothing) -> [B, C]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# ImageNet statistics (timm IMAGENET_DEFAULT_MEAN / STD; DeiT III normalises with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandAugment's fill colour for uncovered pixels: the mean in 0..255 (DeiT passes
# img_mean=tuple(min(255, round(255 * x)) for x in mean) to timm's RandAugment).
IMAGENET_MEAN_FILL = tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# augment= recipes of train_transform (DeiT III: '3aug' on ImageNet-1k, '3aug_simple_crop' on
# ImageNet-21k (its --src flag), 'randaug' for the fine-tuning at higher resolution).
AUGMENTS = ("3aug", "3aug_simple_crop", "rrc", "simple_crop", "randaug", "none")


def as_rng(rng) -> np.random.Generator:
    """A numpy Generator from a Generator or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    if all(hasattr(rng, m) for m in ("random", "integers", "uniform")):
        return rng  # a stand-in with the Generator methods (tests pin draws with one)
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng)}")


def resample(interpolation: str) -> Image.Resampling:
    """PIL resampling filter of an interpolation name (nearest/bilinear/bicubic/lanczos)."""
    try:
        return _INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
        ) from None


def to_pil(image) -> Image.Image:
    """PIL RGB image from a PIL image or a uint8 array [H, W], [H, W, 1] or [H, W, 3]."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 0..255, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image arrays must be [H, W], [H, W, 1] or [H, W, 3], got {arr.shape}")
    return Image.fromarray(arr, "RGB")


def to_normalized_array(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """float32 [H, W, 3]: (pixel / 255 - mean) / std (torchvision ToTensor + Normalize, HWC)."""
    x = np.asarray(img).astype(np.float32)
    inv = 1.0 / (np.asarray(std, np.float32) * 255.0)
    x *= inv  # in place, as x * (1 / 255 std) - mean / std: half the time of (x - m) / s
    x -= np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return x


# --------------------------------------------------------------------------------------------
# Crops and flips
# --------------------------------------------------------------------------------------------


def rrc_params(
    width: int,
    height: int,
    rng,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, as timm's RandomResizedCropAndInterpolation
    (= torchvision's) draws it: up to 10 tries of an area fraction ~U(scale) and a log-uniform
    aspect ratio in ``ratio``; the first box that fits is placed uniformly. If none fits, the
    centre crop of the whole image with its aspect clamped into ``ratio``."""
    rng = as_rng(rng)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bicubic",
) -> Image.Image:
    """A random crop (rrc_params) resized to size x size (DeiT III: bicubic)."""
    top, left, h, w = rrc_params(img.width, img.height, rng, scale, ratio)
    crop = img.crop((left, top, left + w, top + h))
    return crop.resize((size, size), resample(interpolation))


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``size``, the longer int(size * long / short)
    (torchvision ``Resize(int)``)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample(interpolation))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size x size crop (torchvision CenterCrop: offsets round((dim - size) / 2))."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_resize_crop(
    img: Image.Image, size: int, crop_ratio: float = 1.0, interpolation: str = "bicubic"
) -> Image.Image:
    """DeiT's evaluation transform: shorter side to int(size / crop_ratio), centre crop size.

    DeiT III evaluates with crop_ratio 1.0 (RECIPES.md, DeiT III paper sec. 4), DeiT with 0.875.
    """
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    return center_crop(resize_shorter(img, int(size / crop_ratio), interpolation), size)


def simple_random_crop(
    img: Image.Image, size: int, rng, padding: int = 4, interpolation: str = "bicubic"
) -> Image.Image:
    """DeiT III's simple random crop (its ImageNet-21k recipe, ``--src``): shorter side resized
    to ``size``, ``padding`` pixels of reflect padding on every side, then a uniformly placed
    size x size crop (torchvision Resize + RandomCrop(padding, padding_mode='reflect'))."""
    rng = as_rng(rng)
    img = resize_shorter(img, size, interpolation)
    arr = np.asarray(img)
    if padding:
        if padding >= min(arr.shape[:2]):
            raise ValueError(f"reflect padding {padding} needs an image larger than {padding}")
        arr = np.pad(arr, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    h, w = arr.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return Image.fromarray(np.ascontiguousarray(arr[top : top + size, left : left + size]))


def horizontal_flip(img: Image.Image, rng, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability p."""
    if as_rng(rng).random() < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# --------------------------------------------------------------------------------------------
# 3-Augment (DeiT III, sec. 3: grayscale, solarization, Gaussian blur, colour jitter)
# --------------------------------------------------------------------------------------------

THREE_AUGMENT_OPS = ("grayscale", "solarize", "gaussian_blur")


def grayscale(img: Image.Image) -> Image.Image:
    """ITU-R 601 luma replicated to three channels (torchvision Grayscale(3) on PIL)."""
    return Image.merge("RGB", [img.convert("L")] * 3)


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    """Invert every channel value >= threshold (PIL ImageOps.solarize; DeiT III: 128)."""
    return ImageOps.solarize(img, threshold)


def gaussian_blur(img: Image.Image, rng, sigma: Sequence[float] = (0.1, 2.0)) -> Image.Image:
    """PIL Gaussian blur with standard deviation ~U(sigma) (DeiT's GaussianBlur, from DINO)."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(as_rng(rng).uniform(*sigma))))


def color_jitter(
    img: Image.Image,
    rng,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
) -> Image.Image:
    """torchvision ColorJitter(b, c, s) on a PIL image: factors ~U(max(0, 1 - x), 1 + x), drawn
    first, then applied in a random order (brightness, contrast, saturation; no hue)."""
    rng = as_rng(rng)
    order = rng.permutation(4)  # torchvision permutes its four ops; hue (3) is off
    factors = []
    for x in (brightness, contrast, saturation):
        factors.append(rng.uniform(max(0.0, 1.0 - x), 1.0 + x) if x else None)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in order:
        if k < 3 and factors[k] is not None:
            img = enhancers[k](img).enhance(float(factors[k]))
    return img


def three_augment(img: Image.Image, rng, color_jitter_strength: float = 0.3) -> Image.Image:
    """Exactly one of grayscale / solarize(128) / Gaussian blur (uniform choice), then colour
    jitter of strength ``color_jitter_strength`` (0 = none). DeiT III's 3-Augment, the
    'secondary' transforms of deit ``augment.new_data_aug_generator``."""
    rng = as_rng(rng)
    op = int(rng.integers(0, 3))
    if op == 0:
        img = grayscale(img)
    elif op == 1:
        img = solarize(img, 128)
    else:
        img = gaussian_blur(img, rng)
    if color_jitter_strength:
        s = color_jitter_strength
        img = color_jitter(img, rng, s, s, s)
    return img


# --------------------------------------------------------------------------------------------
# RandAugment (timm rand_augment_transform; DeiT's fine-tuning uses 'rand-m9-mstd0.5-inc1')
# --------------------------------------------------------------------------------------------

# timm _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (inc1): 15 ops each, no Cutout.
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
RAND_AUGMENT_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_LEVEL_DENOM = 10.0


def parse_rand_augment(spec: str) -> dict:
    """timm's RandAugment config string, e.g. 'rand-m9-mstd0.5-inc1' -> dict(num_ops=2,
    magnitude=9, magnitude_std=0.5, magnitude_max=10, increasing=True). Sections: m (magnitude),
    n (ops per image), mstd (magnitude noise std; > 100 = uniform in [0, m]), mmax, inc.
    The 'w' (weighted op choice) section is not supported."""
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment spec starts with 'rand', got {spec!r}")
    out = dict(num_ops=2, magnitude=10.0, magnitude_std=0.0, magnitude_max=10.0, increasing=False)
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not m:
            raise ValueError(f"bad RandAugment section {part!r} in {spec!r}")
        key, val = m.groups()
        if key == "m":
            out["magnitude"] = float(int(val))
        elif key == "n":
            out["num_ops"] = int(val)
        elif key == "mstd":
            out["magnitude_std"] = math.inf if float(val) > 100 else float(val)
        elif key == "mmax":
            out["magnitude_max"] = float(int(val))
        elif key == "inc":
            out["increasing"] = bool(int(val))
        else:
            raise ValueError(
                f"RandAugment section {part!r} in {spec!r}: supported m, n, mstd, mmax, inc"
            )
    return out


def _negate_half(v: float, rng) -> float:
    return -v if rng.random() > 0.5 else v  # timm _randomly_negate


def _op_args(name: str, level: float, rng):
    """timm's LEVEL_TO_ARG for ``name`` at magnitude ``level`` (0..10)."""
    frac = level / _LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (_negate_half(frac * 30.0, rng),)
    if name == "Posterize":
        return (int(frac * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(frac * 4),)
    if name == "Solarize":
        return (int(frac * 256),)
    if name == "SolarizeIncreasing":
        return (256 - int(frac * 256),)
    if name == "SolarizeAdd":
        return (int(frac * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)
    if name.endswith("Increasing"):  # colour/contrast/brightness/sharpness: 1 +- 0.9 frac
        return (max(0.1, 1.0 + _negate_half(frac * 0.9, rng)),)
    if name in ("ShearX", "ShearY"):
        return (_negate_half(frac * 0.3, rng),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (_negate_half(frac * 0.45, rng),)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _apply_op(name: str, img: Image.Image, args, fill, interp) -> Image.Image:
    """timm's NAME_TO_OP on PIL images."""
    base = name.removesuffix("Increasing")
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Rotate":
        return img.rotate(args[0], resample=interp, fillcolor=fill)
    if base == "Posterize":
        if args[0] >= 8:
            return img
        if args[0] <= 0:  # keep no bit: black (older PIL's result; PIL >= 11 refuses 0 bits)
            return img.point([0] * 768)
        return ImageOps.posterize(img, args[0])
    if base == "Solarize":
        return ImageOps.solarize(img, args[0])
    if base == "SolarizeAdd":
        add = args[0]
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        return img.point(lut * 3)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhancer = {
            "Color": ImageEnhance.Color,
            "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness,
            "Sharpness": ImageEnhance.Sharpness,
        }[base]
        return enhancer(img).enhance(args[0])
    affine = {
        "ShearX": lambda v: (1, v, 0, 0, 1, 0),
        "ShearY": lambda v: (1, 0, 0, v, 1, 0),
        "TranslateXRel": lambda v: (1, 0, v * img.size[0], 0, 1, 0),
        "TranslateYRel": lambda v: (1, 0, 0, 0, 1, v * img.size[1]),
    }[base](args[0])
    return img.transform(img.size, Image.Transform.AFFINE, affine, resample=interp, fillcolor=fill)


def rand_augment(
    img: Image.Image,
    rng,
    spec: str = "rand-m9-mstd0.5-inc1",
    *,
    prob: float = 0.5,
    fill: Sequence[int] = IMAGENET_MEAN_FILL,
    interpolation: str = "bicubic",
    record: list | None = None,
) -> Image.Image:
    """timm RandAugment: ``num_ops`` ops drawn uniformly with replacement from the 15 of
    RAND_AUGMENT_INCREASING_OPS (inc1) or RAND_AUGMENT_OPS; each applied with probability
    ``prob`` (0.5) at a magnitude ~N(m, mstd) clipped to [0, mmax]; geometric ops fill with
    ``fill`` and resample with ``interpolation`` (DeiT: the ImageNet mean, bicubic).
    ``record`` (a list) receives the names of the ops applied (tests, diagnostics)."""
    rng = as_rng(rng)
    cfg = parse_rand_augment(spec)
    names = RAND_AUGMENT_INCREASING_OPS if cfg["increasing"] else RAND_AUGMENT_OPS
    interp = resample(interpolation)
    fill = tuple(int(v) for v in fill)
    for k in rng.integers(0, len(names), size=cfg["num_ops"]):
        name = names[int(k)]
        if prob < 1.0 and rng.random() > prob:
            continue
        magnitude = cfg["magnitude"]
        if cfg["magnitude_std"] == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif cfg["magnitude_std"] > 0:
            magnitude = rng.normal(magnitude, cfg["magnitude_std"])
        magnitude = max(0.0, min(float(magnitude), cfg["magnitude_max"]))
        img = _apply_op(name, img, _op_args(name, magnitude, rng), fill, interp)
        if record is not None:
            record.append(name)
    return img


# --------------------------------------------------------------------------------------------
# Whole recipes
# --------------------------------------------------------------------------------------------


def train_transform(
    img: Image.Image,
    rng,
    *,
    augment: str,
    image_size: int,
    color_jitter_strength: float = 0.3,
    rand_augment_spec: str = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    crop_ratio: float = 1.0,
) -> Image.Image:
    """One training image under an augment recipe (AUGMENTS):

    '3aug'             random resized crop + flip, 3-Augment, colour jitter (DeiT III IN-1k)
    '3aug_simple_crop' simple random crop + flip, 3-Augment, colour jitter (DeiT III IN-21k)
    'rrc'              random resized crop + flip
    'simple_crop'      simple random crop + flip
    'randaug'          random resized crop + flip + RandAugment (DeiT III fine-tuning; no
                       colour jitter, as timm skips it when auto-augment is on)
    'none'             the evaluation transform (resize + centre crop at crop_ratio)
    """
    rng = as_rng(rng)
    if augment == "none":
        return eval_resize_crop(img, image_size, crop_ratio, interpolation)
    if augment in ("3aug", "rrc", "randaug"):
        img = random_resized_crop(img, image_size, rng, interpolation=interpolation)
    elif augment in ("3aug_simple_crop", "simple_crop"):
        img = simple_random_crop(img, image_size, rng, interpolation=interpolation)
    else:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    img = horizontal_flip(img, rng)
    if augment.startswith("3aug"):
        img = three_augment(img, rng, color_jitter_strength)
    elif augment == "randaug":
        img = rand_augment(img, rng, rand_augment_spec, interpolation=interpolation)
    return img


# --------------------------------------------------------------------------------------------
# Mixup / CutMix per batch (timm Mixup, mode='batch')
# --------------------------------------------------------------------------------------------


def mixup_target(
    labels: np.ndarray, num_classes: int, lam: float, label_smoothing: float = 0.0
) -> np.ndarray:
    """float32 [B, C]: lam * smooth_onehot(y) + (1 - lam) * smooth_onehot(flip(y)), the
    smoothing putting smoothing / C on every class and 1 - smoothing + smoothing / C on the
    label (timm mixup_target)."""
    labels = np.asarray(labels)
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    y = np.full((labels.shape[0], num_classes), off, np.float32)
    y[np.arange(labels.shape[0]), labels] = on
    return (lam * y + (1.0 - lam) * y[::-1]).astype(np.float32)


def cutmix_box(height: int, width: int, lam: float, rng) -> tuple[tuple[int, int, int, int], float]:
    """timm rand_bbox + cutmix_bbox_and_lam: a box of (1 - lam) of the area centred uniformly,
    clipped to the image; lam is then corrected to 1 - (clipped box area) / (H W)."""
    rng = as_rng(rng)
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    # timm >= 0.9 spans cut_h exactly ((cut + 1) // 2 after the centre); the timm 0.3.2 that
    # DeiT pinned used cut // 2, one pixel short for odd cuts; lam is corrected either way
    y0 = int(np.clip(cy - cut_h // 2, 0, height))
    y1 = int(np.clip(cy + (cut_h + 1) // 2, 0, height))
    x0 = int(np.clip(cx - cut_w // 2, 0, width))
    x1 = int(np.clip(cx + (cut_w + 1) // 2, 0, width))
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return (y0, y1, x0, x1), lam


def mixup_cutmix(
    images: np.ndarray,
    labels: np.ndarray,
    rng,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    prob: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix of a batch with its reverse (timm Mixup, mode='batch'; DeiT III:
    mixup 0.8, cutmix 1.0, switch 0.5, prob 1).

    With probability ``prob`` the batch is mixed: when both alphas are > 0, CutMix with
    probability ``switch_prob``, else Mixup; lam ~ Beta(alpha, alpha) of the chosen one.
    Mixup: x lam + flip(x) (1 - lam). CutMix: a box (cutmix_box) pasted from flip(x), lam
    corrected by the clipped box's area. Targets: mixup_target(labels, lam, smoothing).
    ``images`` NHWC (float); returns new arrays (the input is not modified).
    """
    rng = as_rng(rng)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"mixup_cutmix wants images [B, H, W, C] and labels [B], got {images.shape}, "
            f"{labels.shape}"
        )
    for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    for key, value in (("switch_prob", switch_prob), ("prob", prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, num_classes={num_classes}), got {labels}")
    lam, use_cutmix = 1.0, False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < switch_prob)
        else:
            use_cutmix = cutmix_alpha > 0
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
    out = images.copy()
    if lam < 1.0:
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(images.shape[1], images.shape[2], lam, rng)
            out[:, y0:y1, x0:x1] = images[::-1, y0:y1, x0:x1]
        else:
            out = (images * lam + images[::-1] * (1.0 - lam)).astype(images.dtype)
    return out, mixup_target(labels, num_classes, lam, label_smoothing)
