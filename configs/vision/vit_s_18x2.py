"""ViT-S with parallel blocks, 18 x 2 ("Three things everyone should know about Vision
Transformers", Touvron et al. 2022, the first thing; timm vit_small_patch16_18x2_224).

Each of the 18 layers is x + a1(x) + a2(x), then x + f1(x) + f2(x), every branch with its
own LayerNorm and LayerScale: the same parameters and FLOPs as a sequential ViT-S of 36
blocks (vit_s_36x1.py), half the depth. DeiT III IN-1k recipe at 224 with ViT-S's lr
(Three things sec. 3; drop path 0.1 and 400 epochs: verify against the paper's Table 1).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    c = deit3_config("vit_s_18x2", image_size=224, epochs=400.0, drop_path=0.1, lr=4e-3)
    return c
