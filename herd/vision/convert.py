"""timm and official DeiT III / PatchConvNet state dicts <-> herd vision params.

    config, params = from_timm(state_dict, "deit3_small_patch16_224")
    logits = ViT(config).apply({"params": params}, images_nhwc)
    state_dict = to_timm(config, params)             # timm keys, torch layouts (numpy)

``state_dict``: a mapping of names to torch tensors or numpy arrays, as ``torch.load`` gives
it (an official ``.pth`` holds it under ``'model'``; a ``module.`` prefix is stripped).

Key layouts (what each checkpoint family names its weights; all facts from the reference
code, ``timm/models/vision_transformer.py`` and ``facebookresearch/deit`` ``models_v2.py`` /
``patchconvnet_models.py``):

- ``timm``: timm's ViT (``deit3_*``, ``vit_*``): ``blocks.i.norm1``, ``attn.qkv``,
  ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``; parallel
  blocks (ParallelThingsBlock) ``blocks.i.attns.j.{norm,attn.qkv,attn.proj,ls.gamma}`` and
  ``blocks.i.ffns.j.{norm,mlp.fc1,mlp.fc2,ls.gamma}``.
- ``official``: the DeiT III release (``deit_3_*.pth``, models_v2.py): the same names but
  LayerScale ``blocks.i.gamma_1`` / ``gamma_2`` (timm's own loader renames exactly these,
  ``gamma_([0-9])`` -> ``ls\\1.gamma``); the x2 parallel block names its second branch
  ``norm11``, ``attn1``, ``gamma_1_1``, ``norm21``, ``mlp1``, ``gamma_2_1``; the hMLP stem is
  ``patch_embed.proj.{0,3,6}`` (convs) and ``.{1,4,7}`` (norms, BatchNorm buffers included).
- ``patchconvnet``: the official PatchConvNet (``S60`` ... ``L120``): ``patch_embed.proj.
  {0,2,4,6}.0`` (stem convs), ``blocks.i.{norm1, attn.qkv_pos.{0,2,4.conv_reduce,
  4.conv_expand,5}, gamma_1}``, ``blocks_token_only.0.{norm1, attn.{q,k,v,proj}, gamma_1,
  norm2, mlp.{fc1,fc2}, gamma_2}``, ``norm``, ``head``.

The layout of a state dict is read from its keys; ``name`` gives the architecture (a timm
name such as ``deit3_base_patch16_384`` or ``vit_small_patch16_18x2_224``, an official one
such as ``deit_small_patch16_LS`` or ``S60``, or a herd variant such as ``vit_s``). The image
size comes from ``pos_embed``'s length (ViT) and the class count from the head.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from herd.vision.models import VisionConfig, abstract_variables, model_config
from herd.vision.patchconvnet import PATCHCONVNET_VARIANTS, PatchConvNetConfig
from herd.vision.vit import VIT_VARIANTS, ViTConfig, interpolate_pos_emb

__all__ = [
    "from_timm",
    "from_timm_variables",
    "to_timm",
    "resolve_name",
    "detect_layout",
    "stack_blocks",
    "unstack_blocks",
    "LAYOUTS",
]

LAYOUTS = ("timm", "official", "patchconvnet")

_SIZES = {"tiny": "ti", "small": "s", "medium": "m", "base": "b", "large": "l", "huge": "h"}


def resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """(herd variant, config fields the name implies) for a timm / official / herd name.

    The fields are those a checkpoint's tensors cannot tell: LayerScale's init value (timm's
    deit3_* 1e-6, vit_*_18x2 1e-5; official 1e-4) and, for names without it, nothing about
    the resolution (read from pos_embed instead).
    """
    base = name.split(".", 1)[0]  # timm pretrained tags: deit3_small_patch16_224.fb_in22k_ft_in1k
    if base in VIT_VARIANTS or base in PATCHCONVNET_VARIANTS:
        return base, {}
    m = re.fullmatch(r"deit3_(small|medium|base|large|huge)_patch(14|16)_(\d+)(_in21ft1k)?", base)
    if m:
        return f"vit_{_SIZES[m.group(1)]}", {"layerscale_init": 1e-6}
    m = re.fullmatch(r"vit_(small|base)_patch16_(18x2|36x1)_224", base)
    if m:
        return f"vit_{_SIZES[m.group(1)]}_{m.group(2)}", {
            "layerscale_init": 1e-5,
            "class_token_pos_emb": True,
        }
    m = re.fullmatch(
        r"deit_(tiny|small|medium|base|large|huge)_patch(14|16)(_18x2|_26x2|_36x1|_36)?(_LS)?",
        base,
    )
    if m:
        shape = {"_36": "_36x1", None: ""}.get(m.group(3), m.group(3))
        variant = f"vit_{_SIZES[m.group(1)]}{shape}"
        if variant in VIT_VARIANTS:
            return variant, ({} if m.group(4) else {"layerscale_init": None})
    if base in ("S60", "S120", "B60", "B120", "L60", "L120"):
        return f"patchconvnet_{base.lower()}", {}
    raise ValueError(
        f"unknown model name {name!r}; valid: timm deit3_<size>_patch16_<res> / "
        f"deit3_huge_patch14_<res>, vit_small|base_patch16_18x2|36x1_224; official "
        f"deit_<size>_patch16_LS, deit_huge_patch14_LS, deit_<small|base>_patch16_18x2_LS, "
        f"deit_huge_patch14_26x2_LS, S60, S120, B60, B120, L60, L120; herd "
        f"{', '.join((*VIT_VARIANTS, *PATCHCONVNET_VARIANTS))}"
    )


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def _clean(state_dict: Mapping) -> dict[str, np.ndarray]:
    sd = state_dict
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    out = {}
    for k, v in sd.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        out[k] = v
    return out


def detect_layout(keys) -> str:
    """'timm', 'official' or 'patchconvnet', from a state dict's keys."""
    keys = set(keys)
    if any(k.startswith("blocks_token_only.") for k in keys):
        return "patchconvnet"
    if any(re.fullmatch(r"blocks\.\d+\.(gamma_\d(_1)?|norm11\.weight)", k) for k in keys):
        return "official"
    if any(re.match(r"blocks\.\d+\.(ls\d\.gamma|attns\.|ffns\.)", k) for k in keys):
        return "timm"
    if any(re.match(r"patch_embed\.proj\.\d+\.", k) for k in keys):
        return "official"  # an hMLP stem (official code only) on blocks without LayerScale
    return "timm"


