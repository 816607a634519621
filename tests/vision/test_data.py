"""Vision data (herd.vision.data): sources, the DeiT samplers, the checkpointable pipeline."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from herd.vision import data as vd

# the first held-out digits of the fixed split (sha256 ranks; recorded when it was made)
PINNED_FIRST_HELD_OUT = [2, 7, 9, 13, 20, 36, 37, 40]


def _tiny_source(n=64, size=12, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return vd.ArrayImageSource(images, labels, num_classes=num_classes, name="tiny")


def _epoch_indices(it, steps):
    return np.concatenate([next(it)["index"] for _ in range(steps)])


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_split_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    held_out = vd.digits_split(labels)
    assert labels.size == 1797
    for c in range(10):  # 20% of every class
        assert held_out[labels == c].sum() == round(0.2 * (labels == c).sum())
    np.testing.assert_array_equal(held_out, vd.digits_split(labels.copy()))
    # fixed: sha256-ranked, no generator; pinned so a change of the split is noticed
    assert np.flatnonzero(held_out)[:8].tolist() == PINNED_FIRST_HELD_OUT

    train, test = vd.digits_source("train", 16), vd.digits_source("test", 16)
    every = vd.digits_source("all", 16)
    assert len(train) + len(test) == len(every) == 1797 and len(test) == held_out.sum()
    np.testing.assert_array_equal(every.images[held_out], test.images)
    np.testing.assert_array_equal(every.images[~held_out], train.images)
    np.testing.assert_array_equal(every.labels[held_out], test.labels)
    # disjoint as images too: no held-out digit is a training digit
    train_set = {im.tobytes() for im in train.images}
    assert sum(im.tobytes() in train_set for im in test.images) == 0
    assert train.images.shape[1:] == (16, 16, 3) and train.num_classes == 10
    assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grey as RGB
    assert train.images.max() > 200 and train.images.min() == 0


def test_digits_bad_split():
    with pytest.raises(ValueError, match="'train', 'test' or 'all'"):
        vd.digits_source("validation")


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------


def _write_folder(root, classes=("cat", "dog", "eel"), per_class=3):
    rng = np.random.default_rng(0)
    for name in classes:
        d = root / name
        d.mkdir(parents=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8)
            ext = "png" if k % 2 else "jpg"
            Image.fromarray(arr).save(d / f"{k}.{ext}")
    return root


def test_folder_source_skips_and_counts_corrupt_files(tmp_path):
    root = _write_folder(tmp_path / "train")
    (root / "cat" / "garbage.jpg").write_bytes(b"not an image at all")
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "eel" / "notes.txt").write_text("ignored: not an image extension")
    src = vd.folder_source(root)
    assert src.class_names == ["cat", "dog", "eel"] and len(src) == 11
    it = vd.make_pipeline(src, train=False, image_size=16, global_batch_size=4, seed=0)
    batches = list(it)
    assert it.counters["skipped_bad_image"] == 2
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    assert len(batches) == 3 and mask.sum() == 9  # 11 files, 2 unreadable, 1 pad slot
    real = index[mask > 0]
    assert sorted(os.path.basename(src.files[i]) for i in real) == sorted(
        ["0.jpg", "1.png", "2.jpg"] * 3
    )
    np.testing.assert_array_equal(label[mask > 0], src.labels[real])
    # training keeps going past the bad files: full batches, counted
    train = vd.make_pipeline(src, train=True, image_size=16, global_batch_size=4, seed=0,
                             augment="rrc")  # fmt: skip
    for _ in range(6):
        b = next(train)
        assert b["mask"].sum() == 4 and (b["index"] >= 0).all()
    assert train.counters["skipped_bad_image"] >= 2


def test_folder_source_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        vd.folder_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        vd.folder_source(tmp_path / "empty")
    root = _write_folder(tmp_path / "some")
    (root / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        vd.folder_source(root)


# --------------------------------------------------------------------------------------------
# tfds
# --------------------------------------------------------------------------------------------


def test_tfds_source_reads_a_prepared_dataset_and_explains_an_unprepared_one(tmp_path):
    """A tiny image dataset built with tfds' own builder as ArrayRecord (no TensorFlow, no
    download: the images are given as PNG bytes), read through tfds.data_source."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import io

    class HerdTinyVision(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)),
                 "label": tfds.features.ClassLabel(num_classes=3)}
            )  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((10 + i, 14, 3), 20 * i, np.uint8)).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    HerdTinyVision.__module__ = "__main__"  # as tests/lm/test_data.py: no checksums lookup
    data_dir = str(tmp_path / "tfds")
    HerdTinyVision(data_dir=data_dir, file_format="array_record").download_and_prepare()
    src = vd.tfds_source("herd_tiny_vision", "validation", data_dir=data_dir)
    assert len(src) == 3 and src.num_classes == 3
    it = vd.make_pipeline(src, train=False, image_size=8, global_batch_size=3, seed=0)
    (batch,) = list(it)
    assert batch["image"].shape == (3, 8, 8, 3) and batch["mask"].sum() == 3
    # each image is a constant 20 i with label i % 3
    pixel = batch["image"][:, 0, 0, 0] * 0.229 * 255 + 0.485 * 255
    np.testing.assert_allclose(np.sort(pixel), [0, 20, 40], atol=1e-3)
    assert sorted(batch["label"].tolist()) == [0, 1, 2]

    with pytest.raises(ValueError, match="tfds build mnist --file_format=array_record"):
        vd.tfds_source("mnist", "train", data_dir=str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match="no split 'test'"):
        vd.tfds_source("herd_tiny_vision", "test", data_dir=data_dir)


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------

