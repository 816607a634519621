"""Parameter layouts and checkpoint conversion for herd.lm.model.

Checkpoints:
  ``from_hf(dir) -> (LlamaConfig, params)``   HF directory (config.json + safetensors)
  ``to_hf(config, params, dir)``              the same, loadable by LlamaForCausalLM
  ``from_meta(dir) -> (LlamaConfig, params)`` Meta consolidated.NN.pth + params.json
  ``save_workdir`` / ``load_workdir``         a herd workdir's step-0 checkpoint
  ``python -m herd.lm.convert --from_hf=DIR --to=WORKDIR`` (or ``--from_meta=DIR
  --to=WORKDIR``, ``--from_workdir=WORKDIR --to_hf=DIR``).
Bad input (shapes against the config, a missing or truncated file, RoPE types, biases
or activations herd does not implement) is one ValueError naming the file or value,
raised before any weight is read. Weights are converted one tensor at a time.

Layouts and state dicts: ``stack_layers`` / ``unstack_layers``: scanned (``layers`` with a
leading layer axis) <-> unrolled (``layers_0`` ... ``layers_{L-1}``) params.
``config_from_hf`` / ``params_from_hf`` / ``params_to_hf``: HF configs and state dicts.
``meta_to_hf_qk``: Meta's interleaved-RoPE ``wq`` / ``wk`` -> the HF half-split pairing
(see the herd.lm.model docstring); ``hf_to_meta_qk`` the inverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from herd.lm.config import ROPE_SCALING_KEYS, LlamaConfig


def _layer_keys(params):
    keys = [k for k in params if k.startswith("layers_")]
    return sorted(keys, key=lambda k: int(k.split("_")[1]))


def stack_layers(params):
    """Unscanned params ('layers_0'.. 'layers_{L-1}') -> scanned ('layers', leading axis).

    Works on the params dict or on {'params': ...}; other entries are kept as they are.
    """
    if "params" in params and "tok_embeddings" not in params:
        return {**params, "params": stack_layers(params["params"])}
    keys = _layer_keys(params)
    if not keys:
        raise ValueError("no 'layers_<i>' entries to stack")
    out = {k: v for k, v in params.items() if k not in keys}
    out["layers"] = jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *[nn.meta.unbox(params[k]) for k in keys]
    )
    return out


def unstack_layers(params):
    """Scanned params ('layers' with a leading layer axis) -> 'layers_0'.. 'layers_{L-1}'."""
    if "params" in params and "tok_embeddings" not in params:
        return {**params, "params": unstack_layers(params["params"])}
    if "layers" not in params:
        raise ValueError("no 'layers' entry to unstack")
    stacked = nn.meta.unbox(params["layers"])
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return out


def meta_to_hf_qk(w, n_heads):
    """Permute a Meta wq/wk weight [n_heads*head_dim, dim] (interleaved RoPE pairing) to the
    HF half-split pairing (the permutation of HF's convert_llama_weights_to_hf.py)."""
    w = np.asarray(w)
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_to_meta_qk(w, n_heads):
    """The inverse of :func:`meta_to_hf_qk`: HF half-split pairing -> Meta's interleaved."""
    w = np.asarray(w)
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


# --------------------------------------------------------------------------- HF configs

_ROPE_TYPES = ("default", "llama3")
_HF_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
)


def check_hf_config(d: Mapping, where: str = "HF config") -> None:
    """Raises ValueError naming `where` for an HF config herd's Llama cannot reproduce:
    another model type, an activation other than silu, bias weights, a missing size."""
    mt = d.get("model_type", "llama")
    if mt != "llama":
        raise ValueError(f"{where}: model_type {mt!r}: herd converts only 'llama' models")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r}: herd's Llama uses 'silu' (SwiGLU) only")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise ValueError(f"{where}: {k} is true: herd's Llama has no bias weights")
    missing = [k for k in _HF_REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}")


