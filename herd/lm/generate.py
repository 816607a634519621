"""Text generation with a KV cache: batched prefill, then one jitted ``lax.while_loop``.

Library::

    from herd.lm.generate import generate, generate_tokens
    ids = generate_tokens(model_config, params, [[1, 5, 9], [1, 7]], max_new_tokens=32)
    texts = generate(model_config, params, tokenizer, ["def f(", "import "],
                     max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

Prompts of different lengths are left-padded internally (their positions still start at
0; padding is never attended), prefilled in one forward pass into a KV cache
(``herd.lm.model.init_cache``), and the new tokens are decoded inside one jitted
``lax.while_loop`` (no Python per token) that stops when every row has produced a stop
token or after ``max_new_tokens``. Sampling: greedy (``temperature=0``), temperature,
top-k, top-p (nucleus), repetition penalty (Hugging Face semantics: a seen token's logit
is divided by the penalty when positive, multiplied when negative), a seed. Given a
``mesh`` the batch is split over data/fsdp and heads (and the cache's kv heads) over
tensor, by the model's logical axes (``herd.lm.sharding.LM_RULES``).

Streaming: ``generate_tokens(..., on_tokens=fn)`` calls ``fn`` from inside the jitted loop
(an ordered ``jax.experimental.io_callback``) with each step's tokens, and ``fn`` may end
rows (a stop string completed); ``generate(..., on_text=fn)`` gets text pieces, decoded
incrementally by :class:`TextStream` (no half UTF-8 characters, nothing past a stop
string). The tokens are the same with or without streaming.

CLI::

    python -m herd.lm.generate                       # samples from ./workdir/lm
    python -m herd.lm.generate --workdir=DIR [--step=N] --prompt='import os\\n'
    python -m herd.lm.generate --hf=DIR --prompt=...  # config.json + safetensors, with the
                                                      # directory's tokenizer.model / .json
    python -m herd.lm.generate --prefix='def f(x):\\n    ' --suffix='\\n    return y\\n'
    python -m herd.lm.generate --chat [--chat_format=llama2|llama3] [--system=...] < turns
    flags: --max_new_tokens (default 64, chat 256, never past the context) --temperature
           (0.6) --top_p (0.9) --top_k (0) --repetition_penalty (1) --seed --stop=STR
           (repeatable) --nostream --tokenizer=FILE --verbose

The sampling defaults are those of Meta's reference scripts (temperature 0.6, top-p 0.9);
``--temperature=0`` is greedy. ``\\n``, ``\\t`` and ``\\\\`` in --prompt, --prefix, --suffix,
--system and --stop are the characters. Text is printed as it is generated:

- completion: the prompt, then its continuation (until EOS, a stop string or the limit);
- infilling (Code Llama's PSM prompt, ``--fim_format=spm`` for SPM): the prefix, the
  middle as it is generated (until <EOT>), then the suffix: the filled-in code. A note on
  stderr says when no <EOT> came within max_new_tokens. A tokenizer without the FIM
  sentinels is an error before the weights load;
- chat: one user turn per stdin line (empty lines skipped, EOF ends), each answer on
  stdout followed by a newline, the history kept. Answers end at the format's end of turn
  (Llama 3: <|eot_id|> or <|end_of_text|>; Llama 2: EOS). The format defaults to llama3
  when the tokenizer has its header tokens, else llama2. When the history with
  max_new_tokens no longer fits the context, the oldest exchanges are dropped (a note on
  stderr); one turn longer than the context is an error.

Errors a user can cause (a bad flag value, a prompt or max_new_tokens past the context, a
missing model) are one ``error: ...`` line on stderr and exit status 2; with no model in
./workdir/lm the line names the command to train one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from herd.lm.config import LlamaConfig
from herd.lm.model import Llama, apply_rope, rope_cos_sin
from herd.lm.sharding import LM_RULES

__all__ = [
    "TextStream",
    "check_sampling",
    "generate",
    "generate_tokens",
    "main",
    "run_cli",
]

DEFAULT_WORKDIR = os.path.join(".", "workdir", "lm")


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> None:
    """ValueError naming the value for sampling settings that cannot work."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")