DEIT3 = dict(augment="3aug", repeated_aug=3, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)


def test_pipeline_resume_equals_uninterrupted():
    src = vd.digits_source("train", 16)
    kw = dict(train=True, image_size=16, global_batch_size=32, seed=7, read_threads=2, **DEIT3)
    whole = vd.make_pipeline(src, **kw)
    expected = [next(whole) for _ in range(5)]
    first = vd.make_pipeline(src, **kw)
    for k in range(2):
        for key, value in next(first).items():
            np.testing.assert_array_equal(value, expected[k][key])
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    resumed = vd.make_pipeline(src, **kw)
    resumed.set_state(state)
    for k in range(2, 5):
        got = next(resumed)
        assert set(got) == {"image", "label", "mask", "index", "target"}
        for key, value in got.items():
            np.testing.assert_array_equal(value, expected[k][key])
    assert resumed.counters == {"images": 160, "batches": 5}
    other_seed = next(vd.make_pipeline(src, **{**kw, "seed": 8}))
    assert not np.array_equal(other_seed["image"], expected[0]["image"])
    b = expected[0]
    assert b["image"].dtype == np.float32 and b["image"].shape == (32, 16, 16, 3)
    np.testing.assert_allclose(b["target"].sum(1), 1.0, rtol=1e-5)


def test_two_process_sharding_is_disjoint_and_covers_an_epoch():
    src = _tiny_source(n=64)
    kw = dict(train=True, image_size=12, global_batch_size=16, seed=3, augment="rrc")
    seen = []
    for p in range(2):
        it = vd.make_pipeline(src, process_index=p, process_count=2, **kw)
        assert it.plan.steps == 4 and it.plan.batch_size == 8
        seen.append(_epoch_indices(it, 4))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(64))
    # the next epoch is another permutation, still disjoint
    its = [vd.make_pipeline(src, process_index=p, process_count=2, **kw) for p in range(2)]
    nxt = [_epoch_indices(it, 8)[32:] for it in its]
    assert not set(nxt[0]) & set(nxt[1]) and sorted(np.concatenate(nxt)) == list(range(64))
    assert not np.array_equal(nxt[0], seen[0])


