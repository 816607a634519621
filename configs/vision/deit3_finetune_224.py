"""DeiT III fine-tuning at 224 (Table 1 "FT"; sec. 4.2): 20 epochs, AdamW lr 1e-5, wd 0.1,
CE with label smoothing 0.1, RandAugment, drop path kept on.

The stage after deit3_vit_{b,l} (trained at 192) and deit3_vit_h (160): B 83.8, L 84.9,
H 85.2% top-1 (Table 7). `--config=configs/vision/deit3_finetune_224.py:vit_l` picks the
size (default vit_b); set --config.finetune.init_from to the pre-training workdir.
"""

from configs.vision.common import finetune_config


def get_config(arg=None):
    return finetune_config(arg or "vit_b", 224)