def _sample(logits, seen, rng, temperature, top_k, top_p, penalty):
    """Next tokens [B] int32 from logits [B, V] (float32) and the seen-token mask [B, V]."""
    logits = logits.astype(jnp.float32)
    if penalty != 1.0:
        penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
        logits = jnp.where(seen, penalised, logits)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep a token while the mass strictly above it is below top_p (the smallest set
        # reaching top_p, at least one token), as Hugging Face's TopPLogitsWarper.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
        thresh = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits < thresh, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _mark(seen, tokens, valid):
    """seen [B, V] with tokens [B, T] (where valid [B, T]) set."""
    return jax.vmap(lambda s, t, m: s.at[t].max(m))(seen, tokens, valid)


# Streaming: the jitted loop calls _stream_to_host (jax.experimental.io_callback, ordered)
# with each step's tokens; the host function to call is looked up by a sink id passed as a
# traced argument, so the loop compiles once for any callback.
_SINKS: dict[int, object] = {}
_NEXT_SINK = iter(range(1, 2**31 - 1))


def _stream_to_host(sink, tokens, active):
    fn = _SINKS[int(sink)]
    return np.asarray(fn(np.asarray(tokens), np.asarray(active)), dtype=bool)


# ------------------------------------------------------------------------- decode forward
#
# The jitted loop does not call Llama.apply: batch-1 decode is bound by reading the weights
# once per token, and three things made that path copy far more than the weights
# (BENCHMARKS.md, LM decode): nn.scan over stacked layers inside the while_loop made
# XLA:CPU copy each layer's weight slice every token; one [layers, ...] cache array was
# sliced per layer, K transposed and the whole cache re-stacked every token; and there were
# seven matmuls per layer. Here the weights are prepared once per params (_decode_weights:
# one matrix per layer for q/k/v and one for gate/up, in the compute dtype), the layers
# are unrolled over them, and each layer's cache is its own loop-state array written in
# place with dynamic_update_slice. K is kept [.., head_dim, len] and V [.., len, head_dim]:
# the score and value products of a query then read the cache as it lies (no transpose,
# no copy). The math is Llama.apply's cache path (herd.lm.model): the tests hold the
# generated tokens to the full forward pass and to HF generate.


def _layer_trees(params, n_layers: int) -> list:
    """Each layer's params: slices of the scanned 'layers' stack, or 'layers_{i}'."""
    if "layers" in params:
        return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n_layers)]
    return [params[f"layers_{i}"] for i in range(n_layers)]


# Each decode matrix [K, N] is kept as COL_BLOCKS column blocks [COL_BLOCKS, K, N / blocks]
# and multiplied as one batched product. On the 2-core Intel VM XLA:CPU ran the batch-1
# products of the benchmark model (33 matvecs over 1-16 MB) at 14-16 GB/s as plain [K, N]
# dots and 20-21 GB/s as 2 or 4 blocks (the same products in a loop, torch.nn.functional
# .linear: 15-17 GB/s); the whole decode loop ran 1.25-1.3x faster at batch 1 with 4
# blocks and 1.05x at batch 8 (2 blocks: 1.2x / 1.0x, 8 or 16 blocks: slower than none).
COL_BLOCKS = 4


def _col_blocks(w):
    """[K, N] -> [b, K, N / b]: column block i is w[:, i * N / b : (i + 1) * N / b], with b the
    largest of COL_BLOCKS, ..., 2, 1 that divides N."""
    k, n = w.shape
    blocks = next(b for b in range(COL_BLOCKS, 0, -1) if n % b == 0)
    return w.reshape(k, blocks, n // blocks).transpose(1, 0, 2)


def _block_matmul(x, w, preferred=None):
    """x [M, K] times the column-blocked matrix w [b, K, N / b] -> [M, N] (a reshape, no
    copy, when M == 1)."""
    b = w.shape[0]
    xb = jnp.broadcast_to(x[None], (b,) + x.shape)
    y = jax.lax.dot_general(
        xb, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=preferred
    )  # [b, M, N / b]
    return y.transpose(1, 0, 2).reshape(x.shape[0], -1)


def _decode_weights(config: LlamaConfig, params) -> dict:
    """The matrices a decode step multiplies by, per layer, in the compute dtype and split
    into column blocks (_col_blocks): ``wqkv`` from [dim, (heads + 2 kv_heads) * head_dim]
    (q, k, v side by side), ``wo`` [heads * head_dim, dim], ``w13`` [dim, 2 ffn] (gate,
    up), ``w2`` [ffn, dim] and the output head [dim, vocab] (the embedding transposed when
    tied); the norm scales and the embedding table as they are."""
    c = config
    dt = c.compute_dtype
    d, h, kv, hd = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
    layers = []
    for lp in _layer_trees(params, c.n_layers):
        a, f = lp["attention"], lp["feed_forward"]
        qkv = [a["wq"].reshape(d, h * hd), a["wk"].reshape(d, kv * hd), a["wv"].reshape(d, kv * hd)]
        layers.append(
            {
                "attention_norm": lp["attention_norm"]["scale"],
                "wqkv": _col_blocks(jnp.concatenate([w.astype(dt) for w in qkv], axis=1)),
                "wo": _col_blocks(a["wo"].reshape(h * hd, d).astype(dt)),
                "ffn_norm": lp["ffn_norm"]["scale"],
                "w13": _col_blocks(jnp.concatenate([f["w1"].astype(dt), f["w3"].astype(dt)], 1)),
                "w2": _col_blocks(f["w2"].astype(dt)),
            }
        )
    table = params["tok_embeddings"]["embedding"]
    head = table.T if c.tie_embeddings else params["output"]["kernel"]
    return {
        "layers": tuple(layers),
        "embedding": table,
        "norm": params["norm"]["scale"],
        "head": _col_blocks(head.astype(dt)),
    }


def _rms_norm(x, scale, eps: float, dtype):
    """herd.lm.model.RMSNorm on x [N, dim] (float32 math)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(dtype)


def _cache_lead(batch: int, kv_heads: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The leading cache dims (batch, kv_heads) and their logical names, without the
    size-1 ones: XLA:CPU otherwise feeds the score matmul a reshaped view of the freshly
    written cache and copies the whole cache three times a token to keep it in place
    (seen in the optimized HLO at batch 1)."""
    dims = [(n, name) for n, name in ((batch, "batch"), (kv_heads, "kv_heads")) if n > 1]
    return tuple(n for n, _ in dims), tuple(name for _, name in dims)


def _init_caches(config: LlamaConfig, batch: int, max_len: int) -> tuple:
    """Empty per-layer caches ((k, v), ...): k [*lead, head_dim, max_len], v [*lead,
    max_len, head_dim] (lead = batch, kv_heads; see _cache_lead), in the compute dtype."""
    c = config
    lead, names = _cache_lead(batch, c.n_kv_heads)
    k = jnp.zeros(lead + (c.head_dim, max_len), c.compute_dtype)
    v = jnp.zeros(lead + (max_len, c.head_dim), c.compute_dtype)
    k = nn.with_logical_constraint(k, names + ("head_dim", "length"))
    v = nn.with_logical_constraint(v, names + ("length", "head_dim"))
    return tuple((k, v) for _ in range(c.n_layers))


def _attend(q, k_cache, v_cache, allowed, b: int, t: int, kv: int):
    """Grouped-query attention of q [B, T, H, D] over one layer's cache (k [*lead, D, S],
    v [*lead, S, D]), where allowed [B, T, S]: what jax.nn.dot_product_attention
    (implementation='xla') computes for herd.lm.attention.decode_attention, as two batched
    matmuls over (batch, kv head) with the query heads of a group stacked on the rows.
    Returns [B * T, H * D]."""
    h, d = q.shape[2], q.shape[3]
    g, s = h // kv, k_cache.shape[-1]
    lead = k_cache.shape[:-2]
    nb = len(lead)
    # [B, T, KV, G, D] -> [B, KV, G, T, D] -> [*lead, G * T, D]: free when T == 1
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(lead + (g * t, d))
    stat = jnp.promote_types(q.dtype, jnp.float32)
    batch_dims = (tuple(range(nb)), tuple(range(nb)))
    scores = jax.lax.dot_general(
        qg, k_cache, (((nb + 1,), (nb,)), batch_dims), preferred_element_type=stat
    )
    scores = scores * jnp.asarray(1.0 / math.sqrt(d), stat)
    scores = scores.reshape(b, kv, g, t, s)
    # jax.nn.dot_product_attention's masked value and float32 softmax
    neg = jnp.asarray(-0.7 * float(jnp.finfo(stat).max), stat)
    scores = jnp.where(allowed[:, None, None], scores, neg)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v_cache.dtype)
    out = jax.lax.dot_general(
        probs.reshape(lead + (g * t, s)), v_cache, (((nb + 1,), (nb,)), batch_dims)
    )
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b * t, h * d)


