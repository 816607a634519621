"""The embedded default: a small ViT trained on scikit-learn's handwritten digits.

A 0.2M-param ViT (16 x 16 images, 4 x 4 patches, width 64, 4 blocks) with the DeiT III
recipe scaled down (configs/vision/common.py digits_config): 20 epochs of 44 steps of 32
images. `python -m herd.vision.train` on the shared 2-core machine: 46 s wall (32 s of
training at ~1,100 images/s, MFU ~2.6%), held-out top-1 97.2%, top-5 100% (359 held-out
images); 131 s while the machine was loaded (load average ~9), 95.3% already at 10 epochs.
"""

from configs.vision.common import digits_config


def get_config(arg=None):
    del arg
    return digits_config()
