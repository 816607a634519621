"""Parameter layouts and checkpoint conversion for herd.lm.model.

``stack_layers`` / ``unstack_layers``: scanned (``layers`` with a leading layer axis) <->
unrolled (``layers_0`` ... ``layers_{L-1}``) params. ``config_from_hf`` / ``params_from_hf``
/ ``params_to_hf``: Hugging Face ``LlamaForCausalLM`` configs and state dicts.
``meta_to_hf_qk``: Meta's interleaved-RoPE ``wq`` / ``wk`` -> the HF half-split pairing
(see the herd.lm.model docstring).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def config_from_hf(hf_config, **overrides) -> LlamaConfig:
    """LlamaConfig from a transformers LlamaConfig (or its to_dict())."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 1e4))
    scaling = None
    old_scaling = d.get("rope_scaling") or {}
    src = rope if rope.get("rope_type") == "llama3" else old_scaling
    if src.get("rope_type", src.get("type")) == "llama3":
        scaling = {k: src[k] for k in ROPE_SCALING_KEYS}
    hd = d.get("head_dim")
    if hd is not None and hd != d["hidden_size"] // d["num_attention_heads"]:
        raise ValueError(f"head_dim={hd} != hidden_size / num_attention_heads: not supported")
    kw = dict(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        vocab_size=d["vocab_size"],
        ffn_dim=d["intermediate_size"],
        norm_eps=d["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=d["max_position_embeddings"],
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    return LlamaConfig(**{**kw, **overrides})


def params_from_hf(state_dict, config: LlamaConfig):
    """HF LlamaForCausalLM state dict (name -> array, torch tensors or numpy) -> herd
    params (numpy float32, scanned or unscanned per config.scan_layers)."""

    def get(name):
        x = state_dict[name]
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        return np.asarray(x, np.float32)

    c = config
    d, h, kv, hd = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
    p = {"tok_embeddings": {"embedding": get("model.embed_tokens.weight")}}
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        p[f"layers_{i}"] = {
            "attention": {
                "wq": get(pre + "self_attn.q_proj.weight").T.reshape(d, h, hd),
                "wk": get(pre + "self_attn.k_proj.weight").T.reshape(d, kv, hd),
                "wv": get(pre + "self_attn.v_proj.weight").T.reshape(d, kv, hd),
                "wo": get(pre + "self_attn.o_proj.weight").T.reshape(h, hd, d),
            },
            "feed_forward": {
                "w1": get(pre + "mlp.gate_proj.weight").T,
                "w3": get(pre + "mlp.up_proj.weight").T,
                "w2": get(pre + "mlp.down_proj.weight").T,
            },
            "attention_norm": {"scale": get(pre + "input_layernorm.weight")},
            "ffn_norm": {"scale": get(pre + "post_attention_layernorm.weight")},
        }
    p["norm"] = {"scale": get("model.norm.weight")}
    if not c.tie_embeddings:
        p["output"] = {"kernel": get("lm_head.weight").T}
    if c.scan_layers:
        p = stack_layers(p)
        p["layers"] = jax.tree_util.tree_map(np.asarray, p["layers"])
    return p


def params_to_hf(params, config: LlamaConfig):
    """herd params (scanned or not) -> HF LlamaForCausalLM state dict of numpy arrays."""
    p = nn.meta.unbox(params)
    if "layers" in p:
        p = unstack_layers(p)
    c = config
    d = c.dim
    a = lambda x: np.asarray(x, np.float32)
    sd = {"model.embed_tokens.weight": a(p["tok_embeddings"]["embedding"])}
    for i in range(c.n_layers):
        pre, lp = f"model.layers.{i}.", p[f"layers_{i}"]
        at, ff = lp["attention"], lp["feed_forward"]
        sd[pre + "self_attn.q_proj.weight"] = a(at["wq"]).reshape(d, -1).T
        sd[pre + "self_attn.k_proj.weight"] = a(at["wk"]).reshape(d, -1).T
        sd[pre + "self_attn.v_proj.weight"] = a(at["wv"]).reshape(d, -1).T
        sd[pre + "self_attn.o_proj.weight"] = a(at["wo"]).reshape(-1, d).T
        sd[pre + "mlp.gate_proj.weight"] = a(ff["w1"]).T
        sd[pre + "mlp.up_proj.weight"] = a(ff["w3"]).T
        sd[pre + "mlp.down_proj.weight"] = a(ff["w2"]).T
        sd[pre + "input_layernorm.weight"] = a(lp["attention_norm"]["scale"])
        sd[pre + "post_attention_layernorm.weight"] = a(lp["ffn_norm"]["scale"])
    sd["model.norm.weight"] = a(p["norm"]["scale"])
    if c.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = a(p["output"]["kernel"]).T
    return sd
