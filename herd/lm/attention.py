"""Causal, document-masked attention with grouped K/V and several backends.

``attention(q, k, v, segment_ids=..., impl=...)`` takes

* ``q`` ``[B, T, H, D]`` and ``k``/``v`` ``[B, S, KV, D]`` with ``H % KV == 0`` (MHA when
  ``KV == H``, GQA otherwise, MQA when ``KV == 1``);
* ``segment_ids`` ``[B, T]`` int32: 1, 2, ... for the packed documents of a row and 0 for
  padding. A query attends only to keys of the same nonzero document (and, when
  ``causal``, only to earlier or equal positions), as in Llama 3's document masking.
  Padding query rows (id 0) return zeros, identically for every backend.

RoPE is applied by the caller. Softmax statistics are float32 in every backend; the
result has ``q.dtype``.

Backends (``impl``):

``'xla'`` (default)
    ``jax.nn.dot_product_attention(implementation='xla')``. It accepts K/V with fewer heads
    (it reshapes q to ``[B, T, KV, H/KV, D]`` and vmaps over the group, so K/V are never
    repeated) and takes the document mask as a boolean ``mask`` ``[B, 1, T, S]`` (it has no
    segment-id argument). It materialises ``T x S`` scores per head, so
    :func:`check_attention_config` refuses it above ``MAX_XLA_SEQ_LEN`` tokens unless
    ``q_chunk`` is given.
``'xla_chunked'``, or ``'xla'`` with ``q_chunk``
    Query-chunked attention in plain JAX with its own backward pass (FlashAttention-2
    style): query chunks of ``q_chunk`` tokens, each scoring against the keys it may see
    (for causal self-attention up to 16 chunks are unrolled and chunk i reads only keys
    ``[0, (i + 1) * q_chunk)``; otherwise a loop over chunks reads all keys), grouped
    batched matmuls with no K/V copies. Only the output and each row's log-sum-exp are
    kept for the backward pass (named ``attention_out`` / ``attention_lse`` for remat
    policies), so live score memory is ``B x H x q_chunk x S`` instead of
    ``B x H x T x S``. Exact (not an approximation).
``'splash'`` (TPU)
    JAX's Pallas splash-attention kernel (``jax.experimental.pallas.ops.tpu.
    splash_attention``) with a static ``CausalMask`` and dynamic ``SegmentIds``, grouped
    K/V through its MHA form with ``KV < H`` heads (no copies). Off TPU it runs in Pallas
    interpret mode (slow; used by the tests). Needs the sequence length to be a multiple
    of 128 (its minimum block).
``'cudnn'`` (GPU)
    ``jax.nn.dot_product_attention(implementation='cudnn')`` (cuDNN flash attention,
    bf16/fp16 only, head_dim <= 128 and a multiple of 8). Limits of the document mask:
    the public JAX API has no segment-id argument and its ``query_seq_lengths`` /
    ``key_value_seq_lengths`` describe only one right-padded sequence per row, so packed
    documents cannot be expressed with them. With ``segment_ids`` this backend therefore
    passes the document mask as a dense boolean ``mask``, which JAX's cuDNN wrapper turns
    into an additive ``[B, 1, T, S]`` bias read by the kernel: still flash attention (no
    ``T x S`` probabilities kept for the backward pass), but an O(B T S) bias in memory
    and no skipping of fully masked tiles beyond the causal ones. Without
    ``segment_ids`` it uses cuDNN's causal mask only. (cuDNN's packed "segment offsets"
    form exists only in JAX's private ``jax._src.cudnn`` module and is not used.)
``'pallas_gpu'`` (GPU)
    JAX's Pallas/Triton flash attention (``jax.experimental.pallas.ops.gpu.attention.mha``)
    with ``segment_ids``. That kernel needs as many K/V heads as query heads, so for GQA
    K/V are repeated ``H/KV`` times (a documented copy this kernel forces). Off GPU it
    runs in Pallas interpret mode (the tests do so on CPU). Sequence length must be a
    multiple of 64 (or at most 32) and head_dim a power of two.

On a device mesh (the ``jax.set_mesh`` herd's train and generate steps run under) the two
Pallas kernels run under ``jax.shard_map``, each device on its own batch rows and heads,
so q/k/v are never gathered (XLA cannot see into a kernel to partition it). Decode over
the KV cache (:func:`decode_attention`) stays on the 'xla' path: one query row per step
is bound by reading the cache, which a fused kernel does not read faster.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

VALID_IMPLS = ("xla", "xla_chunked", "splash", "cudnn", "pallas_gpu")
# Above this many tokens the unchunked 'xla' path (T x T scores per head) is refused.
MAX_XLA_SEQ_LEN = 8192
DEFAULT_Q_CHUNK = 512
SPLASH_MIN_BLOCK = 128
_SPLASH_BLOCK = 512
_PALLAS_GPU_BLOCK = 64
# Query chunks up to this many are unrolled with block-causal key slicing; more use lax.map.
_MAX_UNROLLED_CHUNKS = 16


def check_attention_config(
    impl: str,
    seq_len: int,
    *,
    q_chunk: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
) -> None:
    """Raise ValueError (naming the value) for an attention set-up that cannot work.

    Call it before compiling (the model config's ``validate()`` can); :func:`attention`
    calls it too, at trace time, with the traced shapes.
    """
    if impl not in VALID_IMPLS:
        raise ValueError(
            f"unknown attention impl {impl!r}; valid ones are {', '.join(VALID_IMPLS)}"
        )
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"attention seq_len must be a positive int, got {seq_len!r}")
    if q_chunk is not None:
        if not isinstance(q_chunk, (int, np.integer)) or q_chunk <= 0:
            raise ValueError(f"attention q_chunk must be a positive int, got {q_chunk!r}")
        if impl not in ("xla", "xla_chunked"):
            raise ValueError(
                f"q_chunk={q_chunk} only applies to impl 'xla'/'xla_chunked', not {impl!r}"
            )
    if impl == "xla" and q_chunk is None and seq_len > MAX_XLA_SEQ_LEN:
        raise ValueError(
            f"attention impl 'xla' materialises seq_len x seq_len scores; seq_len={seq_len} "
            f"is above MAX_XLA_SEQ_LEN={MAX_XLA_SEQ_LEN}: use impl='xla_chunked' (or pass "
            f"q_chunk), or a fused kernel ('splash' on TPU, 'cudnn'/'pallas_gpu' on GPU)"
        )
    if impl == "splash" and seq_len % SPLASH_MIN_BLOCK:
        raise ValueError(
            f"attention impl 'splash' needs seq_len to be a multiple of {SPLASH_MIN_BLOCK}, "
            f"got seq_len={seq_len}"
        )
    if impl == "pallas_gpu":
        if seq_len > 32 and seq_len % _PALLAS_GPU_BLOCK:
            raise ValueError(
                f"attention impl 'pallas_gpu' needs seq_len <= 32 or a multiple of "
                f"{_PALLAS_GPU_BLOCK}, got seq_len={seq_len}"
            )
        if head_dim is not None and head_dim & (head_dim - 1):
            raise ValueError(
                f"attention impl 'pallas_gpu' needs a power-of-two head_dim, got {head_dim}"
            )
    if n_heads is not None and n_kv_heads is not None:
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
            )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
    causal: bool = True,
    q_chunk: int | None = None,
) -> jax.Array:
    """Scaled dot-product attention; see the module docstring for shapes and backends.

    Returns ``[B, T, H, D]`` in ``q.dtype``; rows whose segment id is 0 are zeros.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [B,T,H,D] and k/v [B,S,KV,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
    if impl == "xla_chunked" and q_chunk is None:
        q_chunk = DEFAULT_Q_CHUNK
    check_attention_config(impl, t, q_chunk=q_chunk, n_heads=h, n_kv_heads=kv, head_dim=d)
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids shape {segment_ids.shape} != (B, T) = {(b, t)}")
        if s != t:
            raise ValueError(f"segment_ids needs self-attention (S == T), got T={t}, S={s}")
        segment_ids = segment_ids.astype(jnp.int32)

    if impl in ("xla", "xla_chunked") and q_chunk is not None:
        out = _chunked(q, k, v, segment_ids, causal, min(int(q_chunk), t))
    elif impl == "xla":
        out = _xla(q, k, v, segment_ids, causal)
    elif impl == "splash":
        out = _per_device(functools.partial(_splash, causal=causal), q, k, v, segment_ids)
    elif impl == "cudnn":
        out = _cudnn(q, k, v, segment_ids, causal)
    else:  # pallas_gpu
        out = _per_device(functools.partial(_pallas_gpu, causal=causal), q, k, v, segment_ids)
    out = out.astype(q.dtype)
    if segment_ids is not None:
        out = out * (segment_ids != 0)[:, :, None, None].astype(out.dtype)
    return out


def _document_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: same document. Padding (0) attends to padding, so that no row is
    empty (those rows are zeroed at the end)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _xla(q, k, v, segment_ids, causal):
    mask = None if segment_ids is None else _document_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def _chunked(q, k, v, segment_ids, causal, chunk):
    """Query-chunked exact attention with a flash-attention style backward pass.

    Heads are laid out ``[B, KV, G, T, D]`` once per call so that every per-chunk product
    is a plain batched matmul over (B, KV) with the G query heads of a group stacked on
    the rows (no K/V copies, no per-chunk transposes). The forward keeps only the output
    and the log-sum-exp of each query row; the backward recomputes the probabilities
    from them (one exp, no max/sum/divide) and uses ``rowsum(dO * O)`` for the softmax
    Jacobian, as in FlashAttention-2 (Dao 2023, Algorithm 2), so nothing ``T x S`` is
    saved between the passes.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    n = -(-t // chunk)
    pad = n * chunk - t
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    seg = segment_ids
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        if seg is not None:  # padded query rows get their own (discarded) id
            seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    extents = _key_extents(n, chunk, k.shape[1], t, bool(causal))
    out = _flash(qh, kh, vh, seg, segment_ids, bool(causal), int(chunk), extents)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _key_extents(n: int, chunk: int, s: int, t: int, causal: bool) -> tuple[int, ...] | None:
    """Keys each query chunk reads: [0, (i + 1) * chunk) when causal self-attention (the
    masked upper triangle is never computed, about (n + 1) / 2n of the full work), for up
    to _MAX_UNROLLED_CHUNKS unrolled chunks; None means every chunk reads all S keys in a
    loop (long sequences, non-causal or cross attention)."""
    if causal and s == t and n <= _MAX_UNROLLED_CHUNKS:
        return tuple(min((i + 1) * chunk, s) for i in range(n))
    return None


def _allowed(qpos, seg_q, kpos, seg_k):
    """[B or 1, R, S] bool: query rows (positions ``qpos`` [R], segments ``seg_q`` [B, R]) may
    see keys (``kpos`` [S], ``seg_k`` [B, S]); None when nothing is masked."""
    allowed = None if qpos is None else (qpos[:, None] >= kpos[None, :])[None]
    if seg_k is not None:
        same = seg_q[:, :, None] == seg_k[:, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def _chunk_forward(qi, k, v, seg_q, seg_k, start, causal):
    """(output, log-sum-exp) of one query chunk qi [B, KV, G, C, D] against k/v [B, KV, S', D]."""
    stat = jnp.promote_types(qi.dtype, jnp.float32)
    c, s = qi.shape[3], k.shape[2]
    # The 1/sqrt(D) scale goes on the C x D queries, not on the C x S' scores.
    qs = qi * jnp.asarray(1.0 / math.sqrt(qi.shape[-1]), qi.dtype)
    scores = jnp.einsum("bkgcd,bksd->bkgcs", qs, k, preferred_element_type=stat)
    qpos = start + jnp.arange(c, dtype=jnp.int32) if causal else None
    allowed = _allowed(qpos, seg_q, jnp.arange(s, dtype=jnp.int32), seg_k)
    if allowed is not None:
        # A row with nothing allowed (a padded query row) gets a uniform softmax.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(stat).min)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgcs,bksd->bkgcd", p.astype(v.dtype), v, preferred_element_type=p.dtype)
    return (o / denom).astype(qi.dtype), (m + jnp.log(denom))[..., 0]


def _chunk_backward(qi, k, v, oi, lse, doi, seg_q, seg_k, start, causal):
    """(dq_i, dk, dv) of one query chunk against keys k/v [B, KV, S', D].

    Key-major: the S' x R probabilities (R = G x C query rows of a KV group) are recomputed
    transposed, so that every S' x R operand enters its matmuls in the layout it was made
    in (dV = P^T dO, dK = dS^T Q, dQ^T = K^T dS^T); only the small R x D and S' x D
    operands get transposed. Query-major, XLA copied P and dS to transpose them before
    dK/dV (18% of this function's time on CPU). The softmax scale multiplies the small
    products (Q before the scores, dQ and dK after), never an S' x R array.
    """
    b, kv, g, c, d = qi.shape
    s = k.shape[2]
    stat = jnp.promote_types(qi.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(d)
    q2, o2, do2 = (x.reshape(b, kv, g * c, d) for x in (qi, oi, doi))
    scores_t = jnp.einsum(
        "bksd,bkrd->bksr", k, q2 * jnp.asarray(scale, q2.dtype), preferred_element_type=stat
    )
    qpos = start + jnp.tile(jnp.arange(c, dtype=jnp.int32), g) if causal else None
    seg_r = None if seg_k is None else jnp.tile(seg_q, (1, g))
    allowed = _allowed(qpos, seg_r, jnp.arange(s, dtype=jnp.int32), seg_k)
    if allowed is not None:
        scores_t = jnp.where(allowed.swapaxes(1, 2)[:, None], scores_t, jnp.finfo(stat).min)
    p_t = jnp.exp(scores_t - lse.reshape(b, kv, 1, g * c))
    dp_t = jnp.einsum("bksd,bkrd->bksr", v, do2, preferred_element_type=stat)
    delta = jnp.sum(do2.astype(stat) * o2.astype(stat), axis=-1)  # rowsum(dO * O)
    ds_t = (p_t * (dp_t - delta[:, :, None, :])).astype(qi.dtype)
    dv = jnp.einsum("bksr,bkrd->bksd", p_t.astype(doi.dtype), do2, preferred_element_type=stat)
    dk = jnp.einsum("bksr,bkrd->bksd", ds_t, q2, preferred_element_type=stat) * scale
    dq = jnp.einsum("bksd,bksr->bkrd", k, ds_t, preferred_element_type=stat) * scale
    return dq.reshape(b, kv, g, c, d), dk, dv


def _chunks(x, chunk):
    """[B, KV, G, T, D] -> [n, B, KV, G, chunk, D] (T a multiple of chunk)."""
    b, kv, g, t, d = x.shape
    return x.reshape(b, kv, g, t // chunk, chunk, d).transpose(3, 0, 1, 2, 4, 5)


def _unchunk(x):
    n, b, kv, g, c, d = x.shape
    return x.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, n * c, d)


def _loop_inputs(seg_q, seg_k, n, chunk):
    """Per-chunk query segment ids [n, B, chunk] (None without segments) and start rows,
    the inputs of the loop over all-keys chunks in both passes."""
    seg_qc = None if seg_k is None else seg_q.reshape(-1, n, chunk).transpose(1, 0, 2)
    return seg_qc, jnp.arange(n, dtype=jnp.int32) * chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(qh, kh, vh, seg_q, seg_k, causal, chunk, extents):
    return _flash_fwd(qh, kh, vh, seg_q, seg_k, causal, chunk, extents)[0]


def _flash_fwd(qh, kh, vh, seg_q, seg_k, causal, chunk, extents):
    n = qh.shape[3] // chunk
    if extents is not None:
        outs, lses = [], []
        for i, e in enumerate(extents):
            sl = slice(i * chunk, (i + 1) * chunk)
            o, lse = _chunk_forward(
                qh[:, :, :, sl],
                kh[:, :, :e],
                vh[:, :, :e],
                None if seg_k is None else seg_q[:, sl],
                None if seg_k is None else seg_k[:, :e],
                i * chunk,
                causal,
            )
            outs.append(o)
            lses.append(lse)
        out, lse = jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)
    else:
        seg_qc, starts = _loop_inputs(seg_q, seg_k, n, chunk)

        def one(args):
            qi, sq, start = args
            return _chunk_forward(qi, kh, vh, sq, seg_k, start, causal)

        oc, lc = jax.lax.map(one, (_chunks(qh, chunk), seg_qc, starts))
        out = _unchunk(oc)
        lse = lc.transpose(1, 2, 3, 0, 4).reshape(lc.shape[1:4] + (n * chunk,))
    # Named so that remat policies can keep them (herd.lm.model's save_dots does): then
    # the backward pass does not re-run this forward to get its residuals.
    out = checkpoint_name(out, "attention_out")
    lse = checkpoint_name(lse, "attention_lse")
    return out, (qh, kh, vh, seg_q, seg_k, out, lse)


def _flash_bwd(causal, chunk, extents, res, dout):
    qh, kh, vh, seg_q, seg_k, out, lse = res
    n = qh.shape[3] // chunk
    stat = jnp.promote_types(qh.dtype, jnp.float32)
    if extents is not None:
        dqs = []
        dk = jnp.zeros(kh.shape, stat)
        dv = jnp.zeros(vh.shape, stat)
        for i, e in enumerate(extents):
            sl = slice(i * chunk, (i + 1) * chunk)
            dq_i, dk_i, dv_i = _chunk_backward(
                qh[:, :, :, sl],
                kh[:, :, :e],
                vh[:, :, :e],
                out[:, :, :, sl],
                lse[:, :, :, sl],
                dout[:, :, :, sl],
                None if seg_k is None else seg_q[:, sl],
                None if seg_k is None else seg_k[:, :e],
                i * chunk,
                causal,
            )
            dqs.append(dq_i)
            dk = dk.at[:, :, :e].add(dk_i)
            dv = dv.at[:, :, :e].add(dv_i)
        dq = jnp.concatenate(dqs, axis=3)
    else:
        seg_qc, starts = _loop_inputs(seg_q, seg_k, n, chunk)
        lse_c = lse.reshape(lse.shape[:3] + (n, chunk)).transpose(3, 0, 1, 2, 4)

        def one(carry, args):
            dk, dv = carry
            qi, oi, li, doi, sq, start = args
            dq_i, dk_i, dv_i = _chunk_backward(qi, kh, vh, oi, li, doi, sq, seg_k, start, causal)
            return (dk + dk_i, dv + dv_i), dq_i

        zeros = (jnp.zeros(kh.shape, stat), jnp.zeros(vh.shape, stat))
        xs = (_chunks(qh, chunk), _chunks(out, chunk), lse_c, _chunks(dout, chunk), seg_qc, starts)
        (dk, dv), dqc = jax.lax.scan(one, zeros, xs)
        dq = _unchunk(dqc)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _kernel_specs(mesh, batch: int, kv_heads: int):
    """PartitionSpecs for a kernel's q/k/v ``[B, T, heads, D]`` and segment ids ``[B, T]``
    on ``mesh``: the batch split over the data-parallel axes and the heads over 'tensor',
    as the activations are (LM_RULES), so calling the kernel moves no data. An axis that
    does not divide the batch (or the KV heads) is left out, i.e. that dimension is
    replicated for the kernel call."""
    from jax.sharding import PartitionSpec as P

    from herd.core.mesh import BATCH_AXES

    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if batch_axes and batch % math.prod(sizes[a] for a in batch_axes):
        batch_axes = ()
    tensor = sizes.get("tensor", 1)
    heads = "tensor" if tensor > 1 and kv_heads % tensor == 0 else None
    batch_spec = batch_axes if batch_axes else None
    return P(batch_spec, None, heads, None), P(batch_spec, None)


def _per_device(kernel, q, k, v, segment_ids):
    """``kernel(q, k, v, segment_ids)`` on each device's block under ``jax.shard_map``.

    A Pallas kernel is opaque to XLA's sharding propagation: called on arrays sharded over
    a mesh, XLA would gather q/k/v onto every device first. Under the mesh set with
    ``jax.set_mesh`` (as herd's train and generate steps run) each device instead runs
    the kernel on its own batch rows and heads; attention is independent across both,
    so no communication is needed. Without a mesh (or one device) the kernel is called
    directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    qkv_spec, seg_spec = _kernel_specs(mesh, q.shape[0], k.shape[2])
    if segment_ids is None:
        fn = jax.shard_map(
            lambda q_, k_, v_: kernel(q_, k_, v_, None),
            mesh=mesh,
            in_specs=(qkv_spec, qkv_spec, qkv_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return fn(q, k, v, segment_ids)


def _splash_kernel(n_heads: int, t: int, s: int, causal: bool, interpret: bool):
    # Built per trace (not cached: its mask-info arrays would leak tracers across traces).
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (t, s)
    head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    mask = sa.MultiHeadMask([head_mask] * n_heads)
    bq, bkv = min(_SPLASH_BLOCK, t), min(_SPLASH_BLOCK, s)
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return sa.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash(q, k, v, segment_ids, causal):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    s = k.shape[1]
    interpret = jax.default_backend() != "tpu"
    kernel = _splash_kernel(h, t, s, bool(causal), interpret)
    # The kernel does not scale: fold 1/sqrt(D) into q (as MaxText does).
    qt = (q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)  # [B,H,T,D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,KV,S,D]
    if segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        seg = sa.SegmentIds(q=segment_ids, kv=segment_ids)
        out = jax.vmap(lambda q_, k_, v_, sg: kernel(q_, k_, v_, segment_ids=sg))(qt, kt, vt, seg)
    return out.transpose(0, 2, 1, 3)


def _cudnn(q, k, v, segment_ids, causal):
    mask = None if segment_ids is None else _document_mask(segment_ids)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation="cudnn"
    )


def _pallas_gpu(q, k, v, segment_ids, causal):
    from jax.experimental.pallas.ops.gpu import attention as pa

    b, t, h, d = q.shape
    g = h // k.shape[2]
    if g > 1:  # the kernel indexes K/V with the query head: repeat (documented copy)
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    blk = min(_PALLAS_GPU_BLOCK, t)
    blocks = pa.BlockSizes(
        block_q=blk,
        block_k=blk,
        block_q_dkv=min(32, t),
        block_kv_dkv=min(32, t),
        block_q_dq=min(32, t),
        block_kv_dq=min(32, t),
    )
    return pa.mha(
        q,
        k,
        v,
        segment_ids,
        sm_scale=1.0 / math.sqrt(d),
        causal=causal,
        block_sizes=blocks,
        interpret=jax.default_backend() != "gpu",
    )


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    k_positions: jax.Array,
) -> jax.Array:
    """Attention of new queries over a KV cache (prefill and decode), on the 'xla' path.

    ``q`` ``[B, T, H, D]``, ``k``/``v`` ``[B, S, KV, D]`` (the cache; grouped heads are not
    repeated), ``q_positions`` ``[B, T]`` and ``k_positions`` ``[B, S]`` int: the token
    positions of queries and keys, negative for padding and for empty cache slots. A query
    sees the valid keys at positions ``<=`` its own (query and key lengths may differ).
    Padding query rows (negative position) return zeros. Returns ``[B, T, H, D]`` in
    ``q.dtype``.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"decode_attention expects q [B,T,H,D], k/v [B,S,KV,D]; got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    b, t = q.shape[:2]
    s = k.shape[1]
    if q_positions.shape != (b, t) or k_positions.shape != (b, s):
        raise ValueError(
            f"q_positions {q_positions.shape} / k_positions {k_positions.shape} do not match "
            f"(B, T) = {(b, t)} / (B, S) = {(b, s)}"
        )
    qp = q_positions.astype(jnp.int32)[:, :, None]
    kp = k_positions.astype(jnp.int32)[:, None, :]
    q_valid = qp >= 0
    # Padding query rows see every slot (so no softmax row is empty); zeroed below.
    mask = ((kp >= 0) & (kp <= qp)) | ~q_valid
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None], implementation="xla"
    )
    return (out * q_valid[..., None].astype(out.dtype)).astype(q.dtype)
