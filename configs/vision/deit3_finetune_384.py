"""DeiT III fine-tuning at 384 of an IN-1k pre-training (Table 1 "FT"; Table 7 reports the
@384 results): 20 epochs, batch 512, AdamW lr 1e-5, wd 0.1, CE with label smoothing 0.1,
RandAugment, mixup 0.8 / cutmix 1.0; stochastic depth 0.0 for ViT-S (README_revenge.md's
ViT-S @384 command), B 0.2, L 0.45 (their 224 commands; no @384 command is published).

ViT-S 83.4, ViT-B 85.0, ViT-L 85.8% top-1 at 384 (the model zoo). `:vit_s` etc. picks the
size (default vit_b); set --config.finetune.init_from to the pre-training workdir.
"""

from configs.vision.common import finetune_config


def get_config(arg=None):
    return finetune_config(arg or "vit_b", 384)
