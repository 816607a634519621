"""DeiT III pre-training on ImageNet-21k (DeiT III sec. 4.1 and Table 1's 21k column; the
official commands of facebookresearch/deit README_revenge.md, "Training on ImageNet-21k").

Differences to the IN-1k recipe: CE with label smoothing 0.1 (not BCE); 3-Augment after a
simple random crop (resize, random crop with reflect padding 4, flip) instead of the random
resized crop; cutmix 1.0 and no mixup; no repeated augmentation; LAMB lr 1e-3, wd 0.02;
240 epochs at 224 (ViT-H: 90 epochs at 128, here 126 = 9 x 14); stochastic depth S 0.05,
B 0.1, L 0.3, H 0.5; batch 2048; 21841 classes. Then fine-tune on IN-1k with
deit3_in21k_finetune.py: S 83.1, B 85.7, L 87.0% top-1 at 224 (README_revenge.md model zoo).
`:vit_l` etc. picks the size (default vit_b).
"""

from configs.vision.common import in21k_config


def get_config(arg=None):
    return in21k_config(arg or "vit_b")