# ---------------------------------------------------------------------------------------
# Rules: (torch key, herd path, kind); kinds say how the two layouts relate
# ---------------------------------------------------------------------------------------
#   'vec'     same numbers, reshaped (biases [3D] <-> [3, H, hd]; cls [1, 1, D] <-> [D])
#   'linear'  torch nn.Linear weight [out, in] <-> kernel [*in, *out] (transpose)
#   'conv'    torch conv weight [O, I, kh, kw] <-> kernel [kh, kw, I, O] (HWIO), or the
#             1x1 conv [O, I, 1, 1] <-> [I, O], or the depthwise [D, 1, 3, 3] <-> [3, 3, D]


@dataclasses.dataclass(frozen=True)
class _Rule:
    key: str
    path: tuple  # herd path; a block param's path is ('blocks', i, ...)
    kind: str
    n_in: int = 1  # 'linear': how many leading kernel axes are inputs
    collection: str = "params"


def _vit_rules(c: ViTConfig, layout: str, has_head: bool) -> list[_Rule]:
    # In torch's state-dict order: a module's own parameters, then its children's.
    rules = [
        _Rule("cls_token", ("cls_token",), "vec"),
        _Rule("pos_embed", ("pos_embed",), "vec"),
    ]
    if c.stem == "patch":
        rules += [
            _Rule("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv"),
            _Rule("patch_embed.proj.bias", ("patch_embed", "bias"), "vec"),
        ]
    else:  # models_v2.hMLP_stem: Sequential(conv, norm, GELU, conv, norm, GELU, conv, norm)
        for i, (conv, norm) in enumerate(((0, 1), (3, 4), (6, 7))):
            p = f"patch_embed.proj.{conv}."
            rules += [
                _Rule(p + "weight", ("hmlp_stem", f"conv_{i}", "kernel"), "conv"),
                _Rule(p + "bias", ("hmlp_stem", f"conv_{i}", "bias"), "vec"),
            ]
            q = f"patch_embed.proj.{norm}."
            rules += [
                _Rule(q + "weight", ("hmlp_stem", f"norm_{i}", "scale"), "vec"),
                _Rule(q + "bias", ("hmlp_stem", f"norm_{i}", "bias"), "vec"),
            ]
            if c.stem == "hmlp_bn":
                rules += [
                    _Rule(q + "running_mean", ("hmlp_stem", f"norm_{i}", "mean"), "vec", 1, "bs"),
                    _Rule(q + "running_var", ("hmlp_stem", f"norm_{i}", "var"), "vec", 1, "bs"),
                ]
    if layout == "official" and c.n_parallel > 2:
        raise ValueError(
            f"the official DeiT layout has parallel blocks of 2 branches only, got "
            f"n_parallel={c.n_parallel}; use layout='timm'"
        )
    for i in range(c.depth):
        rules += _vit_block_rules(c, layout, i)
    rules += [
        _Rule("norm.weight", ("norm", "scale"), "vec"),
        _Rule("norm.bias", ("norm", "bias"), "vec"),
    ]
    if has_head:
        rules += [
            _Rule("head.weight", ("head", "kernel"), "linear"),
            _Rule("head.bias", ("head", "bias"), "vec"),
        ]
    return rules