def _forward_cached(config: LlamaConfig, w, tokens, positions, caches, k_positions, index):
    """Logits [B, T, vocab] (float32) of tokens [B, T] at positions [B, T] (negative:
    padding), whose keys/values are written into cache slots [index, index + T), and the
    updated caches. k_positions [B, S]: the position held by each slot after the write
    (negative: empty or padding, never attended)."""
    c = config
    dt = c.compute_dtype
    b, t = tokens.shape
    h, kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    lead, names = _cache_lead(b, kv)
    x = jnp.take(w["embedding"], tokens.reshape(b * t), axis=0).astype(dt)
    cos, sin = rope_cos_sin(jnp.maximum(positions, 0), hd, c.rope_theta, c.rope_scaling)
    qp, kp = positions[:, :, None], k_positions[:, None, :]
    # A query sees the valid keys at positions <= its own; padding queries see every slot
    # (no softmax row is empty) and are zeroed after attention.
    allowed = ((kp >= 0) & (kp <= qp)) | (qp < 0)
    valid = (positions >= 0).reshape(b * t, 1).astype(dt)
    new = []
    for lw, (ck, cv) in zip(w["layers"], caches, strict=True):
        y = _rms_norm(x, lw["attention_norm"], c.norm_eps, dt)
        q, k, v = jnp.split(_block_matmul(y, lw["wqkv"]), [h * hd, (h + kv) * hd], axis=1)
        q = apply_rope(q.reshape(b, t, h, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, kv, hd), cos, sin)
        k = k.transpose(0, 2, 3, 1).reshape(lead + (hd, t)).astype(ck.dtype)
        v = v.reshape(b, t, kv, hd).transpose(0, 2, 1, 3).reshape(lead + (t, hd))
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k, index, ck.ndim - 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, cv.ndim - 2)
        ck = nn.with_logical_constraint(ck, names + ("head_dim", "length"))
        cv = nn.with_logical_constraint(cv, names + ("length", "head_dim"))
        new.append((ck, cv))
        out = _attend(q, ck, cv, allowed, b, t, kv) * valid
        x = x + _block_matmul(out, lw["wo"])
        y = _rms_norm(x, lw["ffn_norm"], c.norm_eps, dt)
        gate, up = jnp.split(_block_matmul(y, lw["w13"]), 2, axis=1)
        x = x + _block_matmul(nn.silu(gate) * up, lw["w2"])
    x = _rms_norm(x, w["norm"], c.norm_eps, dt)
    logits = _block_matmul(x, w["head"], preferred=jnp.float32)
    return logits.reshape(b, t, -1), tuple(new)


@functools.lru_cache(maxsize=16)
def _prepare_fn(config: LlamaConfig):
    return jax.jit(functools.partial(_decode_weights, config))


# The decode weights of the last params prepared (their leaves held by weak reference):
# generating again with the same params (a chat, a CLI session, a benchmark) skips the
# preparation, at the cost of one copy of the weights kept while those params live.
_PREPARED: list = []


