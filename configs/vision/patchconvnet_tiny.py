"""A seconds-long PatchConvNet test config: a 2-block PatchConvNet of width 32 on 32 x 32
digits, 4 steps (configs/vision/tiny.py with the model swapped).

The stem's four stride-2 convs need 16 pixels per token: 32 x 32 digits give a 2 x 2 grid.
The tests of herd.vision.train override what they need (mesh, steps).
"""

from configs.vision.tiny import get_config as tiny_config


def get_config(arg=None):
    del arg
    c = tiny_config()
    c.model.name = "patchconvnet_s60"
    c.model.image_size = 32
    c.model.dim = 32
    c.model.depth = 2
    c.model.patch_size = None  # ViT-only fields of the tiny ViT: the stem fixes the stride
    c.model.n_heads = None
    return c