def _vit_block_rules(c: ViTConfig, layout: str, i: int) -> list[_Rule]:
    """Block i's rules, in the checkpoint's own order."""
    b = f"blocks.{i}."
    ls = c.layerscale_init is not None
    attn, mlp, gammas = [], [], []
    for j in range(c.n_parallel):
        if layout == "timm" and c.n_parallel > 1:  # ParallelThingsBlock
            a_norm, a_mod, a_ls = f"attns.{j}.norm", f"attns.{j}.attn", f"attns.{j}.ls.gamma"
            m_norm, m_mod, m_ls = f"ffns.{j}.norm", f"ffns.{j}.mlp", f"ffns.{j}.ls.gamma"
        elif layout == "timm":
            a_norm, a_mod, a_ls = "norm1", "attn", "ls1.gamma"
            m_norm, m_mod, m_ls = "norm2", "mlp", "ls2.gamma"
        else:  # official: second branch suffixed 1 (norm11, attn1, gamma_1_1, ...)
            s, g = ("", "") if j == 0 else ("1", "_1")
            a_norm, a_mod, a_ls = f"norm1{s}", f"attn{s}", f"gamma_1{g}"
            m_norm, m_mod, m_ls = f"norm2{s}", f"mlp{s}", f"gamma_2{g}"
        at, ml = ("blocks", i, f"attn_{j}"), ("blocks", i, f"mlp_{j}")
        attn.append(
            [
                _Rule(b + a_norm + ".weight", (*at, "norm", "scale"), "vec"),
                _Rule(b + a_norm + ".bias", (*at, "norm", "bias"), "vec"),
                _Rule(b + a_mod + ".qkv.weight", (*at, "qkv", "kernel"), "linear"),
                _Rule(b + a_mod + ".qkv.bias", (*at, "qkv", "bias"), "vec"),
                _Rule(b + a_mod + ".proj.weight", (*at, "proj", "kernel"), "linear", 2),
                _Rule(b + a_mod + ".proj.bias", (*at, "proj", "bias"), "vec"),
            ]
        )
        mlp.append(
            [
                _Rule(b + m_norm + ".weight", (*ml, "norm", "scale"), "vec"),
                _Rule(b + m_norm + ".bias", (*ml, "norm", "bias"), "vec"),
                _Rule(b + m_mod + ".fc1.weight", (*ml, "fc1", "kernel"), "linear"),
                _Rule(b + m_mod + ".fc1.bias", (*ml, "fc1", "bias"), "vec"),
                _Rule(b + m_mod + ".fc2.weight", (*ml, "fc2", "kernel"), "linear"),
                _Rule(b + m_mod + ".fc2.bias", (*ml, "fc2", "bias"), "vec"),
            ]
        )
        gammas.append(
            (
                _Rule(b + a_ls, (*at, "layerscale"), "vec"),
                _Rule(b + m_ls, (*ml, "layerscale"), "vec"),
            )
            if ls
            else ()
        )
    if layout == "timm":  # each branch: norm, module, LayerScale; all attention first
        return [
            *(r for j in range(c.n_parallel) for r in (*attn[j], *gammas[j][:1])),
            *(r for j in range(c.n_parallel) for r in (*mlp[j], *gammas[j][1:])),
        ]
    # official: the block's own gammas (gamma_1, gamma_1_1, gamma_2, gamma_2_1), then its
    # submodules in creation order (norm1, norm11, attn, attn1, norm2, norm21, mlp, mlp1)
    out = [g[0] for g in gammas if g] + [g[1] for g in gammas if g]
    out += [r for j in range(c.n_parallel) for r in attn[j][:2]]
    out += [r for j in range(c.n_parallel) for r in attn[j][2:]]
    out += [r for j in range(c.n_parallel) for r in mlp[j][:2]]
    out += [r for j in range(c.n_parallel) for r in mlp[j][2:]]
    return out


