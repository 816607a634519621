"""DeiT III: the IN-1k fine-tuning of an ImageNet-21k pre-training (deit3_in21k.py), as the
official commands do it (facebookresearch/deit README_revenge.md, "finetuning on
ImageNet-1k" under "Training on ImageNet-21k").

The 21k recipe (LAMB, wd 0.02, CE with label smoothing 0.1, simple random crop + 3-Augment,
cutmix 1.0 and no mixup, no repeated augmentation, batch 2048) on IN-1k at 224 for 50
epochs with lr 3e-4 and stochastic depth S 0.05, B 0.15, L 0.4, H 0.45; a new 1000-class
head. Gives S 83.1, B 85.7, L 87.0% top-1 (README_revenge.md model zoo). Set
--config.finetune.init_from to the 21k workdir; `:vit_l` etc. picks the size (default
vit_b).
"""

from configs.vision.common import in21k_finetune_config


def get_config(arg=None):
    return in21k_finetune_config(arg or "vit_b")
