"""Logical axis names of the vision models and the rules that map them to the mesh.

Every parameter of ``herd.vision.vit`` and ``herd.vision.patchconvnet`` carries logical
axis names; ``VISION_RULES`` (the core's ``CORE_RULES`` plus these) maps them to the mesh
axes ('data', 'fsdp', 'tensor'):

- ``embed`` (model width) -> fsdp, ``mlp`` (MLP hidden width) -> tensor (core rules);
- ``heads`` -> tensor, as in Megatron-style tensor parallelism of attention;
  PatchConvNet's pooling block names its heads ``pool_heads`` (replicated): it has a
  single head, which no tensor axis of size > 1 can split;
- ``conv_hidden`` (PatchConvNet's 1x1 / depthwise conv width) -> tensor, like ``mlp``;
- everything small or spatial is replicated: ``head_dim``, ``qkv`` (the 3 of a fused
  q/k/v projection), ``classes`` (a 10-class head must not be split 4 ways),
  ``conv_height`` / ``conv_width`` / ``in_channels`` (RGB) / ``stem_in_channels`` /
  ``stem_channels`` (a stem kernel's input and output widths: two names, since flax
  refuses one name on two axes of an array; the stems are under 1% of the weights),
  ``se`` (the squeeze-excite bottleneck), ``height`` / ``width`` (activation grids) and
  ``tokens`` (position-embedding rows).

Use them like the LM's: ``herd.core.mesh.init_sharded(init_fn, rng, mesh, VISION_RULES)``.
"""

from __future__ import annotations

from herd.core.mesh import axis_rules

__all__ = ["VISION_RULES", "VISION_AXES"]

VISION_AXES: tuple[tuple[str, object], ...] = (
    ("heads", "tensor"),
    ("head_dim", None),
    ("pool_heads", None),
    ("qkv", None),
    ("classes", None),
    ("conv_hidden", "tensor"),
    ("se", None),
    ("conv_height", None),
    ("conv_width", None),
    ("in_channels", None),
    ("stem_in_channels", None),
    ("stem_channels", None),
    ("height", None),
    ("width", None),
    ("tokens", None),
)

VISION_RULES = axis_rules(*VISION_AXES)
