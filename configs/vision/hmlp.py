"""ViT-B with the hierarchical MLP (hMLP) stem ("Three things", the third thing, sec. 5):
conv 4x4/s4 -> norm -> GELU -> conv 2x2/s2 -> norm -> GELU -> conv 2x2/s2 -> norm,
widths D/4, D/4, D; patches never mix, so masking before or after the stem is the same
(what BeiT-style masked pre-training needs). `:hmlp_ln` picks LayerNorm, the default
`hmlp_bn` BatchNorm (its running statistics are the train state's `extra`).
Recipe: DeiT III IN-1k for ViT-B at 224 (verify the paper's supervised setting).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    c = deit3_config("vit_b", image_size=224)
    c.model.stem = arg or "hmlp_bn"
    return c