def _decode_weights_for(config: LlamaConfig, params, mesh):
    """_decode_weights of params (placed on `mesh` first when given), reused while the
    same immutable jax.Array leaves come again with the same config and mesh."""
    leaves = jax.tree.leaves(params)
    cacheable = all(isinstance(x, jax.Array) for x in leaves)
    if cacheable and _PREPARED:
        cfg, m, refs, weights, _ = _PREPARED[0]
        if (
            cfg == config
            and m == mesh
            and len(refs) == len(leaves)
            and all(r() is x for r, x in zip(refs, leaves, strict=True))
        ):
            return weights
    _PREPARED.clear()  # the previous weights go before new ones are made
    if mesh is None:
        weights = _prepare_fn(config)(params)
    else:
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(LM_RULES)):
            weights = _prepare_fn(config)(_place_params(config, params, mesh))
    if cacheable and leaves:
        import weakref

        key = object()
        _PREPARED.append((config, mesh, [weakref.ref(x) for x in leaves], weights, key))
        weakref.finalize(leaves[0], _forget_prepared, key)  # the params go, and their weights
    return weights


def _forget_prepared(key) -> None:
    _PREPARED[:] = [e for e in _PREPARED if e[-1] is not key]


@functools.lru_cache(maxsize=16)
def _generate_fn(
    config: LlamaConfig, max_new: int, sampling: tuple, stops: tuple, pad: int, stream: bool
):
    """The jitted prefill + while-loop decode for one model and one set of settings; it
    takes the weights of _decode_weights."""
    c = config
    temperature, top_k, top_p, penalty = sampling
    stop_arr = np.asarray(stops if stops else [-1], np.int32)

    def sample(logits, seen, rng):
        return _sample(logits, seen, rng, temperature, top_k, top_p, penalty)

    def is_stop(tok):
        return jnp.any(tok[:, None] == jnp.asarray(stop_arr)[None, :], axis=-1)

    def step_end(i, new, done, ends, sink):
        """(done, ends) after step i produced `new`: a row ends at its first stop token
        (not kept) or, streaming, where the host asks (the token kept)."""
        hit = ~done & is_stop(new)
        ends = jnp.where(hit, i, ends)
        done = done | hit
        if stream:
            from jax.experimental import io_callback

            host_stop = io_callback(
                _stream_to_host,
                jax.ShapeDtypeStruct(new.shape, jnp.bool_),
                sink,
                new,
                ~done,
                ordered=True,
            )
            host_stop = host_stop & ~done
            ends = jnp.where(host_stop, i + 1, ends)
            done = done | host_stop
        return done, ends

    @jax.jit
    def run(weights, tokens, positions, lengths, rng, sink):
        b, p = tokens.shape
        caches = _init_caches(c, b, p + max_new)
        # slot i holds the token at positions[:, i] (prompt) or lengths + i - p (decode)
        k_positions = jnp.full((b, p + max_new), -1, jnp.int32)
        k_positions = jax.lax.dynamic_update_slice_in_dim(
            k_positions, jnp.where(positions < 0, -1, positions), 0, 1
        )
        logits, caches = _forward_cached(c, weights, tokens, positions, caches, k_positions, 0)
        seen = jnp.zeros((b, c.vocab_size), bool)
        if penalty != 1.0:
            seen = _mark(seen, tokens, positions >= 0)
        rng, sub = jax.random.split(rng)
        tok = sample(logits[:, -1], seen, sub)
        out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok)
        ends = jnp.full((b,), max_new, jnp.int32)
        done, ends = step_end(0, tok, jnp.zeros((b,), bool), ends, sink)
        if penalty != 1.0:
            seen = _mark(seen, tok[:, None], jnp.ones((b, 1), bool))

        def cond(state):
            i, _, _, _, _, done, _, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, out, caches, k_positions, tok, done, ends, seen, rng = state
            pos = (lengths + i - 1)[:, None]
            index = p + i - 1
            k_positions = jax.lax.dynamic_update_slice_in_dim(k_positions, pos, index, 1)
            logits, caches = _forward_cached(
                c, weights, tok[:, None], pos, caches, k_positions, index
            )
            rng, sub = jax.random.split(rng)
            new = jnp.where(done, pad, sample(logits[:, 0], seen, sub))
            out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, 1)
            if penalty != 1.0:
                seen = _mark(seen, new[:, None], ~done[:, None])
            done, ends = step_end(i, new, done, ends, sink)
            return i + 1, out, caches, k_positions, new, done, ends, seen, rng

        state = (jnp.asarray(1, jnp.int32), out, caches, k_positions, tok, done, ends, seen, rng)
        state = jax.lax.while_loop(cond, body, state)
        return state[1], state[6]

    return run


def _unbox_params(params):
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and "params" in params and "tok_embeddings" not in params:
        params = params["params"]
    return params


def _place_params(config, params, mesh):
    """params onto `mesh` by the model's logical axes (LM_RULES)."""
    from herd.core import mesh as mesh_lib

    boxed = jax.eval_shape(
        lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]
    shardings = mesh_lib.logical_to_sharding(boxed, mesh, LM_RULES)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, nn.meta.unbox(shardings))


