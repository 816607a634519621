"""DeiT III fine-tuning at 224 of an IN-1k pre-training (Table 1 "FT"; sec. 4.2): 20 epochs,
batch 512, AdamW lr 1e-5, wd 0.1, CE with label smoothing 0.1, RandAugment, mixup 0.8 /
cutmix 1.0, stochastic depth B 0.2, L 0.45, H 0.55 (README_revenge.md's commands).

The stage after deit3_vit_{b,l} (trained at 192) and deit3_vit_h (160): B 83.8, L 84.9,
H 85.2% top-1 (Table 7). `--config=configs/vision/deit3_finetune_224.py:vit_l` picks the
size (default vit_b); set --config.finetune.init_from to the pre-training workdir. An
IN-21k pre-training is fine-tuned with deit3_in21k_finetune.py instead.
"""

from configs.vision.common import finetune_config


def get_config(arg=None):
    return finetune_config(arg or "vit_b", 224)
