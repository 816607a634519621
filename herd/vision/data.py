"""Image-classification data: sources -> seeded host augmentation -> checkpointable grain batches.

Public API::

    digits_source(split='train', image_size=32, *, held_out_fraction=0.2) -> ArrayImageSource
    folder_source(path) -> FolderImageSource
    tfds_source(name, split='train', *, data_dir=None, image_key='image', label_key='label',
                num_classes=None, data_source_fn=None) -> TfdsImageSource
    make_image_source(spec, *, split='train', image_size=32, tfds_data_dir=None)
        spec: 'digits' | 'folder:<path>' | 'tfds:<name>' | a source object
    make_pipeline(source, *, train, image_size, global_batch_size, seed, augment='3aug',
                  repeated_aug=1, crop_ratio=1.0, process_index=0, process_count=1,
                  color_jitter=0.3, rand_augment='rand-m9-mstd0.5-inc1',
                  mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0,
                  mixup_prob=1.0, num_epochs=None, interpolation='bicubic', read_threads=2,
                  worker_count=0) -> checkpointable iterator of batches
    epoch_plan(num_examples, *, global_batch_size, repeated_aug=1, process_count=1, train=True)
        -> EpochPlan (samples per process per epoch, steps per epoch)

Sources are random-access and picklable: ``len(src)``, ``src.load(i) -> (image, label)`` with
image a PIL image or uint8 array, or a ``herd.core.data.Skipped`` marker for an unreadable
record; ``src.describe(i)``, ``src.name``, ``src.num_classes``.

Batches (numpy, per process): 'image' float32 [B, S, S, 3] normalised with the ImageNet
mean/std, 'label' int32 [B], 'mask' float32 [B] (0 on padding: only the last batches of an
evaluation pass have any), 'index' int32 [B] (the record in the source, -1 on padding), and,
when training with mixup/cutmix or label smoothing, 'target' float32 [B, num_classes] (the
mixed soft targets of herd.vision.augment.mixup_cutmix).

Pipeline (grain): MapDataset.range(epoch length).repeat(epochs) -> map_with_index(stream
position -> record index (the sampler below) -> load -> augment -> normalise; worker threads)
-> to_iter_dataset -> batches (bad records skipped and counted; mixup / cutmix per batch)
[-> mp_prefetch when worker_count > 0]. Every random draw of an image comes from a generator
keyed on (seed, process_index, stream position), of a batch's mixup on (seed, process_index,
position of its first image): batches do not depend on thread timing, and a restored iterator
(get_state / set_state, a small JSON-able dict) continues with exactly the batches the
uninterrupted one would have given.

Sampling, training (as DeiT's samplers, per epoch e): a permutation of all records seeded by
(seed, e); with repeated augmentation k > 1 each record repeated k times in a row (DeiT's
RASampler), the list padded by wrapping to a multiple of process_count and dealt round-robin
(process p takes positions p, p + P, ...), so the k copies of a record go to k different
processes (or sit in one process's stream when P = 1), each augmented differently. An epoch
keeps floor(N // 256 * 256 / P) samples per process under repeated augmentation (RASampler:
about N, not k N, images per epoch; ceil(N / P) when N < 256), ceil(N / P) without; then whole
batches only (DeiT's drop_last). Evaluation: record p, p + P, ... on process p, once, in order,
the last batch padded (mask 0) so every process yields the same number of batches.

Bad records (unreadable / truncated image files, undecodable tfds records) are skipped,
counted in ``iterator.counters['skipped_<reason>']`` (kept in the iterator state) and logged
(the first few of each kind, then every 1000th). In training the batch is filled with the next
record; in evaluation the slot becomes padding (mask 0), so batch counts stay equal.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from herd.core import data as core_data
from herd.core.data import Skipped, count_skip, skip_summary
from herd.vision import augment as aug

log = logging.getLogger(__name__)

# Extensions of torchvision's ImageFolder (IMG_EXTENSIONS), compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ArrayImageSource:
    """Images held in memory: uint8 [N, H, W, 3] and int labels [N]."""

    def __init__(self, images, labels, *, num_classes: int, name: str, class_names=None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match images {images.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes})")
        self.images, self.labels = images, labels.astype(np.int32)
        self.num_classes, self.name = int(num_classes), name
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, i: int):
        return self.images[i], int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.name} image {i}"


def digits_split(labels: np.ndarray, held_out_fraction: float = 0.2) -> np.ndarray:
    """Boolean mask of the held-out images: in each class, the round(fraction * n_class) images
    whose sha256("<class>:<index>") is smallest. Stratified, and the same on every machine and
    numpy version (no random generator involved)."""
    labels = np.asarray(labels)
    held_out = np.zeros(labels.shape[0], bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys = [hashlib.sha256(f"{int(c)}:{int(i)}".encode()).hexdigest() for i in idx]
        order = np.argsort(keys, kind="stable")
        held_out[idx[order[: int(round(held_out_fraction * idx.size))]]] = True
    return held_out


@functools.lru_cache(maxsize=8)
def _digits_arrays(split: str, image_size: int, held_out_fraction: float):
    """(uint8 images [N, S, S, 3], int32 labels [N]) of a digits split, read-only (cached)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError(
            "the digits need scikit-learn (pip install scikit-learn; herd installs it)"
        ) from e
    digits = load_digits()
    labels = digits.target.astype(np.int32)
    held_out = digits_split(labels, held_out_fraction)
    keep = {"train": ~held_out, "test": held_out, "all": np.ones_like(held_out)}[split]
    grey = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
    images = np.empty((grey.shape[0], image_size, image_size, 3), np.uint8)
    for k, g in enumerate(grey):
        big = Image.fromarray(g, "L").resize((image_size, image_size), Image.Resampling.BICUBIC)
        images[k] = np.asarray(big)[..., None]
    labels = labels[keep]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits_source(
    split: str = "train", image_size: int = 32, *, held_out_fraction: float = 0.2
) -> ArrayImageSource:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes; real data shipped
    with the package) upscaled (bicubic) to image_size x image_size RGB.

    split: 'train' (80%), 'test' (the fixed, stratified 20% held out: digits_split) or 'all'.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"digits image_size must be an int >= 8, got {image_size!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    images, labels = _digits_arrays(split, int(image_size), float(held_out_fraction))
    return ArrayImageSource(
        images,
        labels,
        num_classes=10,
        name=f"digits:{split}@{image_size}",
        class_names=[str(c) for c in range(10)],
    )