def _patchconvnet_rules(c: PatchConvNetConfig, has_head: bool) -> list[_Rule]:
    rules = [
        _Rule("cls_token", ("cls_token",), "vec"),
    ]
    for i, seq in enumerate((0, 2, 4, 6)):  # ConvStem: conv3x3 (a Sequential), GELU, ...
        rules.append(_Rule(f"patch_embed.proj.{seq}.0.weight", ("stem", f"conv_{i}"), "conv"))
    for i in range(c.depth):
        b, p = f"blocks.{i}.", ("blocks", i)
        q = b + "attn.qkv_pos."
        rules += [
            _Rule(b + "gamma_1", (*p, "layerscale"), "vec"),
            _Rule(b + "norm1.weight", (*p, "norm", "scale"), "vec"),
            _Rule(b + "norm1.bias", (*p, "norm", "bias"), "vec"),
            _Rule(q + "0.weight", (*p, "conv_in", "kernel"), "conv"),
            _Rule(q + "0.bias", (*p, "conv_in", "bias"), "vec"),
            _Rule(q + "2.weight", (*p, "dwconv", "kernel"), "conv"),
            _Rule(q + "2.bias", (*p, "dwconv", "bias"), "vec"),
            _Rule(q + "4.conv_reduce.weight", (*p, "se_reduce", "kernel"), "conv"),
            _Rule(q + "4.conv_reduce.bias", (*p, "se_reduce", "bias"), "vec"),
            _Rule(q + "4.conv_expand.weight", (*p, "se_expand", "kernel"), "conv"),
            _Rule(q + "4.conv_expand.bias", (*p, "se_expand", "bias"), "vec"),
            _Rule(q + "5.weight", (*p, "conv_out", "kernel"), "conv"),
            _Rule(q + "5.bias", (*p, "conv_out", "bias"), "vec"),
        ]
    t, p = "blocks_token_only.0.", ("pool",)
    rules += [
        _Rule(t + "gamma_1", (*p, "layerscale_1"), "vec"),
        _Rule(t + "gamma_2", (*p, "layerscale_2"), "vec"),
        _Rule(t + "norm1.weight", (*p, "norm_1", "scale"), "vec"),
        _Rule(t + "norm1.bias", (*p, "norm_1", "bias"), "vec"),
    ]
    for name in ("q", "k", "v"):
        rules += [
            _Rule(t + f"attn.{name}.weight", (*p, name, "kernel"), "linear"),
            _Rule(t + f"attn.{name}.bias", (*p, name, "bias"), "vec"),
        ]
    rules += [
        _Rule(t + "attn.proj.weight", (*p, "proj", "kernel"), "linear", 2),
        _Rule(t + "attn.proj.bias", (*p, "proj", "bias"), "vec"),
        _Rule(t + "norm2.weight", (*p, "norm_2", "scale"), "vec"),
        _Rule(t + "norm2.bias", (*p, "norm_2", "bias"), "vec"),
        _Rule(t + "mlp.fc1.weight", (*p, "fc1", "kernel"), "linear"),
        _Rule(t + "mlp.fc1.bias", (*p, "fc1", "bias"), "vec"),
        _Rule(t + "mlp.fc2.weight", (*p, "fc2", "kernel"), "linear"),
        _Rule(t + "mlp.fc2.bias", (*p, "fc2", "bias"), "vec"),
        _Rule("norm.weight", ("norm", "scale"), "vec"),
        _Rule("norm.bias", ("norm", "bias"), "vec"),
    ]
    if has_head:
        rules += [
            _Rule("head.weight", ("head", "kernel"), "linear"),
            _Rule("head.bias", ("head", "bias"), "vec"),
        ]
    return rules