def _rope_from_hf(d: Mapping, where: str):
    """(rope_theta, llama3 scaling dict or None) from transformers 5's ``rope_parameters``
    or the older ``rope_theta`` + ``rope_scaling``; other RoPE types are refused."""
    theta, scaling = None, None
    for key in ("rope_parameters", "rope_scaling"):
        src = d.get(key)
        if not src:
            continue
        if not isinstance(src, Mapping):
            raise ValueError(f"{where}: {key} {src!r} is not a mapping")
        rtype = src.get("rope_type", src.get("type", "default"))
        if rtype not in _ROPE_TYPES:
            raise ValueError(
                f"{where}: {key} has rope type {rtype!r}, which herd does not implement "
                "(only 'default' and Llama 3.1's 'llama3'): its logits would differ"
            )
        if src.get("rope_theta") is not None:
            theta = src["rope_theta"]
        if rtype == "llama3":
            missing = [k for k in ROPE_SCALING_KEYS if k not in src]
            if missing:
                raise ValueError(f"{where}: {key} of type 'llama3' has no {missing}")
            scaling = {k: src[k] for k in ROPE_SCALING_KEYS}
    if theta is None:
        theta = d.get("rope_theta", 1e4)
    return float(theta), scaling


def config_from_hf(hf_config, *, where: str = "HF config", **overrides) -> LlamaConfig:
    """LlamaConfig from a transformers LlamaConfig (or its to_dict(), or config.json's
    dict). Refuses what herd cannot reproduce (:func:`check_hf_config`, RoPE types other
    than default / 'llama3') with a ValueError naming `where`."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    check_hf_config(d, where)
    theta, scaling = _rope_from_hf(d, where)
    heads = d["num_attention_heads"]
    hd = d.get("head_dim")
    kw = dict(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads") or heads,
        vocab_size=d["vocab_size"],
        ffn_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        head_dim=None if hd is None or hd * heads == d["hidden_size"] else hd,
    )
    try:
        return LlamaConfig(**{**kw, **overrides})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def hf_config_dict(config: LlamaConfig, dtype: str = "float32") -> dict:
    """The config.json of ``transformers.LlamaForCausalLM`` for `config` (`dtype`: the
    stored weights' dtype name). RoPE as ``rope_theta`` + ``rope_scaling``, which
    transformers 4 and 5 both read."""
    c = config
    scaling = None if c.rope_scaling is None else {"rope_type": "llama3", **c.rope_scaling}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "initializer_range": c.init_std,
        "torch_dtype": dtype,
    }


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a LlamaForCausalLM of `config` stores
    (no ``lm_head.weight`` when the embeddings are tied)."""
    c = config
    d, f, v, hd = c.dim, c.hidden_dim, c.vocab_size, c.head_dim
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = (c.n_heads * hd, d)
        out[pre + "self_attn.k_proj.weight"] = (c.n_kv_heads * hd, d)
        out[pre + "self_attn.v_proj.weight"] = (c.n_kv_heads * hd, d)
        out[pre + "self_attn.o_proj.weight"] = (d, c.n_heads * hd)
        out[pre + "mlp.gate_proj.weight"] = (f, d)
        out[pre + "mlp.up_proj.weight"] = (f, d)
        out[pre + "mlp.down_proj.weight"] = (d, f)
        out[pre + "input_layernorm.weight"] = (d,)
        out[pre + "post_attention_layernorm.weight"] = (d,)
    out["model.norm.weight"] = (d,)
    if not c.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def _check_hf_tensors(config: LlamaConfig, shapes: Mapping, where: Mapping, root: str) -> None:
    """Every tensor a model of `config` needs, with its shape, and nothing else (a bias,
    an unknown tensor): else ValueError naming the file and tensor."""
    bias = sorted(n for n in shapes if n.endswith(".bias"))
    if bias:
        raise ValueError(
            f"{where[bias[0]]}: holds bias weights ({bias[0]}"
            + (f" and {len(bias) - 1} more" if len(bias) > 1 else "")
            + "), which herd's Llama does not have"
        )
    expected = hf_shapes(config)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(
            f"{root}: no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_embeddings else set())
    extra = sorted(n for n in shapes if n not in allowed and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(
            f"{where[extra[0]]}: tensor {extra[0]} is not part of a Llama model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for n, shape in expected.items():
        if tuple(shapes[n]) != shape:
            raise ValueError(
                f"{where[n]}: {n} has shape {tuple(shapes[n])}, but the config says {shape}"
            )
    if config.tie_embeddings and "lm_head.weight" in shapes:
        if tuple(shapes["lm_head.weight"]) != (config.vocab_size, config.dim):
            raise ValueError(
                f"{where['lm_head.weight']}: lm_head.weight has shape "
                f"{tuple(shapes['lm_head.weight'])}"
            )


# --------------------------------------------------------------------------- HF <-> herd


# (herd path inside a layer, HF name inside model.layers.<i>., HF -> herd, herd -> HF)
def _layer_map(c: LlamaConfig):
    d, h, kv, hd = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
    return (
        (
            ("attention", "wq"),
            "self_attn.q_proj.weight",
            lambda w: w.T.reshape(d, h, hd),
            lambda x: x.reshape(d, h * hd).T,
        ),
        (
            ("attention", "wk"),
            "self_attn.k_proj.weight",
            lambda w: w.T.reshape(d, kv, hd),
            lambda x: x.reshape(d, kv * hd).T,
        ),
        (
            ("attention", "wv"),
            "self_attn.v_proj.weight",
            lambda w: w.T.reshape(d, kv, hd),
            lambda x: x.reshape(d, kv * hd).T,
        ),
        (
            ("attention", "wo"),
            "self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, hd, d),
            lambda x: x.reshape(h * hd, d).T,
        ),
        (("feed_forward", "w1"), "mlp.gate_proj.weight", lambda w: w.T, lambda x: x.T),
        (("feed_forward", "w3"), "mlp.up_proj.weight", lambda w: w.T, lambda x: x.T),
        (("feed_forward", "w2"), "mlp.down_proj.weight", lambda w: w.T, lambda x: x.T),
        (("attention_norm", "scale"), "input_layernorm.weight", lambda w: w, lambda x: x),
        (("ffn_norm", "scale"), "post_attention_layernorm.weight", lambda w: w, lambda x: x),
    )


def _np_dtype(name) -> np.dtype:
    return np.dtype(jnp.dtype(name))


def _herd_params(config: LlamaConfig, get: Callable[[str], np.ndarray], dtype=None):
    """herd params (numpy, `dtype`, default config.param_dtype) from ``get(hf_name)``,
    one tensor at a time: the scanned layout is filled into preallocated [L, ...] arrays,
    so only the result and one source tensor are ever held."""
    c = config
    dt = _np_dtype(dtype or c.param_dtype)
    conv = lambda x: np.ascontiguousarray(x, dtype=dt)
    p = {"tok_embeddings": {"embedding": conv(get("model.embed_tokens.weight"))}}
    layers = {} if c.scan_layers else None
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        one = {}
        for (mod, leaf), name, to_herd, _ in _layer_map(c):
            x = to_herd(np.asarray(get(pre + name)))
            if c.scan_layers:
                if i == 0:
                    layers.setdefault(mod, {})[leaf] = np.empty((c.n_layers,) + x.shape, dt)
                layers[mod][leaf][i] = x
            else:
                one.setdefault(mod, {})[leaf] = conv(x)
            del x
        if not c.scan_layers:
            p[f"layers_{i}"] = one
    if c.scan_layers:
        p["layers"] = layers
    p["norm"] = {"scale": conv(get("model.norm.weight"))}
    if not c.tie_embeddings:
        p["output"] = {"kernel": conv(np.asarray(get("lm_head.weight")).T)}
    return p


def params_from_hf(state_dict, config: LlamaConfig):
    """HF LlamaForCausalLM state dict (name -> array, torch tensors or numpy) -> herd
    params (numpy float32, scanned or unscanned per config.scan_layers)."""

    def get(name):
        x = state_dict[name]
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        return np.asarray(x, np.float32)

    return _herd_params(config, get, np.float32)


def _herd_tree(params):
    p = nn.meta.unbox(params)
    if "params" in p and "tok_embeddings" not in p:
        p = p["params"]
    return p


def _check_herd_params(params, config: LlamaConfig) -> bool:
    """Whether `params` are scanned; ValueError naming the param unless they are exactly
    the params (shapes) of Llama(config) in one of the two layouts."""
    from herd.lm.model import Llama

    p = _herd_tree(params)
    scanned = "layers" in p
    c = config.replace(scan_layers=scanned)
    want = jax.eval_shape(
        lambda: Llama(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    want = {
        jax.tree_util.keystr(k): tuple(x.shape)
        for k, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(want)["params"])
    }
    have = {
        jax.tree_util.keystr(k): tuple(np.shape(x))
        for k, x in jax.tree_util.tree_leaves_with_path(p)
    }
    for k in want:
        if k not in have:
            raise ValueError(f"params have no {k}: not the params of this config")
        if have[k] != want[k]:
            raise ValueError(f"param {k} has shape {have[k]}, but the config says {want[k]}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"params hold {extra[0]}, which a model of this config does not have")
    return scanned


def _hf_plan(params, config: LlamaConfig):
    """[(HF name, thunk -> numpy array in the HF layout)] for herd params of either
    layout; each thunk reads one tensor (one layer's slice of a scanned param)."""
    c = config
    p = _herd_tree(params)
    scanned = "layers" in p

    def leaf(i, mod, name):
        if scanned:
            return np.asarray(p["layers"][mod][name][i])
        return np.asarray(p[f"layers_{i}"][mod][name])

    plan = [("model.embed_tokens.weight", lambda: np.asarray(p["tok_embeddings"]["embedding"]))]
    for i in range(c.n_layers):
        for (mod, name), hf, _, to_hf in _layer_map(c):
            plan.append(
                (f"model.layers.{i}.{hf}", lambda i=i, m=mod, n=name, f=to_hf: f(leaf(i, m, n)))
            )
    plan.append(("model.norm.weight", lambda: np.asarray(p["norm"]["scale"])))
    if c.tie_embeddings:
        plan.append(("lm_head.weight", plan[0][1]))
    else:
        plan.append(("lm_head.weight", lambda: np.asarray(p["output"]["kernel"]).T))
    return plan


def params_to_hf(params, config: LlamaConfig):
    """herd params (scanned or not) -> HF LlamaForCausalLM state dict of numpy float32
    arrays (``lm_head.weight`` included also when tied, as a state dict has it)."""
    return {n: np.ascontiguousarray(f(), np.float32) for n, f in _hf_plan(params, config)}


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}


def _st_name(dtype) -> str:
    dtype = np.dtype(dtype)
    for k, v in _ST_DTYPES.items():
        if np.dtype(jnp.dtype(v)) == dtype:
            return k
    raise ValueError(f"cannot write {dtype} tensors: float32, float16 or bfloat16 only")


def _parse_size(size) -> int:
    if isinstance(size, (int, np.integer)):
        return int(size)
    s = str(size).strip().upper()
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "B": 1,
    }
    for u, m in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"max_shard_size {size!r}: give bytes or e.g. '5GB', '200MiB'") from None


def _write_safetensors(path: str, entries) -> None:
    """Writes [(name, shape, dtype, thunk)] as one safetensors file, one tensor in memory
    at a time (the header is known from the shapes); renamed into place when complete."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in entries:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _st_name(dtype),
            "shape": list(shape),
            "data_offsets": [off, off + n],
        }
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dtype, thunk in entries:
            x = np.ascontiguousarray(thunk(), dtype=dtype)
            if x.shape != tuple(shape):
                raise ValueError(f"{name}: shape {x.shape}, expected {tuple(shape)}")
            f.write(memoryview(x.reshape(-1).view(np.uint8)))
            del x
    os.replace(partial, path)


class _SafetensorsSource:
    """The tensors of an HF directory's safetensors files (one, or sharded with an
    index), opened lazily with ``safetensors.safe_open``: names, shapes, files."""

    def __init__(self, root: str):
        from safetensors import safe_open

        self.root = root
        index = os.path.join(root, "model.safetensors.index.json")
        single = os.path.join(root, "model.safetensors")
        listed = None
        if os.path.exists(index):
            try:
                with open(index) as f:
                    listed = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(listed.values()))
            for fn in files:
                if not os.path.exists(os.path.join(root, fn)):
                    raise ValueError(f"{index} lists {fn}, which is not in {root}")
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            other = sorted(f for f in os.listdir(root) if f.endswith((".bin", ".pth", ".pt")))
            raise ValueError(
                f"{root}: no model.safetensors or model.safetensors.index.json"
                + (f" (found {other[0]}: only safetensors weights are read)" if other else "")
            )
        self._stack = contextlib.ExitStack()
        self._handles, self.where, self.shapes = {}, {}, {}
        try:
            for fn in files:
                fp = os.path.join(root, fn)
                try:
                    h = self._stack.enter_context(safe_open(fp, framework="numpy"))
                except Exception as e:  # safetensors raises its own error types
                    raise ValueError(f"{fp} cannot be read (truncated or corrupt?): {e}") from None
                self._handles[fp] = h
                for name in h.keys():
                    sl = h.get_slice(name)
                    if sl.get_dtype() not in _ST_DTYPES:
                        raise ValueError(
                            f"{fp}: {name} is {sl.get_dtype()}; float32, float16 or bfloat16 "
                            "tensors only (quantized checkpoints are not read)"
                        )
                    if name in self.where:
                        raise ValueError(f"{fp}: {name} is also in {self.where[name]}")
                    self.where[name] = fp
                    self.shapes[name] = tuple(sl.get_shape())
            if listed is not None:
                for name, fn in listed.items():
                    if self.where.get(name) != os.path.join(root, fn):
                        raise ValueError(f"{index} lists {name} in {fn}, which does not hold it")
        except BaseException:
            self.close()
            raise

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.where[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a JSON object")
    return d


def from_hf(path, *, scan_layers: bool | None = None, param_dtype: str = "float32", **overrides):
    """(LlamaConfig, herd params as numpy arrays) from a Hugging Face Llama directory:
    config.json plus model.safetensors, or shards listed in model.safetensors.index.json
    (float32 / float16 / bfloat16 tensors). The config and every tensor's name and shape
    are checked before any weight is read; weights are read one tensor at a time.

    ``scan_layers``: the params' layout (default LlamaConfig's, scanned); ``param_dtype``:
    the params' dtype; ``overrides``: other LlamaConfig fields (e.g. ``max_seq_len``).
    HF checkpoints already use herd's half-split RoPE pairing: no permutation.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    cfg_path = os.path.join(root, "config.json")
    d = _read_json(cfg_path)
    if scan_layers is not None:
        overrides["scan_layers"] = bool(scan_layers)
    c = config_from_hf(d, where=cfg_path, param_dtype=param_dtype, **overrides)
    src = _SafetensorsSource(root)
    try:
        _check_hf_tensors(c, src.shapes, src.where, root)
        return c, _herd_params(c, src.get)
    finally:
        src.close()


def to_hf(
    config: LlamaConfig, params, path, *, dtype: str | None = None, max_shard_size="5GB"
) -> list[str]:
    """Writes `params` (scanned or unscanned, found out from the tree) as a Hugging Face
    ``LlamaForCausalLM`` directory: config.json and model.safetensors, or above
    `max_shard_size` (bytes or '5GB'-style) model-0000k-of-0000N.safetensors shards with
    model.safetensors.index.json. ``dtype``: the stored dtype (default the params'). One
    tensor is converted at a time. Returns the written weight files."""
    root = os.fspath(path)
    _check_herd_params(params, config)
    plan = _hf_plan(params, config)
    if config.tie_embeddings:
        plan = [e for e in plan if e[0] != "lm_head.weight"]
    emb = _herd_tree(params)["tok_embeddings"]["embedding"]
    dt = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(emb.dtype)
    dtype_name = jnp.dtype(dt).name
    _st_name(dt)
    limit = _parse_size(max_shard_size)
    if os.path.isdir(root):
        old = sorted(
            f
            for f in os.listdir(root)
            if f.startswith("model") and f.endswith((".safetensors", ".index.json"))
        )
        if old:
            raise ValueError(f"{root} already holds {old[0]}: write into a new directory")
    os.makedirs(root, exist_ok=True)
    shapes = hf_shapes(config)
    groups, size = [[]], 0
    for name, thunk in plan:
        n = math.prod(shapes[name]) * dt.itemsize
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shapes[name], dt, thunk))
        size += n
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, dtype_name), f, indent=2)
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for fn, group in zip(names, groups, strict=True):
        _write_safetensors(os.path.join(root, fn), group)
    if len(groups) > 1:
        index = {
            "metadata": {
                "total_size": sum(
                    math.prod(s) * dt.itemsize
                    for _, s in shapes.items()
                    if not (config.tie_embeddings and _ == "lm_head.weight")
                )
            },
            "weight_map": {e[0]: fn for fn, g in zip(names, groups, strict=True) for e in g},
        }
        with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(root, fn) for fn in names]


