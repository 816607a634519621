"""The Llama model's logical axis names and the mesh axes they map to.

Added to the core's generic rules (batch, embed, mlp, layers, length, norm; see
herd.core.mesh): the vocabulary and the attention heads are split tensor-parallel (as in
Megatron-LM's column/row-parallel attention; GQA's kv heads likewise when they divide),
the per-head width is not split.
"""

from herd.core.mesh import axis_rules

LM_RULES = axis_rules(
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
)
