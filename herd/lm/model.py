"""The Llama herd as one Flax Linen model: LLaMA 1, Llama 2, Code Llama, Llama 3/3.1/3.2.

Pre-norm decoder: RMSNorm (float32) -> attention with RoPE and grouped-query heads ->
residual -> RMSNorm -> SwiGLU -> residual; final RMSNorm; output head (or the tied
embedding). Layers are stacked with ``nn.scan`` under a named remat policy.

Parameter tree (HF-like names, so conversion is obvious)::

    tok_embeddings/embedding     [vocab, dim]          (vocab, embed)
    layers/attention/wq          [L, dim, heads, hd]   (layers, embed, heads, head_dim)
    layers/attention/wk, wv      [L, dim, kv, hd]      (layers, embed, kv_heads, head_dim)
    layers/attention/wo          [L, heads, hd, dim]   (layers, heads, head_dim, embed)
    layers/feed_forward/w1, w3   [L, dim, ffn]         (layers, embed, mlp)
    layers/feed_forward/w2       [L, ffn, dim]         (layers, mlp, embed)
    layers/attention_norm/scale  [L, dim]              (layers, norm)
    layers/ffn_norm/scale        [L, dim]              (layers, norm)
    norm/scale                   [dim]                 (norm,)
    output/kernel                [dim, vocab]          (embed, vocab)   untied only

With ``scan_layers=False`` the layers are ``layers_0`` ... ``layers_{L-1}`` without the
leading axis; ``herd.lm.convert.stack_layers`` / ``unstack_layers`` convert between the two.

RoPE uses the half-split pairing of Hugging Face checkpoints (dimension ``i`` rotates
with ``i + head_dim/2``). Meta's original checkpoints (``consolidated.*.pth``) use the
interleaved pairing (``2i`` with ``2i+1``): their ``wq`` / ``wk`` must be permuted with
``herd.lm.convert.meta_to_hf_qk`` (the same permutation as HF's
``convert_llama_weights_to_hf.py``) before ``params_from_hf``-style loading; ``wv``/``wo``
need no change.

Elsewhere: the model's config in ``herd.lm.config`` (``LlamaConfig``), the published
sizes in ``herd.lm.presets`` (``LlamaConfig.preset(name)`` looks them up), the chunked
cross-entropy in ``herd.lm.loss``, weight layouts and HF conversion in ``herd.lm.convert``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from herd.lm.attention import attention, check_attention_config, decode_attention
from herd.lm.config import REMAT_POLICIES, LlamaConfig

# Projections flatten [B, T, ...] to [B*T, ...] rows: plain 2-D matmuls. On XLA:CPU the 3-D
# einsum forms made the backward pass write transposed copies of its operands (measured
# on the 30M bench shape, SwiGLU block fwd+bwd: 3-D fused gate/up 794 ms of CPU time,
# 2-D separate gate/up 659 ms, 2-D fused 673 ms); on accelerators the reshape is free.
# Gate and up stay two matmuls: as fast as one fused [dim, 2 * ffn] matmul once 2-D, and a
# concatenation across the tensor-sharded 'mlp' axis would reshard on accelerators.
# Likewise q, k and v are three matmuls (a concatenated q/k/v matmul measured +2%).

# Names given with checkpoint_name() inside a layer; the remat policies refer to them.
_QKV_NAMES = ("query_proj", "key_proj", "value_proj")
# The residuals of the chunked attention's own backward (herd.lm.attention._flash_fwd).
_FLASH_NAMES = ("attention_out", "attention_lse")
_ATTN_NAMES = _QKV_NAMES + ("context",) + _FLASH_NAMES


def _remat_policy(name: str):
    """The jax.checkpoint policy for a named remat policy (None = save everything)."""
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":  # save only the layer input; recompute the whole layer
        return cp.nothing_saveable
    if name == "save_dots":  # save every projection matmul output; recompute the rest
        # ... but keep the chunked attention's output and log-sum-exp, which are O(T)
        # and would otherwise cost a second attention forward in the backward pass.
        return cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(*_FLASH_NAMES)
        )
    if name == "save_qkv":  # save q, k, v after RoPE
        return cp.save_only_these_names(*_QKV_NAMES)
    if name == "save_attn":  # q, k, v and the attention output: recompute only the MLP
        return cp.save_only_these_names(*_ATTN_NAMES)
    raise ValueError(f"unknown remat_policy {name!r}; valid: {', '.join(REMAT_POLICIES)}")


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, float] | None = None):
    """Inverse frequencies [head_dim/2] (float32), with Llama 3.1 scaling when given.

    Llama 3.1: wavelengths above original/low_freq_factor are divided by ``factor``,
    those below original/high_freq_factor are kept, the band between is interpolated.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions, head_dim, theta, scaling=None):
    """cos, sin [B, T, head_dim/2] float32 for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Half-split RoPE on x [B, T, H, D] with cos/sin [B, T, D/2]; float32 math, x.dtype out."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def _param(mod: nn.Module, name, shape, axes, init, dtype):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _project(x, w, n_in: int):
    """Contract the last ``n_in`` axes of x [B, T, *in] with the first ``n_in`` axes of
    w [*in, *out] -> [B, T, *out], as one 2-D [B*T, prod(in)] x [prod(in), prod(out)]
    matmul (see the note at the top of this module)."""
    b, t = x.shape[:2]
    k = math.prod(w.shape[:n_in])
    out = w.shape[n_in:]
    y = x.reshape(b * t, k) @ w.reshape(k, math.prod(out))
    return y.reshape(b, t, *out)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = _param(
            self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones, self.param_dtype
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache_k=None, cache_v=None, cache_info=None):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.init_std)
        d, h, kv, hd = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        wq = _param(self, "wq", (d, h, hd), ("embed", "heads", "head_dim"), init, pdt)
        wk = _param(self, "wk", (d, kv, hd), ("embed", "kv_heads", "head_dim"), init, pdt)
        wv = _param(self, "wv", (d, kv, hd), ("embed", "kv_heads", "head_dim"), init, pdt)
        wo = _param(self, "wo", (h, hd, d), ("heads", "head_dim", "embed"), init, pdt)

        q = _project(x, wq.astype(dt), 1)
        k = _project(x, wk.astype(dt), 1)
        v = _project(x, wv.astype(dt), 1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = _constrain(checkpoint_name(q, "query_proj"), ("batch", "length", "heads", "head_dim"))
        k = _constrain(checkpoint_name(k, "key_proj"), ("batch", "length", "kv_heads", "head_dim"))
        v = _constrain(
            checkpoint_name(v, "value_proj"), ("batch", "length", "kv_heads", "head_dim")
        )
        if cache_k is not None:  # KV-cache prefill / decode (see Llama): the 'xla' path
            return self._cached(q, k, v, wo, cache_k, cache_v, cache_info)
        kwargs = {} if c.attention_q_chunk is None else {"q_chunk": c.attention_q_chunk}
        out = attention(
            q, k, v, segment_ids=segment_ids, impl=c.attention_impl, causal=True, **kwargs
        )
        out = _constrain(checkpoint_name(out, "context"), ("batch", "length", "heads", "head_dim"))
        return checkpoint_name(_project(out, wo.astype(dt), 2), "out_proj")

    def _cached(self, q, k, v, wo, cache_k, cache_v, cache_info):
        """Write k/v [B, T, KV, D] into this layer's cache [B, S, KV, D] at slot
        ``index`` and attend over the whole cache; returns (output, (cache_k, cache_v))."""
        q_positions, k_positions, index = cache_info
        axes = ("batch", "length", "kv_heads", "head_dim")
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, 1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, 1)
        cache_k, cache_v = _constrain(cache_k, axes), _constrain(cache_v, axes)
        out = decode_attention(
            q, cache_k, cache_v, q_positions=q_positions, k_positions=k_positions
        )
        out = _constrain(out, ("batch", "length", "heads", "head_dim"))
        return _project(out, wo.astype(self.config.compute_dtype), 2), (cache_k, cache_v)


class FeedForward(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.init_std)
        d, f = c.dim, c.hidden_dim
        w1 = _param(self, "w1", (d, f), ("embed", "mlp"), init, pdt)
        w3 = _param(self, "w3", (d, f), ("embed", "mlp"), init, pdt)
        w2 = _param(self, "w2", (f, d), ("mlp", "embed"), init, pdt)
        gate = checkpoint_name(_project(x, w1.astype(dt), 1), "mlp_gate")
        up = checkpoint_name(_project(x, w3.astype(dt), 1), "mlp_up")
        hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return checkpoint_name(_project(hidden, w2.astype(dt), 1), "mlp_out")


class Block(nn.Module):
    """One decoder layer; returns (x, None) so it can be the body of nn.scan."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache_k=None, cache_v=None, cache_info=None):
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, c.params_dtype, name=name)
        if cache_k is not None:  # KV-cache decode: also returns this layer's updated cache
            h, kv = Attention(c, name="attention")(
                norm("attention_norm")(x), cos, sin, None, cache_k, cache_v, cache_info
            )
            x = x + h
            x = x + FeedForward(c, name="feed_forward")(norm("ffn_norm")(x))
            return _constrain(x, ("batch", "length", "embed")), kv
        x = x + Attention(c, name="attention")(norm("attention_norm")(x), cos, sin, segment_ids)
        x = x + FeedForward(c, name="feed_forward")(norm("ffn_norm")(x))
        return _constrain(x, ("batch", "length", "embed")), None