# --------------------------------------------------------------------------- Meta

# HF name in a layer -> (Meta name in a layer, model-parallel concat axis or None)
_META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def _meta_name(hf: str) -> tuple[str, int | None]:
    if hf == "model.embed_tokens.weight":
        return "tok_embeddings.weight", -1  # axis found from the shapes
    if hf == "model.norm.weight":
        return "norm.weight", None
    if hf == "lm_head.weight":
        return "output.weight", 0
    _, _, i, rest = hf.split(".", 3)
    name, axis = _META_LAYER[rest]
    return f"layers.{i}.{name}", axis


def from_meta(
    path,
    *,
    scan_layers: bool | None = None,
    param_dtype: str = "float32",
    max_seq_len: int | None = None,
    rope_scaling_factor: float | None = None,
    **overrides,
):
    """(LlamaConfig, herd params) from a Meta consolidated checkpoint: params.json and
    consolidated.00.pth ... (model-parallel shards, merged per tensor: wq/wk/wv/w1/w3 and
    output along dim 0, wo/w2 along dim 1, tok_embeddings along dim 1 in LLaMA 1/2 and
    dim 0 in Llama 3 (told apart by the shapes), norms replicated). ``wq`` / ``wk`` are
    permuted from Meta's interleaved RoPE pairing to herd's (:func:`meta_to_hf_qk`).

    ``use_scaled_rope`` (Llama 3.1/3.2) takes params.json's ``rope_scaling_factor`` if
    it has one, else the argument, else 8 (Llama 3.1; Llama 3.2 1B/3B use 32: pass it).
    ``max_seq_len`` default: 131072 with scaled RoPE, else 8192 (theta 5e5), 16384 (theta
    1e6, Code Llama), 4096. Needs torch (the .pth files); shapes are checked on the
    memory-mapped shards before any tensor is read.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    pj_path = os.path.join(root, "params.json")
    pj = _read_json(pj_path)
    files = sorted(f for f in os.listdir(root) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if not files:
        raise ValueError(f"{root}: no consolidated.NN.pth files")
    for k, fn in enumerate(files):
        if int(fn.split(".")[1]) != k:
            raise ValueError(f"{root}: model-parallel shard consolidated.{k:02d}.pth is missing")
    try:
        import torch
    except ImportError:
        raise ImportError(
            "from_meta reads Meta's .pth files with torch, which is not installed "
            "(pip install torch)"
        ) from None
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in pj]
    if missing:
        raise ValueError(f"{pj_path}: no {', '.join(missing)}")
    sds = []
    for fn in files:
        fp = os.path.join(root, fn)
        try:
            sds.append(torch.load(fp, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises many kinds for a bad file
            raise ValueError(f"{fp} cannot be read (truncated or corrupt?): {e}") from None
    n = len(sds)
    paths = [os.path.join(root, fn) for fn in files]
    keys0 = set(sds[0])
    for fp, sd in zip(paths[1:], sds[1:], strict=True):
        if set(sd) != keys0:
            diff = sorted(keys0 ^ set(sd))
            raise ValueError(f"{fp}: its tensors differ from {paths[0]}'s ({diff[0]} ...)")
    bias = sorted(k for k in keys0 if k.endswith(".bias"))
    if bias:
        raise ValueError(f"{paths[0]}: holds bias weights ({bias[0]}), which herd's Llama has not")
    dim = pj["dim"]
    emb_shard = (
        tuple(sds[0]["tok_embeddings.weight"].shape) if "tok_embeddings.weight" in keys0 else None
    )
    if emb_shard is None:
        raise ValueError(f"{paths[0]}: no tok_embeddings.weight")
    emb_axis = 0 if n == 1 or emb_shard[1] == dim else 1

    def merged_shape(meta, axis):
        s = [tuple(sd[meta].shape) for sd in sds]
        if axis is None or n == 1:
            for fp, si in zip(paths, s, strict=True):
                if si != s[0]:
                    raise ValueError(f"{fp}: replicated {meta} has shape {si}, not {s[0]}")
            return s[0]
        out = list(s[0])
        out[axis] = sum(si[axis] for si in s)
        return tuple(out)

    vocab = pj.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # LLaMA 1's params.json: vocab_size -1
        vocab = merged_shape("tok_embeddings.weight", emb_axis)[0]
    tied = "output.weight" not in keys0
    ffn_key = "layers.0.feed_forward.w1.weight"
    if ffn_key not in keys0:
        raise ValueError(f"{paths[0]}: no {ffn_key}")
    ffn = merged_shape(ffn_key, 0)[0]
    theta = float(pj.get("rope_theta", 1e4))
    scaling = None
    if pj.get("use_scaled_rope"):
        factor = pj.get("rope_scaling_factor") or rope_scaling_factor or 8.0
        scaling = {
            "factor": float(factor),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    if max_seq_len is None:
        max_seq_len = 131072 if scaling else {5e5: 8192, 1e6: 16384}.get(theta, 4096)
    if scan_layers is not None:
        overrides["scan_layers"] = bool(scan_layers)
    kw = dict(
        dim=dim,
        n_layers=pj["n_layers"],
        n_heads=pj["n_heads"],
        n_kv_heads=pj.get("n_kv_heads") or pj["n_heads"],
        vocab_size=vocab,
        multiple_of=pj.get("multiple_of", 256),
        ffn_dim_multiplier=pj.get("ffn_dim_multiplier"),
        norm_eps=pj.get("norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_seq_len,
        tie_embeddings=tied,
        param_dtype=param_dtype,
    )
    try:
        c = LlamaConfig(**{**kw, **overrides})
    except ValueError as e:
        raise ValueError(f"{pj_path}: {e}") from None
    if c.hidden_dim != ffn:
        raise ValueError(
            f"{paths[0]}: {ffn_key} gives an FFN width of {ffn}, but params.json's multiple_of="
            f"{c.multiple_of}, ffn_dim_multiplier={c.ffn_dim_multiplier} give {c.hidden_dim}"
        )
    names = {}
    for hf in hf_shapes(c):
        names[hf] = _meta_name(hf)
    known = {m for m, _ in names.values()} | {"rope.freqs"}
    extra = sorted(keys0 - known)
    if extra:
        raise ValueError(f"{paths[0]}: tensor {extra[0]} is not part of a Llama model of {pj_path}")
    shapes, where = {}, {}
    for hf, (meta, axis) in names.items():
        if meta not in keys0:
            raise ValueError(f"{paths[0]}: no tensor {meta}")
        shapes[hf] = merged_shape(meta, emb_axis if axis == -1 else axis)
        where[hf] = (", ".join(paths) if axis is not None else paths[0]) + f" ({meta})"
    _check_hf_tensors(c, shapes, where, root)

    def get(hf):
        meta, axis = names[hf]
        axis = emb_axis if axis == -1 else axis
        if axis is None or n == 1:
            t = sds[0][meta]
        else:
            t = torch.cat([sd[meta] for sd in sds], dim=axis)
        w = t.to(torch.float32).numpy()
        if meta.endswith("attention.wq.weight"):
            w = meta_to_hf_qk(w, c.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = meta_to_hf_qk(w, c.n_kv_heads)
        return w

    return c, _herd_params(c, get)


# --------------------------------------------------------------------------- workdirs


def model_config_dict(config: LlamaConfig) -> dict:
    """`config` as a run config's 'model' section (what build_model_config reads)."""
    d = dataclasses.asdict(config)
    if config.head_dim * config.n_heads == config.dim:
        d["head_dim"] = None
    return {k: v for k, v in d.items() if v is not None}