def _rules(config: VisionConfig, layout: str, has_head: bool) -> list[_Rule]:
    if isinstance(config, PatchConvNetConfig):
        if layout != "patchconvnet":
            raise ValueError(f"a PatchConvNet has only the 'patchconvnet' layout, got {layout!r}")
        return _patchconvnet_rules(config, has_head)
    if layout not in ("timm", "official"):
        raise ValueError(f"a ViT's layout is 'timm' or 'official', got {layout!r}")
    return _vit_rules(config, layout, has_head)


def _torch_shape(rule: _Rule, herd_shape: tuple[int, ...], key: str) -> tuple[int, ...]:
    if rule.kind == "vec":
        if key in ("cls_token", "pos_embed"):
            return (1,) * (3 - len(herd_shape)) + tuple(herd_shape)
        return (math.prod(herd_shape),)
    if rule.kind == "linear":
        n = rule.n_in
        return (math.prod(herd_shape[n:]), math.prod(herd_shape[:n]))
    if len(herd_shape) == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
        kh, kw, i, o = herd_shape
        return (o, i, kh, kw)
    if len(herd_shape) == 3:  # depthwise [3, 3, D] -> [D, 1, 3, 3]
        kh, kw, d = herd_shape
        return (d, 1, kh, kw)
    i, o = herd_shape  # 1x1 conv [I, O] -> [O, I, 1, 1]
    return (o, i, 1, 1)


def _to_herd(rule: _Rule, v: np.ndarray, herd_shape) -> np.ndarray:
    if rule.kind == "vec":
        return v.reshape(herd_shape)
    if rule.kind == "linear":
        return v.T.reshape(herd_shape)
    if v.ndim == 4 and len(herd_shape) == 4:
        return v.transpose(2, 3, 1, 0)
    if len(herd_shape) == 3:  # depthwise [D, 1, kh, kw] -> [kh, kw, D]
        return v[:, 0].transpose(1, 2, 0)
    return v[:, :, 0, 0].T  # 1x1 conv


def _to_torch(rule: _Rule, a: np.ndarray, torch_shape) -> np.ndarray:
    if rule.kind == "vec":
        return a.reshape(torch_shape)
    if rule.kind == "linear":
        out, inp = torch_shape
        return a.reshape(inp, out).T
    o, i, kh, kw = torch_shape
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 3:  # depthwise [kh, kw, D] -> [D, 1, kh, kw]
        return a.transpose(2, 0, 1)[:, None]
    return a.T[:, :, None, None]


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _block_path(path):
    """('blocks', i, ...) -> the path in the per-block (unstacked) tree."""
    if path[0] == "blocks":
        return (f"blocks_{path[1]}", *path[2:])
    return path