def generate_tokens(
    model_config: LlamaConfig,
    params,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh=None,
    on_tokens: Callable[[np.ndarray, np.ndarray], object] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of ids), up to ``max_new_tokens`` each,
    ending before the first of ``stop_ids`` a row produces (the stop token is not
    returned). ``temperature=0`` is greedy (top-k/top-p then do nothing). Raises
    ValueError for bad settings, an empty prompt, ids outside the vocabulary, or a prompt
    plus ``max_new_tokens`` longer than the model's ``max_seq_len``.

    ``on_tokens(tokens, active)``: called from inside the jitted decode loop (an ordered
    ``io_callback``, so the loop stays one compiled ``while_loop``) once per step, with each
    prompt's new token ``tokens`` [B] and ``active`` [B] (False for rows already ended and
    for a stop token, which is not part of the output). It may return a bool [B] (or None):
    the rows to end after this step's token (e.g. a stop string was completed). The tokens
    are those generation produces without a callback (streaming changes nothing else). An
    exception in ``on_tokens`` ends every row and is raised again by this function."""
    c = model_config
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts = [[int(t) for t in ids] for ids in prompts_ids]
    if not prompts:
        return []
    for n, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {n} is empty (it needs at least one token, e.g. BOS)")
        bad = [t for t in ids if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"prompt {n} has ids outside [0, {c.vocab_size}): {bad[:5]}")
        if len(ids) + max_new_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt {n} of {len(ids)} tokens + max_new_tokens={max_new_tokens} = "
                f"{len(ids) + max_new_tokens} exceeds the model's max_seq_len={c.max_seq_len}"
            )
    stops = tuple(sorted({int(s) for s in stop_ids if s is not None and int(s) >= 0}))
    n_real = len(prompts)
    if mesh is not None:  # whole rows per data-parallel shard: pad with 1-token prompts
        from herd.core.mesh import data_parallel_size

        dp = data_parallel_size(mesh)
        prompts = prompts + [[pad_id]] * (-len(prompts) % dp)
    lengths = np.asarray([len(x) for x in prompts], np.int32)
    # Prompt widths rounded up to a power of two (at least 16, within the context): a chat
    # or a CLI session whose prompts grow compiles once per width, not once per prompt.
    longest = int(lengths.max())
    p = max(longest, min(max(16, 1 << (longest - 1).bit_length()), c.max_seq_len - max_new_tokens))
    b = len(prompts)
    tokens = np.full((b, p), pad_id, np.int32)
    positions = np.full((b, p), -1, np.int32)
    for r, ids in enumerate(prompts):
        tokens[r, p - len(ids) :] = ids
        positions[r, p - len(ids) :] = np.arange(len(ids))
    sampling = (float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    stream = on_tokens is not None
    fn = _generate_fn(c, int(max_new_tokens), sampling, stops, int(pad_id), stream)
    rng = jax.random.PRNGKey(int(seed))
    weights = _decode_weights_for(c, _unbox_params(params), mesh)
    sink = 0
    raised: list[BaseException] = []
    if stream:
        sink = next(_NEXT_SINK)

        def host(tokens, active):  # the real rows to the caller; padding rows never stop
            if raised:
                return np.ones(len(tokens), bool)
            try:
                ask = on_tokens(tokens[:n_real], active[:n_real])
                stop = np.zeros(len(tokens), bool)
                if ask is not None:
                    stop[:n_real] = np.asarray(ask, bool).reshape(n_real)
                return stop
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the loop
                raised.append(e)  # (raised in here, XLA would wrap it in a runtime error)
                return np.ones(len(tokens), bool)

        _SINKS[sink] = host
    try:
        if mesh is None:
            out, ends = fn(weights, tokens, positions, lengths, rng, np.int32(sink))
        else:
            from herd.core import mesh as mesh_lib

            with jax.set_mesh(mesh), nn.logical_axis_rules(list(LM_RULES)):
                batch = mesh_lib.batch_sharding(mesh, 2)
                tokens_d = jax.device_put(tokens, batch)
                positions_d = jax.device_put(positions, batch)
                lengths_d = jax.device_put(lengths, mesh_lib.batch_sharding(mesh, 1))
                out, ends = fn(weights, tokens_d, positions_d, lengths_d, rng, np.int32(sink))
        if not (out.is_fully_addressable and ends.is_fully_addressable):
            # several processes: each holds its own rows; every process returns all of them
            from jax.experimental import multihost_utils

            out, ends = multihost_utils.process_allgather((out, ends), tiled=True)
        out, ends = jax.device_get((out, ends))
    finally:
        _SINKS.pop(sink, None)
    if raised:
        raise raised[0]
    out, ends = np.asarray(out)[:n_real], np.asarray(ends)[:n_real]
    return [row[:end].tolist() for row, end in zip(out, ends, strict=True)]


class TextStream:
    """Incremental detokenisation of one generated row: ``push(token)`` returns the text
    that became final (possibly ''), ``finish()`` the rest, so the pieces concatenated are
    ``decode(all tokens)`` cut before the first stop string.

    Text is held back while its end is an incomplete UTF-8 character (decoders show one as
    U+FFFD) or could be the start of a stop string. ``decode(ids) -> str`` decodes the
    whole row each time (SentencePiece pieces depend on their neighbours: a leading space,
    byte-fallback pieces), so what is printed never changes afterwards.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode = decode
        self._stops = [x for x in stop_strings if x]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was completed

    def _text(self) -> str:
        text = self._decode(self.ids)
        cuts = [i for i in (text.find(x) for x in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            return text[: min(cuts)]
        return text

    def _new(self, ready: str) -> str:
        if not ready.startswith(self.emitted):  # not prefix-stable: wait for more text
            return ""
        new = ready[len(self.emitted) :]
        self.emitted = ready
        return new

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self._text()
        if self.stopped:
            return self._new(text)
        ready = text.rstrip("\ufffd")
        for x in self._stops:  # hold a tail that may begin a stop string
            for k in range(min(len(x) - 1, len(ready)), 0, -1):
                if ready.endswith(x[:k]):
                    ready = ready[:-k]
                    break
        return self._new(ready)

    def finish(self) -> str:
        text = self._text()
        if text.startswith(self.emitted):
            return self._new(text)
        return ""  # cannot happen for prefix-stable decoders; printed text is never retracted


def generate(
    model_config: LlamaConfig,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    bos: bool = True,
    on_text: Callable[[int, str], object] | None = None,
    **sampling,
) -> list[str]:
    """The continuation text of each prompt (without the prompt). Prompts are encoded with
    ``tokenizer.encode(text, bos=bos)``; generation stops at ``stop_ids`` (default the
    tokenizer's EOS) and the text is cut before the first of ``stop_strings``. Other
    keywords (temperature, top_k, top_p, repetition_penalty, seed, mesh) go to
    :func:`generate_tokens`.

    ``on_text(row, text)``: streaming; called with each piece of a row's text as soon as it
    is final (see :class:`TextStream`); the pieces of a row concatenated are its returned
    text. Streaming also ends a row as soon as it completes a stop string."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        stop_ids = [eos] if eos is not None and eos >= 0 else []
    ids = [list(tokenizer.encode(text, bos=bos)) for text in prompts]
    pad = getattr(tokenizer, "pad_id", 0)
    pad = pad if pad is not None and 0 <= pad < model_config.vocab_size else 0
    on_tokens = None
    if on_text is not None:
        streams = [TextStream(tokenizer.decode, stop_strings) for _ in prompts]

        def on_tokens(tokens, active):
            for r, (t, a) in enumerate(zip(tokens.tolist(), active.tolist(), strict=True)):
                if a:
                    piece = streams[r].push(t)
                    if piece:
                        on_text(r, piece)
            return [s.stopped for s in streams]

    out = generate_tokens(
        model_config,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad,
        on_tokens=on_tokens,
        **sampling,
    )
    if on_text is not None:
        for r, s in enumerate(streams):
            rest = s.finish()
            if rest:
                on_text(r, rest)
    texts = []
    for new in out:
        text = tokenizer.decode(new)
        cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=None)
        texts.append(text if cut is None else text[:cut])
    return texts


# ----------------------------------------------------------------------------------- CLI

# Sampling defaults of the CLI: Meta's reference scripts for Llama 2 / Llama 3
# (example_text_completion.py and example_chat_completion.py: temperature 0.6, top_p 0.9).
CLI_TEMPERATURE, CLI_TOP_P = 0.6, 0.9
# Default new tokens: a completion or a middle, and a chat answer; never past the context.
CLI_MAX_NEW, CLI_CHAT_MAX_NEW = 64, 256


class _Source:
    """What the CLI generates with: the model config and tokenizer (read first, cheap) and a
    function that loads the params (the long part, called after every check)."""

    def __init__(self, config, tokenizer, load_params, name):
        self.config, self.tokenizer, self.load_params, self.name = (
            config,
            tokenizer,
            load_params,
            name,
        )


def _source(workdir: str, hf: str | None, tokenizer_file: str | None, step) -> _Source:
    """The model config and tokenizer of a herd workdir or an HF directory (ValueError)."""
    from herd.lm.tokenizer import find_hf_tokenizer, load_from_workdir, load_tokenizer

    if hf:
        from herd.lm.convert import config_from_hf, from_hf

        if not os.path.isdir(hf):
            raise ValueError(f"--hf={hf} is not a directory")
        cfg_path = os.path.join(hf, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{hf} has no config.json (not a Hugging Face model directory)")
        with open(cfg_path) as f:
            try:
                d = json.load(f)
            except ValueError as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        config = config_from_hf(d, where=cfg_path)
        tok = load_tokenizer(tokenizer_file or find_hf_tokenizer(hf))
        return _Source(config, tok, lambda: from_hf(hf)[1], hf)
    from herd.core.checkpoint import read_config
    from herd.lm.convert import load_workdir
    from herd.lm.presets import build_model_config

    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir) or not any(d.isdigit() for d in os.listdir(ckdir)):
        raise ValueError(
            f"no trained model in {workdir!r} (no checkpoints): run "
            f"`python -m herd.lm.train --workdir={workdir}` first"
        )
    try:
        stored = read_config(ckdir, step)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if "model" not in stored:
        raise ValueError(f"the config of {ckdir} has no 'model' section")
    config = build_model_config(stored["model"])
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else load_from_workdir(workdir)
    return _Source(config, tok, lambda: load_workdir(workdir, step)[1], workdir)


def _check_tokenizer_fits(config: LlamaConfig, tokenizer) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{config.vocab_size}: they do not belong together"
        )


def _max_new(requested, default: int, prompt_len: int, config: LlamaConfig, what: str) -> int:
    """max_new_tokens for a prompt: the requested value (an error past the context) or the
    default, shortened to what the context leaves."""
    room = config.max_seq_len - prompt_len
    if room < 1:
        raise ValueError(
            f"the {what} has {prompt_len} tokens, which fills the model's context of "
            f"max_seq_len={config.max_seq_len} tokens: shorten it"
        )
    if requested is None:
        return min(default, room)
    if requested > room:
        raise ValueError(
            f"max_new_tokens={requested} with the {what} of {prompt_len} tokens exceeds the "
            f"model's context of max_seq_len={config.max_seq_len} tokens (at most {room})"
        )
    return requested


def _unescape(text: str) -> str:
    """'\\n', '\\t' and '\\\\' in a flag value as the characters (for --stop, --prefix ...)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _stream_one(config, params, prompt_ids, decode, write, *, stop_ids, stop_strings, **kw):
    """Generates one row, writing its text through `write` as it becomes final; returns
    (the text, the generated ids)."""
    stream = TextStream(decode, stop_strings)

    def on_tokens(tokens, active):
        if active[0]:
            piece = stream.push(int(tokens[0]))
            if piece:
                write(piece)
        return [stream.stopped]

    (ids,) = generate_tokens(
        config, params, [prompt_ids], stop_ids=stop_ids, on_tokens=on_tokens, **kw
    )
    rest = stream.finish()
    if rest:
        write(rest)
    return stream.emitted, ids


def _chat_format(tokenizer, requested: str | None) -> str:
    from herd.lm import chat

    has_llama3 = all(
        t in (getattr(tokenizer, "special_tokens", None) or {})
        for t in (chat.BEGIN_OF_TEXT, chat.START_HEADER, chat.END_HEADER, chat.EOT)
    )
    if requested is None:
        return "llama3" if has_llama3 else "llama2"
    if requested not in chat.STYLES:
        raise ValueError(
            f"--chat_format must be one of {', '.join(chat.STYLES)}, got {requested!r}"
        )
    if requested == "llama3" and not has_llama3:
        chat.llama3_stop_ids(tokenizer)  # raises naming the missing special tokens
    return requested


def _run_chat(src, f, sampling, write, note, stdin) -> None:
    """Reads user turns from stdin, one a line (EOF ends); answers each with the history.
    When the history no longer fits the context with max_new_tokens, the oldest user /
    assistant pairs are dropped (a note on stderr); a single turn that does not fit is an
    error."""
    from herd.lm import chat

    tok, config = src.tokenizer, src.config
    style = _chat_format(tok, f.chat_format)
    stop_ids = sorted(chat.llama3_stop_ids(tok)) if style == "llama3" else [tok.eos_id]
    system = [{"role": "system", "content": _unescape(f.system)}] if f.system else []
    if system:
        chat.chat_ids(system + [{"role": "user", "content": "x"}], tok, style)  # checks
    params = src.load_params()
    turns: list[dict] = []
    n_answers = 0
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    while True:
        if interactive:
            note("> ")
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        turns.append({"role": "user", "content": text})
        while True:
            ids = chat.chat_ids(system + turns, tok, style)
            room = config.max_seq_len - len(ids)
            want = f.max_new_tokens or min(CLI_CHAT_MAX_NEW, config.max_seq_len // 2)
            if room >= want or len(turns) == 1:
                break
            turns = turns[2:]
            note(f"note: dropped the oldest exchange to fit the context of {config.max_seq_len}\n")
        new = _max_new(f.max_new_tokens, CLI_CHAT_MAX_NEW, len(ids), config, "conversation")
        answer, _ = _stream_one(
            config,
            params,
            ids,
            lambda x: tok.decode(x).lstrip(),  # Llama 2 answers start with a space
            write,
            stop_ids=stop_ids,
            stop_strings=f.stop,
            max_new_tokens=new,
            **dict(sampling, seed=sampling["seed"] + n_answers),  # new draws each turn
        )
        write("\n")
        n_answers += 1
        turns.append({"role": "assistant", "content": answer})


def _define_flags(fv) -> None:
    from absl import flags

    defs = (
        (flags.DEFINE_string, "workdir", DEFAULT_WORKDIR, "A herd LM workdir (its checkpoint)."),
        (flags.DEFINE_string, "hf", None, "A Hugging Face Llama directory (instead of --workdir)."),
        (flags.DEFINE_string, "tokenizer", None, "Tokenizer file (default: the model's)."),
        (flags.DEFINE_integer, "step", None, "Checkpoint step of --workdir (default latest)."),
        (flags.DEFINE_string, "prompt", "import os\n", "The prompt text ('\\n' = newline)."),
        (flags.DEFINE_string, "prefix", None, "Infilling: the code before the gap."),
        (flags.DEFINE_string, "suffix", None, "Infilling: the code after the gap."),
        (flags.DEFINE_string, "fim_format", "psm", "Infilling prompt order: psm or spm."),
        (flags.DEFINE_bool, "chat", False, "A conversation: user turns from stdin, a line each."),
        (flags.DEFINE_string, "chat_format", None, "llama2 | llama3 (default: the tokenizer's)."),
        (flags.DEFINE_string, "system", None, "Chat: a system prompt."),
        (flags.DEFINE_multi_string, "stop", [], "A stop string (repeatable; '\\n' = newline)."),
        (
            flags.DEFINE_integer,
            "max_new_tokens",
            None,
            "New tokens at most (default 64, chat 256).",
        ),
        (flags.DEFINE_float, "temperature", CLI_TEMPERATURE, "Sampling temperature (0 = greedy)."),
        (flags.DEFINE_integer, "top_k", 0, "Top-k sampling (0 = off)."),
        (flags.DEFINE_float, "top_p", CLI_TOP_P, "Top-p (nucleus) sampling (1 = off)."),
        (flags.DEFINE_float, "repetition_penalty", 1.0, "Repetition penalty (1 = off)."),
        (flags.DEFINE_integer, "seed", 0, "Sampling seed."),
        (flags.DEFINE_bool, "stream", True, "Print text as it is generated."),
        (flags.DEFINE_bool, "verbose", False, "Show the traceback of an error, not one line."),
    )
    for define, name, default, help_ in defs:
        define(name, default, help_, flag_values=fv)


def run_cli(argv: Sequence[str], stdin=None, stdout=None) -> int:
    """The CLI on `argv` (argv[0] the program); returns the exit status (2: a user error,
    reported as one ``error: ...`` line on stderr)."""
    from absl import flags

    from herd.core.config import USER_ERRORS, print_user_error

    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    fv = flags.FlagValues()
    _define_flags(fv)
    argv = list(argv) or ["generate"]
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        stdout.write(__doc__[__doc__.index("CLI::") :] + "\nflags:\n" + fv.get_help() + "\n")
        return 0
    try:
        rest = fv(argv)
    except flags.Error as e:
        print_user_error(e)
        return 2

    def write(text: str) -> None:
        if fv.stream:
            stdout.write(text)
            stdout.flush()
        else:
            held.append(text)

    held: list[str] = []

    def note(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    try:
        if len(rest) > 1:
            raise ValueError(f"unexpected arguments {rest[1:]} (flags are --name=value)")
        _cli(fv, write, note, stdin)
    except USER_ERRORS as e:
        if fv.verbose:
            raise
        print_user_error(e)
        return 2
    finally:
        if held:
            stdout.write("".join(held))
            stdout.flush()
    return 0


def _cli(f, write, note, stdin) -> None:
    sampling = dict(
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        repetition_penalty=f.repetition_penalty,
        seed=f.seed,
    )
    check_sampling(f.temperature, f.top_k, f.top_p, f.repetition_penalty)
    if f.max_new_tokens is not None and f.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {f.max_new_tokens}")
    infill = f.prefix is not None or f.suffix is not None
    if infill and f.chat:
        raise ValueError("--chat and --prefix/--suffix (infilling) cannot be combined")
    if (infill or f.chat) and f["prompt"].present:
        raise ValueError("--prompt is for plain completion: not with --prefix/--suffix or --chat")
    if f.hf and f["workdir"].present:
        raise ValueError("give --workdir or --hf, not both")
    if f.fim_format not in ("psm", "spm"):
        raise ValueError(f"--fim_format must be psm or spm, got {f.fim_format!r}")
    f.stop = [_unescape(x) for x in f.stop]
    src = _source(f.workdir, f.hf, f.tokenizer, f.step)
    tok, config = src.tokenizer, src.config
    _check_tokenizer_fits(config, tok)
    if f.chat:
        _run_chat(src, f, sampling, write, note, stdin)
        return
    stop_ids = sorted(getattr(tok, "stop_ids", None) or {tok.eos_id})
    if infill:
        from herd.lm.fim import FimTokens, decode_middle, infilling_prompt

        fim = FimTokens.from_tokenizer(tok)  # no sentinels: the error, before the weights
        prefix, suffix = _unescape(f.prefix or ""), _unescape(f.suffix or "")
        ids = infilling_prompt(prefix, suffix, tok, f.fim_format, fim_tokens=fim)
        new = _max_new(f.max_new_tokens, CLI_MAX_NEW, len(ids), config, "infilling prompt")
        params = src.load_params()
        write(prefix)
        middle, out = _stream_one(
            config,
            params,
            ids,
            lambda x: decode_middle(x, tok),
            write,
            stop_ids=sorted({fim.eot, *stop_ids}),
            stop_strings=f.stop,
            max_new_tokens=new,
            **sampling,
        )
        write(suffix if suffix.endswith("\n") else suffix + "\n")
        if len(out) == new:
            note(f"note: no <EOT> within max_new_tokens={new}: the middle may be cut short\n")
        return
    prompt = _unescape(f.prompt)
    ids = list(tok.encode(prompt, bos=True))
    new = _max_new(f.max_new_tokens, CLI_MAX_NEW, len(ids), config, "prompt")
    params = src.load_params()
    write(prompt)
    _stream_one(
        config,
        params,
        ids,
        tok.decode,
        write,
        stop_ids=stop_ids,
        stop_strings=f.stop,
        max_new_tokens=new,
        **sampling,
    )
    write("\n")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m herd.lm.generate [--workdir=DIR | --hf=DIR] [--prompt=... | --prefix=...
    --suffix=... | --chat] ...`: see the module docstring."""
    sys.exit(run_cli(list(sys.argv if argv is None else argv)))


if __name__ == "__main__":
    main()
