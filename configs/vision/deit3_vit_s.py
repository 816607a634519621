"""DeiT III ViT-S/16 on ImageNet-1k at 224 (DeiT III Table 1 recipe; 81.4% top-1, Table 7).

800 epochs x 1.28M images, batch 2048, LAMB lr 4e-3, drop path 0.05, BCE, 3-Augment.
For pods: --config.data.source=tfds --config.data.path=imagenet2012 (prepared by the user).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    return deit3_config("vit_s")
