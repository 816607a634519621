"""DeiT III fine-tuning at 384 (Table 1 "FT"; Tables 7 and 8 report the @384 results):
20 epochs, AdamW lr 1e-5, wd 0.1, CE with label smoothing 0.1, RandAugment, drop path on.

From an IN-1k or an IN-21k pre-training (the 21k->1k numbers at 224: S 83.1, B 85.7,
L 87.0). `:vit_s` etc. picks the size (default vit_b); set --config.finetune.init_from
(and --config.finetune.reinit_head=true when coming from the 21k head).
"""

from configs.vision.common import finetune_config


def get_config(arg=None):
    return finetune_config(arg or "vit_b", 384)
