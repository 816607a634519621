"""Logical axis names of the vision models and the rules that map them to the mesh.

Every parameter of ``herd.vision.vit`` and ``herd.vision.patchconvnet`` carries logical
axis names; ``VISION_RULES`` (the core's ``CORE_RULES`` plus these) maps them to the mesh
axes ('data', 'fsdp', 'tensor'):

- ``embed`` (model width) -> fsdp, ``mlp`` (MLP hidden width) -> tensor (core rules);
- ``heads`` -> tensor, as in Megatron-style tensor parallelism of attention;
- ``conv_hidden`` (PatchConvNet's 1x1 / depthwise conv width) -> tensor, like ``mlp``;
- everything small or spatial is replicated: ``head_dim``, ``qkv`` (the 3 of a fused
  q/k/v projection), ``classes`` (a 10-class head must not be split 4 ways),
  ``conv_height`` / ``conv_width`` / ``in_channels`` / ``stem_channels`` (stem kernels,
  under 1% of the weights), ``se`` (the squeeze-excite bottleneck), ``height`` / ``width``
  (activation grids) and ``tokens`` (position-embedding rows).

Use them like the LM's: ``herd.core.mesh.init_sharded(init_fn, rng, mesh, VISION_RULES)``.
"""

from __future__ import annotations

from herd.core.mesh import axis_rules

__all__ = ["VISION_RULES", "VISION_AXES"]

VISION_AXES: tuple[tuple[str, object], ...] = (
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("classes", None),
    ("conv_hidden", "tensor"),
    ("se", None),
    ("conv_height", None),
    ("conv_width", None),
    ("in_channels", None),
    ("stem_channels", None),
    ("height", None),
    ("width", None),
    ("tokens", None),
)

VISION_RULES = axis_rules(*VISION_AXES)