class FolderImageSource:
    """ImageNet-style folder: one sub-folder per class (sorted names -> labels 0..C-1), image
    files (IMAGE_EXTENSIONS) anywhere below it, in sorted order (torchvision ImageFolder)."""

    def __init__(self, path: str | os.PathLike):
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise ValueError(f"image folder not found (or not a directory): {root!r}")
        try:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        except OSError as e:
            raise ValueError(f"cannot read image folder {root!r}: {e}") from e
        if not classes:
            raise ValueError(
                f"image folder {root!r} has no class sub-folders: expected "
                f"{root}/<class>/<image>.jpg (one sub-folder per class, JPEG/PNG files)"
            )
        files, labels, empty = [], [], []
        for c, name in enumerate(classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                found += [
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
            if not found:
                empty.append(name)
            files += found
            labels += [c] * len(found)
        if empty:
            raise ValueError(
                f"image folder {root!r}: class folder(s) {empty[:5]} hold no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove them or add images"
            )
        self.root, self.files = root, files
        self.labels = np.asarray(labels, np.int32)
        self.class_names = classes
        self.num_classes = len(classes)
        self.name = f"folder:{root}"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        path = self.files[i]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")  # decodes fully: a truncated file raises here
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return Skipped("bad_image", path, f"{type(e).__name__}: {e}"[:200])
        return image, int(self.labels[i])

    def describe(self, i: int) -> str:
        return self.files[i]


def folder_source(path: str | os.PathLike) -> FolderImageSource:
    """An ImageNet-style image folder (FolderImageSource); a missing or empty folder raises."""
    return FolderImageSource(path)


def _tfds_check_prepared(name: str, split: str, data_dir, image_key: str, label_key: str) -> int:
    """Raises one clear ValueError unless tfds ``name`` is prepared as ArrayRecord with ``split``
    and the two features; returns the label feature's number of classes."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError("tfds sources need tensorflow-datasets (pip install 'herd[tfds]')") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} (see tfds.list_builders())") from None
    where = data_dir or "the default tfds data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    if not builder.is_prepared():
        raise ValueError(
            f"tfds dataset {name!r} is not prepared in {where} (looked for {builder.data_dir}). "
            f"Prepare it once as ArrayRecord, which random access needs: `tfds build {name} "
            f"--file_format=array_record"
            + (f" --data_dir={data_dir}`" if data_dir else "`")
            + " (building needs TensorFlow; imagenet2012 also needs ILSVRC2012_img_train.tar and"
            " ILSVRC2012_img_val.tar in <data_dir>/downloads/manual), or pass the data_dir "
            "where it is prepared."
        )
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if fmt not in ("array_record", "parquet"):
        raise ValueError(
            f"tfds dataset {name!r} in {builder.data_dir} is prepared as {fmt}; random access "
            f"needs ArrayRecord: rebuild it with `tfds build {name} --file_format=array_record`"
            " into another data_dir"
        )
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(
            f"tfds dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}"
        )
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"tfds dataset {name!r} has no feature {key!r}: {list(features)}")
    num_classes = getattr(features[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(f"tfds feature {label_key!r} of {name!r} is not a ClassLabel")
    return int(num_classes)


class TfdsImageSource:
    """A prepared tfds dataset through ``tfds.data_source`` (herd.core.data.TfdsSource: random
    access to ArrayRecord, no TensorFlow at read time); tfds decodes the image on access."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        num_classes: int | None = None,
        data_source_fn=None,
    ):
        if data_source_fn is None:
            found = _tfds_check_prepared(name, split, data_dir, image_key, label_key)
            num_classes = found if num_classes is None else num_classes
        elif num_classes is None:
            raise ValueError("tfds_source with a custom data_source_fn needs num_classes=")
        self._records = core_data.TfdsSource(
            name, split, image_key, data_dir=data_dir, data_source_fn=data_source_fn
        )
        self.image_key, self.label_key = image_key, label_key
        self.num_classes = int(num_classes)
        self.name = f"tfds:{name}:{split}"

    def __len__(self) -> int:
        return len(self._records)

    def load(self, i: int):
        try:
            record = self._records[i]
            image, label = record[self.image_key], int(record[self.label_key])
            if isinstance(image, bytes):  # an undecoded image feature
                import io

                with Image.open(io.BytesIO(image)) as img:
                    image = img.convert("RGB")
            else:
                image = aug.to_pil(image)
        except Exception as e:  # noqa: BLE001 - decoding errors of any kind skip the record
            return Skipped("bad_image", self.describe(i), f"{type(e).__name__}: {e}"[:200])
        if not 0 <= label < self.num_classes:
            return Skipped("bad_label", self.describe(i), f"label {label}")
        return image, label

    def describe(self, i: int) -> str:
        return f"{self.name} record {i}"


def tfds_source(
    name: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int | None = None,
    data_source_fn=None,
) -> TfdsImageSource:
    """A tfds image-classification dataset prepared as ArrayRecord (e.g. 'imagenet2012');
    one not prepared raises a ValueError saying how to prepare it. ``data_source_fn`` stands
    in for ``tfds.data_source`` (tests, custom loaders; then num_classes is needed)."""
    return TfdsImageSource(
        name,
        split,
        data_dir=data_dir,
        image_key=image_key,
        label_key=label_key,
        num_classes=num_classes,
        data_source_fn=data_source_fn,
    )


def make_image_source(
    spec, *, split: str = "train", image_size: int = 32, tfds_data_dir: str | None = None
):
    """A source from a spec: 'digits' (split 'train'/'test'), 'folder:<path>' (the folder
    <path>/<split> when it exists, else <path>), 'tfds:<name>' (the given split), or a source
    object (returned as is)."""
    if hasattr(spec, "load") and hasattr(spec, "num_classes"):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"image source spec must be a string or a source, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return digits_source(split, image_size)
    if kind == "folder" and rest:
        sub = os.path.join(rest, split)
        return folder_source(sub if os.path.isdir(sub) else rest)
    if kind == "tfds" and rest:
        return tfds_source(rest, split, data_dir=tfds_data_dir)
    raise ValueError(
        f"image source must be 'digits', 'folder:<path>' or 'tfds:<name>', got {spec!r}"
    )


# --------------------------------------------------------------------------------------------
# Sampling: stream position -> record index (DeiT's DistributedSampler / RASampler)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Per process: ``samples`` drawn per epoch, ``steps`` (batches) per epoch, ``batch_size``
    per process; ``positions`` = steps x batch_size stream positions per epoch."""

    num_examples: int
    batch_size: int
    samples: int
    steps: int

    @property
    def positions(self) -> int:
        return self.steps * self.batch_size


def epoch_plan(
    num_examples: int,
    *,
    global_batch_size: int,
    repeated_aug: int = 1,
    process_count: int = 1,
    train: bool = True,
) -> EpochPlan:
    """How many samples and batches one process gets per epoch (module docstring)."""
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}"
        )
    if not isinstance(repeated_aug, (int, np.integer)) or repeated_aug < 1:
        raise ValueError(f"repeated_aug must be an int >= 1, got {repeated_aug!r}")
    n, count = int(num_examples), int(process_count)
    batch = global_batch_size // count
    if n < 1:
        raise ValueError("the source has no examples")
    if not train:
        samples = -(-n // count)
        return EpochPlan(n, batch, samples, -(-samples // batch))
    samples = -(-n // count)
    if repeated_aug > 1 and n >= 256:
        samples = n // 256 * 256 // count  # RASampler's num_selected_samples
    steps = samples // batch
    if steps == 0:
        raise ValueError(
            f"an epoch has {samples} samples per process (of {n} examples, {count} processes),"
            f" fewer than the batch of {batch} per process (global_batch_size "
            f"{global_batch_size}): use a smaller batch"
        )
    return EpochPlan(n, batch, samples, steps)


class _Sampler:
    """Stream position -> record index (-1: padding) of one process (module docstring)."""

    def __init__(self, n, plan: EpochPlan, *, train, seed, repeats, process_index, process_count):
        self.n, self.plan, self.train = n, plan, train
        self.seed, self.repeats = seed, repeats
        self.process_index, self.process_count = process_index, process_count
        self._cache: dict[int, np.ndarray] = {}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's record indices of training epoch ``epoch`` (before the batch cut)."""
        got = self._cache.get(epoch)
        if got is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            rep = np.repeat(perm, self.repeats)
            total = -(-rep.size // self.process_count) * self.process_count
            rep = np.concatenate([rep, rep[: total - rep.size]])  # wrap, as DeiT pads
            got = rep[self.process_index :: self.process_count][: self.plan.samples]
            self._cache = {epoch: got}  # keep one epoch (threads may recompute: harmless)
        return got

    def __call__(self, position: int) -> int:
        epoch, j = divmod(int(position), self.plan.positions)
        if self.train:
            return int(self.epoch_indices(epoch)[j])
        index = self.process_index + j * self.process_count
        return index if index < self.n else -1


# --------------------------------------------------------------------------------------------
# Per-image map and batching
# --------------------------------------------------------------------------------------------


def _seed_words(seed: int) -> list[int]:
    seed = int(seed)
    return [seed % 2**32, (seed // 2**32) % 2**32, int(seed < 0)]


class _LoadAndTransform:
    """(stream position, _) -> an example dict, or Skipped (grain map_with_index)."""

    def __init__(self, source, sampler: _Sampler, *, train, seed, process_index, transform_kw):
        self.source, self.sampler = source, sampler
        self.train, self.seed_words = train, _seed_words(seed)
        self.process_index = process_index
        self.kw = transform_kw

    def __call__(self, position: int, _unused=None):
        index = self.sampler(position)
        if index < 0:
            return {"position": int(position), "index": -1}  # padding of an evaluation pass
        loaded = self.source.load(index)
        if isinstance(loaded, Skipped):
            return dataclasses.replace(loaded, detail=f"{loaded.detail} @{int(position)}")
        image, label = loaded
        img = aug.to_pil(image)
        if self.train:
            rng = np.random.default_rng([*self.seed_words, self.process_index, int(position), 0])
            img = aug.train_transform(img, rng, **self.kw)
        else:
            k = self.kw
            img = aug.eval_resize_crop(img, k["image_size"], k["crop_ratio"], k["interpolation"])
        return {
            "image": aug.to_normalized_array(img),
            "label": int(label),
            "index": int(index),
            "position": int(position),
        }


class ImageBatchIterator(grain.DatasetIterator):
    """Stacks examples into batches; skips and counts bad records; mixup / cutmix per batch.

    State: the parent's state (at a batch boundary) and the counters.
    """

    def __init__(self, parent, cfg: dict):
        super().__init__(parent)
        self.cfg = cfg
        self.counters: dict[str, int] = {"images": 0, "batches": 0}
        self._skips_in_a_row = 0

    def _pad(self) -> dict:
        s = self.cfg["image_size"]
        return {"image": np.zeros((s, s, 3), np.float32), "label": 0, "index": -1}

    def __next__(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        batch_size = cfg["batch_size"]
        items, masks, first_position = [], [], None
        while len(items) < batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                if not items:
                    raise
                items += [self._pad()] * (batch_size - len(items))
                masks += [0.0] * (batch_size - len(masks))
                break
            if isinstance(item, Skipped):
                count_skip(self.counters, item)
                if cfg["train"]:
                    self._skips_in_a_row += 1
                    if self._skips_in_a_row > cfg["max_skips"]:
                        raise ValueError(
                            f"no readable image in {cfg['source_name']}: the last "
                            f"{self._skips_in_a_row} records were all skipped "
                            f"({skip_summary(self.counters)})"
                        )
                    continue
                items.append(self._pad())  # evaluation: the slot becomes padding
                masks.append(0.0)
                continue
            self._skips_in_a_row = 0
            if first_position is None:
                first_position = item["position"]
            if item["index"] < 0:
                items.append(self._pad())
                masks.append(0.0)
            else:
                items.append(item)
                masks.append(1.0)
        batch = {
            "image": np.stack([it["image"] for it in items]),
            "label": np.asarray([it["label"] for it in items], np.int32),
            "mask": np.asarray(masks, np.float32),
            "index": np.asarray([it["index"] for it in items], np.int32),
        }
        if cfg["mix"] is not None:
            rng = np.random.default_rng(
                [*cfg["seed_words"], cfg["process_index"], int(first_position or 0), 1]
            )
            batch["image"], batch["target"] = aug.mixup_cutmix(
                batch["image"], batch["label"], rng, num_classes=cfg["num_classes"], **cfg["mix"]
            )
        self.counters["images"] += int(sum(masks))
        self.counters["batches"] += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counters": dict(self.counters)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"parent", "counters"}:
            raise ValueError(f"not an image pipeline state: {state!r:.200}")
        self._parent.set_state(state["parent"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        self._skips_in_a_row = 0


class ImageBatchDataset(grain.IterDataset):
    def __init__(self, parent, cfg: dict):
        super().__init__(parent)
        self._cfg = cfg

    def __iter__(self) -> ImageBatchIterator:
        return ImageBatchIterator(self._parent.__iter__(), self._cfg)

    def __str__(self) -> str:
        return f"ImageBatchDataset(batch_size={self._cfg['batch_size']})"


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def make_pipeline(
    source,
    *,
    train: bool,
    image_size: int,
    global_batch_size: int,
    seed: int,
    augment: str = "3aug",
    repeated_aug: int = 1,
    crop_ratio: float = 1.0,
    process_index: int = 0,
    process_count: int = 1,
    color_jitter: float = 0.3,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    mixup_prob: float = 1.0,
    num_epochs: int | None = None,
    interpolation: str = "bicubic",
    read_threads: int = 2,
    worker_count: int = 0,
):
    """A checkpointable iterator of this process's batches (module docstring).

    ``source``: a source object or a make_image_source spec ('digits', 'folder:<path>',
    'tfds:<name>'; split 'train' when training, else 'test' for the digits / 'validation').
    train=True: augment (herd.vision.augment.AUGMENTS), repeated_aug, mixup / cutmix (DeiT III:
    mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5), label_smoothing, num_epochs (None:
    forever). train=False: resize + centre crop at crop_ratio, one pass in order, padded.
    Batches per process: global_batch_size / process_count. The iterator has ``counters``
    (worker_count=0) and ``plan`` (EpochPlan: steps per epoch, ...), ``num_classes``.
    worker_count > 0 runs the pipeline in that many grain worker processes (resume with the
    same worker_count; the counters then live in the workers' state).
    """
    if isinstance(source, str):
        split = "train" if train else ("test" if source == "digits" else "validation")
        source = make_image_source(source, split=split, image_size=image_size)
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    _check_choice("augment", augment, aug.AUGMENTS)
    aug.resample(interpolation)  # checks the name
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None or an int >= 1, got {num_epochs!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= color_jitter <= 1.0:
        raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter!r}")
    if augment == "randaug":
        aug.parse_rand_augment(rand_augment)
    n = len(source)
    if n == 0:
        raise ValueError(f"{source.name} has no images")
    plan = epoch_plan(
        n,
        global_batch_size=global_batch_size,
        repeated_aug=repeated_aug if train else 1,
        process_count=process_count,
        train=train,
    )
    mix = dict(
        mixup_alpha=float(mixup_alpha),
        cutmix_alpha=float(cutmix_alpha),
        switch_prob=float(switch_prob),
        label_smoothing=float(label_smoothing),
        prob=float(mixup_prob),
    )
    # mixup_cutmix's own checks, before any image is read
    aug.mixup_cutmix(np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.int32), 0,
                     num_classes=source.num_classes, **mix)  # fmt: skip
    if not train or not (mixup_alpha > 0 or cutmix_alpha > 0 or label_smoothing > 0):
        mix = None
    sampler = _Sampler(
        n,
        plan,
        train=train,
        seed=int(seed) % 2**63,
        repeats=repeated_aug if train else 1,
        process_index=process_index,
        process_count=process_count,
    )
    transform_kw = dict(
        augment=augment,
        image_size=int(image_size),
        color_jitter_strength=float(color_jitter),
        rand_augment_spec=rand_augment,
        interpolation=interpolation,
        crop_ratio=float(crop_ratio),
    )
    if not train:
        transform_kw = dict(
            image_size=int(image_size), crop_ratio=float(crop_ratio), interpolation=interpolation
        )
    load = _LoadAndTransform(
        source, sampler, train=train, seed=seed, process_index=process_index,
        transform_kw=transform_kw,
    )  # fmt: skip
    epochs = num_epochs if train else 1  # None: forever
    ds = grain.MapDataset.range(plan.positions).repeat(epochs).map_with_index(load)
    read = grain.ReadOptions(
        num_threads=max(1, read_threads), prefetch_buffer_size=max(4, 4 * read_threads)
    )
    cfg = dict(
        train=bool(train),
        batch_size=plan.batch_size,
        image_size=int(image_size),
        num_classes=source.num_classes,
        mix=mix,
        seed_words=_seed_words(seed),
        process_index=int(process_index),
        max_skips=n,
        source_name=source.name,
    )
    batched = ImageBatchDataset(ds.to_iter_dataset(read), cfg)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        it = iter(batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)))
    else:
        it = iter(batched)
    it.plan = plan
    it.num_classes = source.num_classes
    log.info(
        "data: %s (%d images, %d classes), %s, process %d of %d: %d samples and %d steps of "
        "%d per epoch",
        source.name, n, source.num_classes,
        f"train augment={augment} repeated_aug={repeated_aug}" if train
        else f"eval crop_ratio={crop_ratio}",
        process_index, process_count, plan.samples, plan.steps, plan.batch_size,
    )  # fmt: skip
    return it


__all__ = [
    "ArrayImageSource",
    "EpochPlan",
    "FolderImageSource",
    "IMAGE_EXTENSIONS",
    "ImageBatchIterator",
    "TfdsImageSource",
    "digits_source",
    "digits_split",
    "epoch_plan",
    "folder_source",
    "make_image_source",
    "make_pipeline",
    "tfds_source",
]
