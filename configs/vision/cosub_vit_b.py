"""cosub: ViT-B pre-trained on ImageNet-21k with submodel co-training (Touvron et al. 2022,
"Co-training 2L submodels for visual recognition", eq. 2; the abstract: 87.4% top-1 @448
on ImageNet-val after fine-tuning).

The DeiT III 21k recipe (deit3_in21k.py) with cosub on: every batch goes through the
network twice, stochastic depth draws two submodels, and the loss is 0.25 [BCE(z1, y) +
BCE(z2, y) + BCE(z1, sg(sigmoid z2)) + BCE(z2, sg(sigmoid z1))] (cosub's loss is a BCE,
so the recipe's CE becomes BCE on binarised targets). A step costs twice the compute.
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    c = deit3_config("vit_b", image_size=224, epochs=90.0, lr=1e-3)
    c.model.num_classes = 21841
    c.data.path = "imagenet21k"
    c.data.augment = "3aug_simple_crop"
    c.data.repeated_aug = 1
    c.optim.weight_decay = 0.02
    c.loss.name = "bce"
    c.cosub = True
    return c
