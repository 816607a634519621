"""The DeiT III line in JAX: ViT (LayerScale, stochastic depth, parallel blocks, hMLP stem)
and PatchConvNet, their data pipelines, losses, trainer and timm / official conversion.

Models: ``herd.vision.models`` (``model_config``, ``make_model``, ``count_params``),
``herd.vision.vit``, ``herd.vision.patchconvnet``; sharding rules ``herd.vision.sharding``;
checkpoints ``herd.vision.convert``.
"""
