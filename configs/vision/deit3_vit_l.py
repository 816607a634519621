"""DeiT III ViT-L/16 on ImageNet-1k at 192, lr 3e-3, drop path 0.45 (DeiT III Table 1).

84.9% top-1 after the fine-tune at 224 (DeiT III Table 7).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    c = deit3_config("vit_l")
    c.model.remat_policy = "full"
    return c
