"""Attention-only fine-tuning at a new resolution ("Three things", the second thing, sec. 4):
from a 224 checkpoint, fine-tune at 384 training only the attention layers' weights (plus
the head and the interpolated position embedding); everything else stays frozen, so the
optimiser holds state for a third of the parameters and most weights are shared across
resolutions. The paper finds it within about 0.1-0.2% of full fine-tuning for ViT-B/L.

Otherwise DeiT III's fine-tuning (deit3_finetune_384.py). `:vit_s` etc. picks the size
(default vit_b); set --config.finetune.init_from to the 224 workdir.
"""

from configs.vision.common import finetune_config


def get_config(arg=None):
    c = finetune_config(arg or "vit_b", 384)
    c.finetune.attention_only = True
    return c
