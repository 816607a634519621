"""ViT-S with 36 sequential blocks: the baseline of vit_s_18x2.py ("Three things", sec. 3).

Same parameters and FLOPs as ViT-S 18 x 2; same recipe (DeiT III at 224, ViT-S lr;
drop path 0.1 and 400 epochs: verify against the paper's Table 1).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    c = deit3_config("vit_s_36x1", image_size=224, epochs=400.0, drop_path=0.1, lr=4e-3)
    return c