def stack_blocks(tree: Mapping, depth: int) -> dict:
    """``blocks_0`` ... ``blocks_{depth-1}`` -> ``blocks`` with a leading layers axis."""
    tree = dict(tree)
    per = [tree.pop(f"blocks_{i}") for i in range(depth)]
    tree["blocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per)
    return tree


def unstack_blocks(tree: Mapping, depth: int) -> dict:
    """The inverse of stack_blocks."""
    tree = dict(tree)
    stacked = tree.pop("blocks")
    for i in range(depth):
        tree[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return tree


def _per_block_shapes(config: VisionConfig) -> dict:
    """{'params': ..., maybe 'batch_stats': ...} shapes of the unscanned model."""
    variables = abstract_variables(config.replace(scan_blocks=False))
    return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(variables))


def _infer_vit_image_size(sd, config: ViTConfig) -> tuple[int, bool]:
    """(image_size, class_token_pos_emb) from pos_embed's length."""
    n = int(np.prod(_to_numpy(sd["pos_embed"]).shape[:-1]))
    for has_cls in (config.class_token_pos_emb, not config.class_token_pos_emb):
        g = math.isqrt(n - has_cls) if n - has_cls > 0 else 0
        if g > 0 and g * g == n - has_cls:
            return g * config.patch_size, has_cls
    raise ValueError(
        f"pos_embed has {n} rows, which is neither a square grid of patches nor one plus a "
        f"square; this is not a ViT position embedding herd can read"
    )


def from_timm_variables(
    state_dict: Mapping,
    name: str,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    head_seed: int = 0,
    **overrides,
) -> tuple[VisionConfig, dict]:
    """Like :func:`from_timm`, returning ``(config, variables)`` with ``variables =
    {'params': ..., 'batch_stats': ...}`` ('batch_stats' only for an hMLP BatchNorm stem,
    whose running statistics the checkpoint holds; ``num_batches_tracked`` is not kept)."""
    variant, implied = resolve_name(name)
    sd = _clean(state_dict)
    layout = detect_layout(sd)
    fields = {**implied}
    is_vit = variant in VIT_VARIANTS
    if is_vit and layout == "patchconvnet" or not is_vit and layout != "patchconvnet":
        raise ValueError(
            f"{name!r} is a {'ViT' if is_vit else 'PatchConvNet'} but the state dict has "
            f"{layout!r} keys (e.g. {sorted(sd)[:3]})"
        )
    if is_vit:
        if not any(re.search(r"(ls\d?\.gamma|gamma_\d)$", k) for k in sd):
            fields["layerscale_init"] = None  # a ViT without LayerScale
        elif fields.get("layerscale_init", 1) is None:
            fields.pop("layerscale_init")
        if "patch_embed.proj.1.running_mean" in sd:
            fields["stem"] = "hmlp_bn"
        elif "patch_embed.proj.1.weight" in sd:
            fields["stem"] = "hmlp_ln"
        probe = model_config(variant, **fields)
        image_size, has_cls_pos = _infer_vit_image_size(sd, probe)
        fields.update(image_size=image_size, class_token_pos_emb=has_cls_pos)
    has_head = "head.weight" in sd
    ckpt_classes = int(_to_numpy(sd["head.weight"]).shape[0]) if has_head else 0
    if num_classes is None:
        num_classes = ckpt_classes
    elif num_classes != ckpt_classes and not reinit_head:
        raise ValueError(
            f"num_classes={num_classes} disagrees with the checkpoint's head "
            f"({ckpt_classes} classes); to fine-tune on {num_classes} classes pass "
            f"reinit_head=True (from_timm(state_dict, {name!r}, num_classes={num_classes}, "
            f"reinit_head=True)): the checkpoint's head is dropped and a new one initialised "
            f"(kernel normal(0.02), bias 0, seed head_seed), as DeiT fine-tuning does"
        )
    new_image_size = overrides.pop("image_size", None)
    config = model_config(variant, **{**fields, "num_classes": ckpt_classes, **overrides})

    rules = _rules(config, layout, has_head)
    shapes = _per_block_shapes(config)
    expected = {r.key for r in rules}
    missing = [r.key for r in rules if r.key not in sd]
    ignored = {k for k in sd if k.endswith("num_batches_tracked")}
    unexpected = sorted(set(sd) - expected - ignored)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {name!r} ({layout} layout, config {config}): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)})"
        )
    out: dict[str, dict] = {}
    for r in rules:
        coll = "batch_stats" if r.collection == "bs" else "params"
        path = _block_path(r.path)
        herd_shape = _get(shapes[coll], path)
        v = _to_numpy(sd[r.key])
        want = _torch_shape(r, herd_shape, r.key)
        if tuple(v.shape) != tuple(want):
            raise ValueError(
                f"{r.key} has shape {tuple(v.shape)}, but {name!r} with config "
                f"(dim={config.dim}, depth={config.depth}, num_classes={config.num_classes}) "
                f"needs {tuple(want)}"
            )
        _set(out.setdefault(coll, {}), path, np.ascontiguousarray(_to_herd(r, v, herd_shape)))
    if config.scan_blocks:
        out = {k: stack_blocks(v, config.depth) if k == "params" else v for k, v in out.items()}

    if num_classes != ckpt_classes:  # reinit_head: the checkpoint's head is not used
        params = out["params"]
        params.pop("head", None)
        if num_classes > 0:
            key = jax.random.PRNGKey(head_seed)
            dtype = np.asarray(params["norm"]["scale"]).dtype
            kernel = config.init_std * jax.random.normal(key, (config.dim, num_classes))
            params["head"] = {
                "kernel": np.asarray(kernel, dtype),
                "bias": np.zeros((num_classes,), dtype),
            }
        config = config.replace(num_classes=num_classes)
    if new_image_size is not None and new_image_size != config.image_size:
        if not is_vit:
            config = config.replace(image_size=new_image_size)  # no position embedding
        else:
            out["params"] = jax.tree.map(
                np.asarray, interpolate_pos_emb(out["params"], config, new_image_size)
            )
            config = config.replace(image_size=new_image_size)
    return config, out


