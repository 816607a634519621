"""The one builder behind every configs/vision/*.py file.

`base_config()` lists every field `python -m herd.vision.train` reads, so any of them can
be overridden with --config.key=value; `deit3_config(...)` fills in the DeiT III
ImageNet-1k recipe (Touvron et al. 2022, "DeiT III: Revenge of the ViT", Table 1) for a
pod, and `finetune_config(...)` its fine-tuning stage. The model shapes come from the
presets of herd.vision.models (`model.name`); a config only overrides what it changes.

Learning rates are absolute (the DeiT III runs use `--unscale-lr`: lr 4e-3 / 3e-3 at
batch 2048, no linear scaling). An epoch is the dataset's size in images; with repeated
augmentation x3 it holds a third of the images, three augmented copies each.

Per-size values not in the paper's Table 1 come from the official training commands of
facebookresearch/deit README_revenge.md ("Training command": IN-1k pre-training, the
IN-1k fine-tuning at 224 / 384, IN-21k pre-training and its IN-1k fine-tuning); their
global batch is the per-GPU --batch times GPUs times nodes.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# Fields of the model configs (herd.vision.vit.ViTConfig / patchconvnet.PatchConvNetConfig)
# a config may override; unset (None) = the variant's own value. layerscale_init 0.0 means
# no LayerScale.
MODEL_OVERRIDES = {
    "dim": int,
    "depth": int,
    "n_heads": int,
    "mlp_ratio": float,
    "patch_size": int,
    "n_parallel": int,
    "layerscale_init": float,
    "stem": str,  # ViT: 'patch' | 'hmlp_ln' | 'hmlp_bn'
    "norm_eps": float,
    "scan_blocks": bool,
    "remat_policy": str,
}

# DeiT III Table 1 / sec. 4: stochastic depth rate per size (ImageNet-1k pre-training).
DEIT3_DROP_PATH = {"vit_s": 0.05, "vit_b": 0.2, "vit_l": 0.45, "vit_h": 0.6}
# Training resolution of the IN-1k pre-training (then fine-tuned at 224); ViT-H is
# trained at 160 with patch 14, where PyTorch's stride-14 conv ignores the last 6 pixels:
# herd refuses sizes the patch does not divide, so 154 = 11 x 14, the same 11 x 11 grid.
DEIT3_RESOLUTION = {"vit_s": 224, "vit_b": 192, "vit_l": 192, "vit_h": 154}
# LAMB peak lr at batch 2048: S 4e-3, B / L / H 3e-3.
DEIT3_LR = {"vit_s": 4e-3, "vit_b": 3e-3, "vit_l": 3e-3, "vit_h": 3e-3}
# Fine-tuning on IN-1k (README_revenge.md commands: B 0.2, L 0.45, H 0.55 at 224; S 0.0 at
# 384, the only ViT-S fine-tuning command).
DEIT3_FT_DROP_PATH = {"vit_s": 0.0, "vit_b": 0.2, "vit_l": 0.45, "vit_h": 0.55}
# ImageNet-21k pre-training (README_revenge.md commands): drop path, epochs, resolution. ViT-H
# trains at 128 with patch 14, a 9 x 9 grid: 126 here (see DEIT3_RESOLUTION).
DEIT3_21K_DROP_PATH = {"vit_s": 0.05, "vit_b": 0.1, "vit_l": 0.3, "vit_h": 0.5}
DEIT3_21K_EPOCHS = {"vit_s": 240.0, "vit_b": 240.0, "vit_l": 240.0, "vit_h": 90.0}
DEIT3_21K_RESOLUTION = {"vit_h": 126}
# Their fine-tuning on IN-1k at 224 (50 epochs, LAMB lr 3e-4): drop path per size.
DEIT3_21K_FT_DROP_PATH = {"vit_s": 0.05, "vit_b": 0.15, "vit_l": 0.4, "vit_h": 0.45}
IN21K_CLASSES = 21841  # the full ImageNet-21k (fall 2011 release)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            # a variant of herd.vision.models: vit_ti/s/m/b/l/h, patchconvnet_s60 ... l120
            "name": "vit_s",
            "image_size": 224,
            "num_classes": 1000,
            "drop_path": 0.0,  # uniform stochastic depth rate (survivors rescaled)
            "dtype": "float32",  # compute dtype ('bfloat16' on accelerators)
            "param_dtype": "float32",
            **{k: placeholder(t) for k, t in MODEL_OVERRIDES.items()},
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.data = ml_collections.ConfigDict(
        {
            # 'digits' (scikit-learn's, shipped), 'folder' (ImageNet-style class folders
            # under data.path/<split>) or 'tfds' (a prepared tfds dataset named data.path)
            "source": "digits",
            "path": "",
            "train_split": "train",
            "eval_split": "test",
            "eval_images": 0,  # 0 = the whole eval split
            "global_batch_size": 2048,  # images per step, all processes together
            "eval_batch_size": 256,
            # train augmentation: '3aug' (RRC + flip + one of grayscale / solarize / blur +
            # colour jitter), 'simple_crop', 'rrc', 'randaug' (fine-tuning), 'none'
            "augment": "3aug",
            "color_jitter": 0.3,
            "repeated_aug": 3,  # augmented copies of each image per epoch (DeiT's RASampler)
            "crop_ratio": 1.0,  # eval: resize to image_size / crop_ratio, centre crop
            # one of mixup / cutmix per batch (timm Mixup with switch_prob); 0 and 0 = off
            "mixup_alpha": 0.8,
            "cutmix_alpha": 1.0,
            "mixup_switch_prob": 0.5,
            "seed": 0,
            "worker_count": 0,
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "optimizer": "lamb",  # 'lamb' (DeiT III) | 'adamw' (fine-tuning) | 'sgd'
            "lr": 3e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 5.0,
            "start_lr": 1e-6,  # warmup starts here (timm's warmup_lr)
            "min_lr": 1e-5,  # the cosine's floor
            "clip_norm": 1.0,  # global gradient-norm clipping (0 = off)
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
        }
    )
    c.loss = ml_collections.ConfigDict(
        {
            "name": "bce",  # 'bce' (mixed targets binarised, DeiT III) | 'ce'
            "label_smoothing": 0.0,  # 'ce' only
        }
    )
    # cosub: each batch twice through two stochastic-depth submodels, the four-term loss
    c.cosub = False
    c.finetune = ml_collections.ConfigDict(
        {
            # a herd.vision.train workdir (or its checkpoints/ directory) to start from; the
            # pos-emb is interpolated to model.image_size
            "init_from": "",
            "reinit_head": False,  # a new head (e.g. another num_classes)
            # "Three things" (2): train only attention (+ head, pos-emb), freeze the rest
            "attention_only": False,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "epochs": 800.0,
            "steps": placeholder(int),  # set: train this many steps instead of epochs
            "stop_after": 0,  # > 0: stop this invocation at that step (resume later)
            "grad_accum_steps": 1,
            "eval_every_epochs": 1.0,
            "eval_at_start": False,
            "checkpoint_every_epochs": 1.0,
            "keep_checkpoints": 3,
            "async_checkpoints": True,
            "log_every": 50,
            "seed": 0,
            "progress": True,
            "tensorboard": True,
            "attention_maps": 0,  # > 0: a PNG of this many test images' attention maps
        }
    )
    return c


def deit3_config(
    variant: str,
    *,
    image_size: int | None = None,
    epochs: float = 800.0,
    drop_path: float | None = None,
    lr: float | None = None,
) -> ml_collections.ConfigDict:
    """The DeiT III ImageNet-1k pre-training recipe (Table 1) for `variant` on a pod.

    Batch 2048, 800 epochs with repeated augmentation x3, LAMB (global clip 1.0, trust
    ratio only on decayed params; no decay on 1-D params, pos-emb, class token) lr 4e-3
    (S) / 3e-3, wd 0.05, per-epoch cosine with 5 warmup epochs from 1e-6 to 1e-5;
    3-Augment with colour jitter 0.3; mixup 0.8 / cutmix 1.0; BCE on binarised targets;
    no label smoothing, no random erasing; eval crop ratio 1.0. The data are the user's:
    --config.data.source=tfds --config.data.path=imagenet2012 (or 'folder').
    """
    c = base_config()
    c.model.name = variant
    c.model.image_size = image_size or DEIT3_RESOLUTION.get(variant, 224)
    c.model.drop_path = drop_path if drop_path is not None else DEIT3_DROP_PATH.get(variant, 0.1)
    c.model.dtype = "bfloat16"
    c.data.source = "tfds"
    c.data.path = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.optim.lr = lr if lr is not None else DEIT3_LR.get(variant, 3e-3)
    c.train.epochs = float(epochs)
    c.train.progress = False
    c.train.log_every = 100
    return c


def finetune_config(variant: str, image_size: int) -> ml_collections.ConfigDict:
    """DeiT III's fine-tuning stage on IN-1k (Table 1, "FT" column; sec. 4.2): 20 epochs at
    the new resolution, AdamW lr 1e-5 (5 warmup epochs from 1e-6), wd 0.1, CE with label
    smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, no repeated
    augmentation, batch 512, stochastic depth DEIT3_FT_DROP_PATH (the official commands).
    Set --config.finetune.init_from to the pre-training workdir.
    """
    c = deit3_config(
        variant, image_size=image_size, epochs=20.0, drop_path=DEIT3_FT_DROP_PATH.get(variant)
    )
    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.999
    c.optim.clip_norm = 0.0
    c.loss.name = "ce"
    c.loss.label_smoothing = 0.1
    c.data.augment = "randaug"
    c.data.repeated_aug = 1
    c.data.global_batch_size = 512
    return c


def in21k_config(variant: str) -> ml_collections.ConfigDict:
    """DeiT III pre-training on ImageNet-21k (sec. 4.1; README_revenge.md "Training on
    ImageNet-21k"): batch 2048, LAMB lr 1e-3 (5 warmup epochs from 1e-6), wd 0.02; CE with
    label smoothing 0.1; 3-Augment after a simple random crop (resize, random crop with
    reflect padding 4, flip) instead of the random resized crop; cutmix 1.0 and no mixup;
    no repeated augmentation; 240 epochs at 224 (ViT-H: 90 at 128 -> 126);
    stochastic depth S 0.05, B 0.1, L 0.3, H 0.5.
    """
    c = deit3_config(
        variant,
        image_size=DEIT3_21K_RESOLUTION.get(variant, 224),
        epochs=DEIT3_21K_EPOCHS.get(variant, 240.0),
        drop_path=DEIT3_21K_DROP_PATH.get(variant),
        lr=1e-3,
    )
    c.model.num_classes = IN21K_CLASSES
    c.data.path = "imagenet21k"  # the user's prepared tfds name (or a 'folder' path)
    c.data.augment = "3aug_simple_crop"
    c.data.repeated_aug = 1
    c.data.mixup_alpha = 0.0
    c.data.cutmix_alpha = 1.0
    c.optim.weight_decay = 0.02
    c.loss.name = "ce"
    c.loss.label_smoothing = 0.1
    return c


def in21k_finetune_config(variant: str) -> ml_collections.ConfigDict:
    """The IN-1k fine-tuning of an IN-21k pre-training (README_revenge.md "finetuning on
    ImageNet-1k"): the 21k recipe (in21k_config) on IN-1k at 224 for 50 epochs with LAMB
    lr 3e-4, stochastic depth S 0.05, B 0.15, L 0.4, H 0.45, and a new 1000-class head.
    """
    c = in21k_config(variant)
    c.model.image_size = 224
    c.model.num_classes = 1000
    c.model.drop_path = DEIT3_21K_FT_DROP_PATH.get(variant, 0.1)
    c.data.path = "imagenet2012"
    c.optim.lr = 3e-4
    c.train.epochs = 50.0
    c.finetune.reinit_head = True
    return c


def digits_config() -> ml_collections.ConfigDict:
    """A small ViT on scikit-learn's handwritten digits (the embedded default's base).

    The 8 x 8 digits upscaled to 16 x 16, 4 x 4 patches (16 tokens + class token), width
    64, 4 blocks of 4 heads (0.2M params). The DeiT III recipe (LAMB, BCE, per-epoch cosine
    with warmup from 1e-6, drop path) scaled to 1438 images: no LayerScale (its 1e-4 init
    keeps the blocks silent for hundreds of steps at this size), lr 1e-2, batch 32, and no
    crop / mixup augmentation (a 4-pixel shift or a random resized crop of a 16-pixel digit
    destroys it: a logistic regression falls from 96% to 32% under the simple crop).
    """
    c = base_config()
    c.model.name = "vit_ti"
    c.model.image_size = 16
    c.model.num_classes = 10
    c.model.patch_size = 4
    c.model.dim = 64
    c.model.depth = 4
    c.model.n_heads = 4
    c.model.layerscale_init = 0.0  # none
    c.model.drop_path = 0.05
    c.data.source = "digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.global_batch_size = 32
    c.data.eval_batch_size = 128
    c.data.augment = "none"
    c.data.repeated_aug = 1
    c.data.mixup_alpha = 0.0
    c.data.cutmix_alpha = 0.0
    c.optim.lr = 1e-2
    c.optim.warmup_epochs = 2.0
    c.train.epochs = 20.0
    c.train.eval_every_epochs = 5.0
    c.train.checkpoint_every_epochs = 10.0
    c.train.log_every = 20
    c.train.attention_maps = 4
    return c
