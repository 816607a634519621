"""A small PatchConvNet on scikit-learn's handwritten digits (the notebook's; seconds long).

The digits upscaled to 48 x 48, so the stem's four stride-2 convs leave a 3 x 3 token grid
(one token per 16 x 16 pixels), width 64 (stem widths 8, 16, 32, 64), 4 SE trunk blocks,
the single-head attention pooling (0.11M params). Deviations from the paper-scale recipe,
each measured on the digits (held-out top-1 after 6 epochs, batch 64, CE):

- AdamW lr 5e-3 and CE: 89%; LAMB lr 1e-2: 61%; with BCE (AdamW or LAMB) the net sat at
  the class prior (10-19%) for the whole short run;
- LayerScale 1.0 instead of the paper's 1e-4 / 1e-6 (which keeps a 4-block trunk silent
  for the few hundred steps a digits run has), no stochastic depth;
- trunk blocks unrolled (scan_blocks=False): on XLA:CPU the depthwise conv's gradient
  inside a scan ran ~4x slower than unrolled (0.17 s vs 0.04 s per step of 64 images);
- 48 px, not 64: a 4 x 4 grid at 64 px trains ~3x slower on CPU.

8 epochs of 22 steps of 64 images; no crop / mixup augmentation (configs/vision/common.py
digits_config says why).
"""

from configs.vision.common import digits_config


def get_config(arg=None):
    del arg
    c = digits_config()
    c.model.name = "patchconvnet_s60"
    c.model.image_size = 48
    c.model.dim = 64
    c.model.depth = 4
    c.model.layerscale_init = 1.0
    c.model.drop_path = 0.0
    c.model.scan_blocks = False
    c.model.patch_size = None  # ViT-only fields of the digits ViT: the stem fixes the stride
    c.model.n_heads = None
    c.data.global_batch_size = 64
    c.optim.optimizer = "adamw"
    c.optim.lr = 5e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 1.0
    c.loss.name = "ce"
    c.train.epochs = 8.0
    c.train.eval_every_epochs = 4.0
    c.train.checkpoint_every_epochs = 0.0
    return c