def from_timm(
    state_dict: Mapping,
    name: str,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    head_seed: int = 0,
    **overrides,
) -> tuple[VisionConfig, dict]:
    """A timm / official DeiT III / official PatchConvNet state dict -> (config, params).

    ``params`` is the 'params' collection (numpy arrays; scanned blocks unless
    ``scan_blocks=False``). ``num_classes`` other than the checkpoint head's raises
    ValueError unless ``reinit_head=True`` (fresh head, seed ``head_seed``; 0 drops it).
    ``overrides`` set config fields the tensors do not fix (drop_path, dtype, scan_blocks,
    remat_policy, ...); ``image_size=`` a new resolution interpolates the position
    embedding (bicubic, as timm's loader does). An hMLP BatchNorm stem's running statistics
    come with :func:`from_timm_variables`.
    """
    config, variables = from_timm_variables(
        state_dict,
        name,
        num_classes=num_classes,
        reinit_head=reinit_head,
        head_seed=head_seed,
        **overrides,
    )
    return config, variables["params"]


def to_timm(
    config: VisionConfig, params, *, layout: str | None = None, batch_stats=None
) -> dict[str, np.ndarray]:
    """herd params -> a state dict of numpy arrays in torch layouts.

    ``layout``: 'timm' (default for a ViT with the patch stem), 'official' (DeiT III release
    names; the default for an hMLP stem, which timm lacks) or
    'patchconvnet' (the only one for a PatchConvNet). ``batch_stats`` (an hMLP BatchNorm
    stem's) adds the running statistics. ``to_timm(c, from_timm(sd, name)[1]) == sd``.
    """
    if layout is None:  # timm has no hMLP stem: such a ViT is written in the official layout
        if isinstance(config, PatchConvNetConfig):
            layout = "patchconvnet"
        else:
            layout = "timm" if config.stem == "patch" else "official"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    params = nn.meta.unbox(params)
    if "params" in params and "cls_token" not in params:
        params = params["params"]
    trees = {"params": jax.tree.map(np.asarray, params)}
    if batch_stats is not None:
        trees["batch_stats"] = jax.tree.map(np.asarray, nn.meta.unbox(batch_stats))
    if "blocks" in trees["params"]:
        trees["params"] = unstack_blocks(trees["params"], config.depth)
    has_head = config.num_classes > 0
    out = {}
    for r in _rules(config, layout, has_head):
        coll = "batch_stats" if r.collection == "bs" else "params"
        if coll not in trees:
            continue  # no running statistics given
        a = np.asarray(_get(trees[coll], _block_path(r.path)))
        out[r.key] = np.ascontiguousarray(_to_torch(r, a, _torch_shape(r, a.shape, r.key)))
    return out
