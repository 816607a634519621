"""PatchConvNet-B120 on ImageNet-1k at 224 ("Augmenting Convolutional networks with
attention-based aggregation", Touvron et al. 2021; 84.1% top-1 in the paper's ImageNet-1k results).

Conv stem, 120 SE trunk blocks with LayerScale, one attention-based pooling block. Trained
here with the DeiT III recipe (LAMB, BCE, 3-Augment, mixup / cutmix) for 400 epochs, lr
3e-3, drop path 0.1 (the paper's own schedule: verify against its sec. 4 / appendix).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    del arg
    return deit3_config("patchconvnet_b120", image_size=224, epochs=400.0, drop_path=0.1, lr=3e-3)
