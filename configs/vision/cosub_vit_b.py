"""cosub: ViT-B pre-trained on ImageNet-21k with submodel co-training (Touvron et al. 2022,
"Co-training 2L submodels for visual recognition", eq. 2; the abstract: 87.4% top-1 @448
on ImageNet-val after fine-tuning).

The DeiT III 21k recipe (deit3_in21k.py: LAMB lr 1e-3, wd 0.02, simple random crop +
3-Augment, cutmix 1.0 and no mixup, stochastic depth 0.1, batch 2048) with cosub on: every
batch goes through the network twice, stochastic depth draws two submodels, and the loss is
0.25 [BCE(z1, y) + BCE(z2, y) + BCE(z1, sg(sigmoid z2)) + BCE(z2, sg(sigmoid z1))] (cosub's
loss is a BCE, so the recipe's smoothed CE becomes BCE on binarised targets, no smoothing).
90 epochs, not the DeiT III 21k runs' 240: cosub's own schedule is not in RECIPES.md or the
official READMEs (verify against the cosub paper). A step costs twice the compute.
"""

from configs.vision.common import in21k_config


def get_config(arg=None):
    del arg
    c = in21k_config("vit_b")
    c.train.epochs = 90.0
    c.loss.name = "bce"
    c.loss.label_smoothing = 0.0
    c.cosub = True
    return c