class _Embedding(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        return _param(
            self, "embedding", (c.vocab_size, c.dim), ("vocab", "embed"), init, c.params_dtype
        )


class _Head(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        return _param(
            self, "kernel", (c.dim, c.vocab_size), ("embed", "vocab"), init, c.params_dtype
        )


class Llama(nn.Module):
    """Llama decoder. ``apply({'params': p}, tokens, positions=None, segment_ids=None,
    return_hidden=False)``.

    tokens int [B, T]; positions int [B, T] (default 0..T-1; restart per packed document);
    segment_ids int [B, T] (1, 2, ... per document, 0 = padding; attention stays inside a
    document) or None (plain causal). Returns float32 logits [B, T, vocab], or with
    ``return_hidden`` the final normed hidden states [B, T, dim] in the compute dtype.

    With ``cache=`` (``init_cache``) and ``cache_index=`` it is the KV-cache forward of
    prefill and decode instead: returns ``(logits, new_cache)`` (see ``init_cache``); it
    always uses the 'xla' attention path (``herd.lm.attention.decode_attention``).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        return_hidden=False,
        cache=None,
        cache_index=None,
    ):
        c = self.config
        dt = c.compute_dtype
        b, t = tokens.shape
        if t > c.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={c.max_seq_len}")
        if cache is not None:
            return self._cached(tokens, positions, cache, cache_index, return_hidden)
        check_attention_config(
            c.attention_impl,
            t,
            q_chunk=c.attention_q_chunk,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
        )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        table = _Embedding(c, name="tok_embeddings")()
        # The lookup reads the table with its embed axis gathered (what FSDP does for every
        # weight before use) and vocab still split over 'tensor': each device gathers its
        # own batch rows from its vocab shard and one all-reduce over 'tensor' combines
        # them. From the (vocab, embed)-split table, XLA's SPMD partitioner had no direct
        # way to batch-split activations and fell back to replicating the global lookup
        # result; later passes undid that at the shapes tried, but nothing promised it.
        x = jnp.take(_constrain(table, ("vocab", None)), tokens, axis=0).astype(dt)
        x = _constrain(x, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(
                Block, policy=_remat_policy(c.remat_policy), prevent_cse=not c.scan_layers
            )
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(c, name="layers")(x, cos, sin, segment_ids)
        else:
            for i in range(c.n_layers):
                x, _ = block(c, name=f"layers_{i}")(x, cos, sin, segment_ids)

        x = RMSNorm(c.norm_eps, dt, c.params_dtype, name="norm")(x)
        if return_hidden:
            return x
        w = table.T if c.tie_embeddings else _Head(c, name="output")()
        logits = jnp.einsum("btd,dv->btv", x, w.astype(dt), preferred_element_type=jnp.float32)
        return _constrain(logits, ("batch", "length", "vocab"))

    def _cached(self, tokens, positions, cache, cache_index, return_hidden):
        """The KV-cache forward (prefill and decode): see ``init_cache``. Returns
        (logits or hidden, the updated cache)."""
        c = self.config
        dt = c.compute_dtype
        b, t = tokens.shape
        ck, cv, cpos = cache["k"], cache["v"], cache["positions"]
        s = ck.shape[2]
        if ck.shape != (c.n_layers, b, s, c.n_kv_heads, c.head_dim) or cv.shape != ck.shape:
            raise ValueError(
                f"cache k {ck.shape} / v {cv.shape} do not match "
                f"[layers, batch, max_len, kv_heads, head_dim] = "
                f"{(c.n_layers, b, s, c.n_kv_heads, c.head_dim)}"
            )
        if cpos.shape != (b, s):
            raise ValueError(f"cache positions {cpos.shape} != (batch, max_len) = {(b, s)}")
        if t > s:
            raise ValueError(f"{t} tokens do not fit a cache of max_len {s}")
        index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        k_positions = jax.lax.dynamic_update_slice_in_dim(cpos, positions, index, 1)
        k_positions = jnp.where(k_positions < 0, -1, k_positions)
        table = _Embedding(c, name="tok_embeddings")()
        x = jnp.take(_constrain(table, ("vocab", None)), tokens, axis=0).astype(dt)
        x = _constrain(x, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), c.head_dim, c.rope_theta, c.rope_scaling)
        info = (positions, k_positions, index)
        if c.scan_layers:
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (ck, cv) = stack(c, name="layers")(x, cos, sin, None, ck, cv, info)
        else:
            ks, vs = [], []
            for i in range(c.n_layers):
                x, (k_i, v_i) = Block(c, name=f"layers_{i}")(x, cos, sin, None, ck[i], cv[i], info)
                ks.append(k_i)
                vs.append(v_i)
            ck, cv = jnp.stack(ks), jnp.stack(vs)
        new_cache = {
            "k": _constrain(ck, CACHE_AXES),
            "v": _constrain(cv, CACHE_AXES),
            "positions": _constrain(k_positions, CACHE_POSITION_AXES),
        }
        x = RMSNorm(c.norm_eps, dt, c.params_dtype, name="norm")(x)
        if return_hidden:
            return x, new_cache
        w = table.T if c.tie_embeddings else _Head(c, name="output")()
        logits = jnp.einsum("btd,dv->btv", x, w.astype(dt), preferred_element_type=jnp.float32)
        return _constrain(logits, ("batch", "length", "vocab")), new_cache


# ---------------------------------------------------------------------------------------
# KV cache (prefill + decode; herd.lm.generate drives it)
# ---------------------------------------------------------------------------------------

# Logical axes of the cache: batch split like the activations (data/fsdp), kv heads over
# 'tensor' (as the wk/wv projections make them), one slot per token along 'length'.
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
CACHE_POSITION_AXES = ("batch", "length")


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: ``{'k', 'v'}`` ``[layers, batch, max_len, kv_heads, head_dim]``
    (per KV head: grouped-query heads are never repeated) in ``dtype`` (default the compute
    dtype), and ``'positions'`` ``[batch, max_len]`` int32, the token position held by each
    slot (-1: empty or padding, never attended).

    ``Llama(config).apply(v, tokens, positions=..., cache=cache, cache_index=i)`` writes
    the keys/values of tokens ``[B, T]`` into slots ``[i, i + T)`` and returns
    ``(logits, new_cache)``; each query attends to the cached keys whose position is
    ``<=`` its own. ``positions`` (default ``i + arange(T)``) may differ per row (left-padded
    prompts start at 0); a negative position marks a padding token.
    """
    c = config
    dt = c.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "positions": jnp.full((batch, max_len), -1, jnp.int32),
    }


def cache_logical_axes() -> dict:
    """The logical axis names of ``init_cache``'s tree (for herd.core.mesh.logical_to_sharding
    via ``jax.sharding.PartitionSpec``)."""
    return {"k": CACHE_AXES, "v": CACHE_AXES, "positions": CACHE_POSITION_AXES}


# ---------------------------------------------------------------------------------------
# Output embedding (what herd.lm.loss.chunked_cross_entropy multiplies hidden states by)
# ---------------------------------------------------------------------------------------


def output_embedding(params, config: LlamaConfig):
    """The [dim, vocab] matrix that maps final hidden states to logits."""
    params = nn.meta.unbox(params)
    if "params" in params and "tok_embeddings" not in params:
        params = params["params"]
    if config.tie_embeddings:
        return params["tok_embeddings"]["embedding"].T
    return params["output"]["kernel"]
