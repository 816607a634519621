"""DeiT III pre-training on ImageNet-21k (DeiT III sec. 4.1, Table 1 "21k" column).

Differences to the IN-1k recipe: CE loss, simple random crop (resize, random crop with
reflect padding 4, flip) instead of random resized crop, then 3-Augment; lr 1e-3,
wd 0.02; 90 epochs at 224 (the paper also reports 240; verify which per size), 21841
classes. Then fine-tune on
IN-1k with deit3_finetune_224/384 (--config.finetune.reinit_head=true): S 83.1, B 85.7,
L 87.0% top-1 at 224. `:vit_l` etc. picks the size (default vit_b).
"""

from configs.vision.common import deit3_config


def get_config(arg=None):
    variant = arg or "vit_b"
    c = deit3_config(variant, image_size=224, epochs=90.0, lr=1e-3)
    c.model.num_classes = 21841
    c.data.path = "imagenet21k"  # the user's prepared tfds name (or a 'folder' path)
    c.data.augment = "3aug_simple_crop"
    c.data.repeated_aug = 1  # verify: the 21k runs of the official code
    c.optim.weight_decay = 0.02
    c.loss.name = "ce"
    return c