def save_workdir(
    config: LlamaConfig, params, workdir, *, tokenizer: str | None = None, source: str = ""
) -> str:
    """Writes `params` as step 0 of a herd workdir (``workdir/checkpoints``, a TrainState
    with an empty optimiser state, the run config {'model': ..., 'convert': ...}) that
    herd's curation (herd.curation.embed.load_params / run_model_config) and
    :func:`load_workdir` read; copies `tokenizer` into ``workdir/tokenizer/``."""
    from herd.core.checkpoint import Checkpointer
    from herd.core.loop import TrainState

    workdir = os.fspath(workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckdir) and any(f.isdigit() for f in os.listdir(ckdir)):
        raise ValueError(f"{ckdir} already holds checkpoints: convert into a new workdir")
    _check_herd_params(params, config)
    run_config = {"model": model_config_dict(config), "convert": {"source": source}}
    state = TrainState(
        step=np.zeros((), np.int32),
        params=_herd_tree(params),
        opt_state={},
        rng=np.asarray(jax.random.key_data(jax.random.key(0))),
    )
    ckpt = Checkpointer(ckdir, keep=1, async_save=False, config=run_config)
    try:
        ckpt.save(0, state)
    finally:
        ckpt.close()
    if tokenizer:
        from herd.lm.tokenizer import save_to_workdir

        save_to_workdir(tokenizer, workdir)
    return ckdir


