"""A seconds-long test config: a 2-block ViT of width 32 on 16 x 16 digits, 4 steps.

The tests of herd.vision.train override what they need (mesh, steps, cosub, fine-tuning).
"""

from configs.vision.common import digits_config


def get_config(arg=None):
    del arg
    c = digits_config()
    c.model.image_size = 16
    c.model.patch_size = 4
    c.model.dim = 32
    c.model.depth = 2
    c.model.n_heads = 2
    c.model.drop_path = 0.1
    c.model.layerscale_init = 1.0  # blocks that matter from step 0 (drop path shows)
    c.data.global_batch_size = 32
    c.data.eval_batch_size = 64
    c.data.eval_images = 128
    c.data.mixup_alpha = 0.8  # exercise the mixed targets
    c.data.cutmix_alpha = 1.0
    c.optim.warmup_epochs = 0.0
    c.train.steps = 4
    c.train.eval_every_epochs = 0.0
    c.train.checkpoint_every_epochs = 0.0
    c.train.log_every = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.train.attention_maps = 0
    return c
