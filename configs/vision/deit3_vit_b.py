"""DeiT III ViT-B/16 on ImageNet-1k at 192, lr 3e-3, drop path 0.2 (DeiT III Table 1).

83.8% top-1 after the 20-epoch fine-tune at 224 (configs/vision/deit3_finetune_224.py;
DeiT III Table 7). For pods: set data.source / data.path to the prepared ImageNet.
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    return deit3_config("vit_b")