def test_repeated_augmentation_like_deit_rasampler():
    src = _tiny_source(n=60)
    kw = dict(train=True, image_size=12, global_batch_size=6, seed=0, augment="3aug",
              repeated_aug=3)  # fmt: skip
    # one process: each record three times in a row, each copy augmented differently
    it = vd.make_pipeline(src, **kw)
    assert it.plan.samples == 60 and it.plan.steps == 10  # N < 256: ceil(N / P) per epoch
    b = next(it)
    np.testing.assert_array_equal(b["index"], np.repeat(b["index"][::3], 3))
    assert not np.array_equal(b["image"][0], b["image"][1])
    # three processes: the copies of a record go to different processes (same records each)
    kw["global_batch_size"] = 12
    streams = [
        _epoch_indices(vd.make_pipeline(src, process_index=p, process_count=3, **kw), 5)
        for p in range(3)
    ]
    np.testing.assert_array_equal(streams[0], streams[1])
    np.testing.assert_array_equal(streams[0], streams[2])
    assert len(set(streams[0])) == 20
    # >= 256 records: RASampler keeps floor(N // 256 * 256 / P) per process and epoch
    plan = vd.epoch_plan(1000, global_batch_size=64, repeated_aug=3, process_count=2)
    assert plan.samples == 384 and plan.steps == 12


def test_eval_pass_sharded_padded_and_in_order():
    src = _tiny_source(n=21)
    got = []
    for p in range(2):
        it = vd.make_pipeline(src, train=False, image_size=12, global_batch_size=8, seed=0,
                              process_index=p, process_count=2)  # fmt: skip
        batches = list(it)
        assert len(batches) == 3  # ceil(ceil(21 / 2) / 4), the same on both processes
        index = np.concatenate([b["index"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        np.testing.assert_array_equal(mask, index >= 0)
        got.append(index[index >= 0])
        # evaluation images are the centre crop, not augmented: equal to the source
        img = batches[0]["image"][0] * np.array([0.229, 0.224, 0.225]) + [0.485, 0.456, 0.406]
        np.testing.assert_allclose(img * 255, src.images[index[0]], atol=1e-3)
    np.testing.assert_array_equal(got[0], np.arange(0, 21, 2))
    np.testing.assert_array_equal(got[1], np.arange(1, 21, 2))


def test_label_smoothing_without_mixing_gives_smoothed_targets():
    src = _tiny_source()
    it = vd.make_pipeline(src, train=True, image_size=12, global_batch_size=8, seed=0,
                          augment="simple_crop", label_smoothing=0.1)  # fmt: skip
    b = next(it)
    expected = np.full((8, 4), 0.1 / 4, np.float32)
    expected[np.arange(8), b["label"]] += 0.9
    np.testing.assert_allclose(b["target"], expected, rtol=1e-6)


def test_make_pipeline_bad_input():
    src = _tiny_source()
    kw = dict(train=True, image_size=12, global_batch_size=8, seed=0)
    cases = [
        (dict(augment="autoaugment"), "augment must be one of"),
        (dict(global_batch_size=9, process_count=2), "not divisible by process_count"),
        (dict(global_batch_size=128), "fewer than the batch"),
        (dict(crop_ratio=0.0), "crop_ratio"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(image_size="224"), "image_size"),
        (dict(repeated_aug=0), "repeated_aug"),
        (dict(mixup_alpha=-1.0), "mixup_alpha"),
        (dict(augment="randaug", rand_augment="rand-q3"), "RandAugment"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            vd.make_pipeline(src, **{**kw, **override})
    with pytest.raises(ValueError, match="image source must be"):
        vd.make_image_source("cifar10")


def test_make_image_source_specs(tmp_path):
    assert len(vd.make_image_source("digits", split="test", image_size=8)) == 359
    root = _write_folder(tmp_path / "imagenet" / "val")
    assert vd.make_image_source(f"folder:{tmp_path / 'imagenet'}", split="val").root == str(root)
    assert vd.make_image_source(f"folder:{root}").root == str(root)


def test_training_recipe_runs_three_augment_on_every_image(monkeypatch):
    from herd.vision import augment as va

    calls = []
    real = va.three_augment
    monkeypatch.setattr(va, "three_augment", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = _tiny_source()
    ev = vd.make_pipeline(src, train=False, image_size=12, global_batch_size=8, seed=0)
    next(ev)
    assert calls == []  # evaluation: resize + centre crop only
    it = vd.make_pipeline(src, train=True, image_size=12, global_batch_size=8, seed=0,
                          augment="3aug", read_threads=1)  # fmt: skip
    next(it)
    assert len(calls) >= 8  # (prefetching may have run a few more)