def load_workdir(workdir, step: int | None = None):
    """(LlamaConfig, params on the host's CPU) of a herd LM workdir's checkpoint `step`
    (default: the latest), read with the params alone (no optimiser state)."""
    from herd.core.checkpoint import read_config, restore_params
    from herd.lm.model import Llama
    from herd.lm.presets import build_model_config

    workdir = os.fspath(workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        ckdir = workdir
    try:
        stored = read_config(ckdir, step)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if "model" not in stored:
        raise ValueError(f"the config of {ckdir} has no 'model' section")
    c = build_model_config(stored["model"])
    shapes = jax.eval_shape(
        lambda: Llama(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
        nn.meta.unbox(shapes)["params"],
    )
    return c, restore_params(ckdir, abstract, step)


def _find_tokenizer(root: str) -> str | None:
    """The source's tokenizer file (tokenizer.model, tokenizer.json or
    original/tokenizer.model, as herd.lm.tokenizer.find_hf_tokenizer picks), or None."""
    from herd.lm.tokenizer import find_hf_tokenizer

    try:
        return find_hf_tokenizer(root)
    except ValueError:
        return None


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    """``python -m herd.lm.convert --from_hf=DIR --to=WORKDIR`` |
    ``--from_meta=DIR --to=WORKDIR`` | ``--from_workdir=WORKDIR --to_hf=DIR``."""
    from absl import flags

    from herd.core.config import print_user_error

    fv = flags.FlagValues()
    flags.DEFINE_string("from_hf", None, "Hugging Face Llama directory to read.", flag_values=fv)
    flags.DEFINE_string(
        "from_meta", None, "Meta consolidated checkpoint directory.", flag_values=fv
    )
    flags.DEFINE_string("from_workdir", None, "herd LM workdir to read.", flag_values=fv)
    flags.DEFINE_string(
        "to", None, "herd workdir to write (from --from_hf/--from_meta).", flag_values=fv
    )
    flags.DEFINE_string(
        "to_hf", None, "HF directory to write (from --from_workdir).", flag_values=fv
    )
    flags.DEFINE_integer(
        "step", None, "Checkpoint step of --from_workdir (default latest).", flag_values=fv
    )
    flags.DEFINE_string(
        "param_dtype", "float32", "dtype of the herd params written.", flag_values=fv
    )
    flags.DEFINE_bool(
        "scan_layers", True, "Scanned layer layout in the herd workdir.", flag_values=fv
    )
    flags.DEFINE_string(
        "dtype", None, "dtype of the HF weights (default the params').", flag_values=fv
    )
    flags.DEFINE_string("max_shard_size", "5GB", "HF safetensors shard size.", flag_values=fv)
    flags.DEFINE_float(
        "rope_scaling_factor",
        None,
        "Meta use_scaled_rope factor (8 Llama 3.1, 32 Llama 3.2).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "tokenizer",
        None,
        "Tokenizer file to keep in the workdir (default: the source's tokenizer.model or "
        "tokenizer.json).",
        flag_values=fv,
    )
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error.", flag_values=fv)
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else "convert"
    try:
        rest = fv(argv if argv else [prog])
    except flags.Error as e:
        print_user_error(e)
        return 2
    try:
        if len(rest) > 1:
            raise ValueError(f"unexpected arguments {rest[1:]}")
        sources = [k for k in ("from_hf", "from_meta", "from_workdir") if fv[k].value]
        if len(sources) != 1:
            raise ValueError("give exactly one of --from_hf, --from_meta, --from_workdir")
        if sources[0] == "from_workdir":
            if not fv.to_hf or fv.to:
                raise ValueError("--from_workdir needs --to_hf=DIR (and no --to)")
            c, params = load_workdir(fv.from_workdir, fv.step)
            files = to_hf(c, params, fv.to_hf, dtype=fv.dtype, max_shard_size=fv.max_shard_size)
            tok = None
            try:
                from herd.lm.tokenizer import workdir_tokenizer_path

                tok = workdir_tokenizer_path(fv.from_workdir)
            except (FileNotFoundError, ImportError):
                pass
            if tok:
                shutil.copyfile(tok, os.path.join(fv.to_hf, os.path.basename(tok)))
            print(f"wrote {fv.to_hf} ({len(files)} weight file(s))")
            return 0
        if not fv.to or fv.to_hf:
            raise ValueError(f"--{sources[0]} needs --to=WORKDIR (and no --to_hf)")
        src = fv[sources[0]].value
        if sources[0] == "from_hf":
            c, params = from_hf(src, scan_layers=fv.scan_layers, param_dtype=fv.param_dtype)
        else:
            c, params = from_meta(
                src,
                scan_layers=fv.scan_layers,
                param_dtype=fv.param_dtype,
                rope_scaling_factor=fv.rope_scaling_factor,
            )
        tok = fv.tokenizer or _find_tokenizer(src)
        if fv.tokenizer and not os.path.isfile(fv.tokenizer):
            raise ValueError(f"--tokenizer {fv.tokenizer} does not exist")
        ckdir = save_workdir(c, params, fv.to, tokenizer=tok, source=os.path.abspath(src))
        print(f"wrote {ckdir}/0" + (f" and the tokenizer {tok}" if tok else " (no tokenizer)"))
        return 0
    except (ValueError, OSError, ImportError) as e:
        if fv.verbose:
            raise
        print_user_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
