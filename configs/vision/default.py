"""The embedded default: a small ViT trained on scikit-learn's handwritten digits.

A 0.2M-param ViT (16 x 16 images, 4 x 4 patches, width 64, 4 blocks) with the DeiT III
recipe scaled down (configs/vision/common.py digits_config): 20 epochs of 44 steps of 32
images. Measured on the shared 2-core machine (load average ~9): 131 s, ~630 images/s,
held-out top-1 95.3% after 10 epochs and 97.2% after 20 (359 held-out images).
"""

from configs.vision.common import digits_config


def get_config(arg=None):
    del arg
    return digits_config()
