"""Next-token cross-entropy from final hidden states, without materialising the logits.

``chunked_cross_entropy(hidden, out_embedding, targets, loss_mask, chunk_size)`` takes the
model's ``return_hidden=True`` output and ``herd.lm.model.output_embedding(params, cfg)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _chunk_logits(h, w, i, chunk, vocab):
    wc = jax.lax.dynamic_slice_in_dim(w, i * chunk, chunk, axis=1).astype(h.dtype)
    logits = jnp.dot(h, wc, preferred_element_type=jnp.float32)
    col = i * chunk + jnp.arange(chunk)
    return jnp.where(col[None, :] < vocab, logits, -jnp.inf), col


def _chunked_forward(h, w, t, chunk, vocab):
    n = h.shape[0]
    n_chunks = w.shape[1] // chunk

    def body(i, carry):
        m, s, tgt = carry
        logits, col = _chunk_logits(h, w, i, chunk, vocab)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=-1)
        tgt = tgt + jnp.where(col[None, :] == t[:, None], logits, 0.0).sum(axis=-1)
        return m_new, s, tgt

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    m, s, tgt = jax.lax.fori_loop(0, n_chunks, body, init + (jnp.zeros((n,), jnp.float32),))
    return m + jnp.log(s), tgt


def _make_chunked_nll(chunk: int, vocab: int):
    @jax.custom_vjp
    def nll(h, w, t, mask):
        lse, tgt = _chunked_forward(h, w, t, chunk, vocab)
        return jnp.sum((lse - tgt) * mask)

    def fwd(h, w, t, mask):
        lse, tgt = _chunked_forward(h, w, t, chunk, vocab)
        return jnp.sum((lse - tgt) * mask), (h, w, t, mask, lse)

    def bwd(res, g):
        h, w, t, mask, lse = res
        scale = (mask * g)[:, None]

        def body(i, carry):
            dh, dw = carry
            logits, col = _chunk_logits(h, w, i, chunk, vocab)
            p = jnp.exp(logits - lse[:, None])
            dlog = ((p - (col[None, :] == t[:, None])) * scale).astype(h.dtype)
            wc = jax.lax.dynamic_slice_in_dim(w, i * chunk, chunk, axis=1).astype(h.dtype)
            dh = dh + jnp.dot(dlog, wc.T, preferred_element_type=jnp.float32)
            dwc = jnp.dot(h.T, dlog, preferred_element_type=jnp.float32).astype(w.dtype)
            dw = jax.lax.dynamic_update_slice_in_dim(dw, dwc, i * chunk, axis=1)
            return dh, dw

        dh0 = jnp.zeros(h.shape, jnp.float32)
        dh, dw = jax.lax.fori_loop(0, w.shape[1] // chunk, body, (dh0, jnp.zeros_like(w)))
        t_ct = np.zeros(t.shape, jax.dtypes.float0)
        return dh.astype(h.dtype), dw, t_ct, jnp.zeros_like(mask)

    nll.defvjp(fwd, bwd)
    return nll


@jax.custom_vjp
def _full_nll(logits, t, mask):
    """sum(mask * (logsumexp(logits) - logits[t])) over rows of [N, vocab] float32 logits.

    Its own backward, (softmax - onehot(t)) * mask in one elementwise pass, replaces
    autodiff's scatter of the target-logit gradient into an [N, vocab] zero array
    (measured on the 30M bench shape: head + loss fwd+bwd 644 -> 599 ms)."""
    return _full_nll_fwd(logits, t, mask)[0]


def _full_nll_fwd(logits, t, mask):
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - tgt) * mask), (logits, lse, t, mask)


def _full_nll_bwd(res, g):
    logits, lse, t, mask = res
    onehot = jnp.arange(logits.shape[1], dtype=t.dtype)[None, :] == t[:, None]
    dlogits = (jnp.exp(logits - lse[:, None]) - onehot) * (mask * g)[:, None]
    return dlogits, np.zeros(t.shape, jax.dtypes.float0), jnp.zeros_like(mask)


_full_nll.defvjp(_full_nll_fwd, _full_nll_bwd)


def chunked_cross_entropy(hidden, out_embedding, targets, loss_mask, chunk_size=None):
    """Summed next-token NLL and token count, without [B, T, vocab] logits.

    hidden [B, T, dim] (compute dtype), out_embedding [dim, vocab], targets int [B, T],
    loss_mask [B, T] (1 = counted). The vocabulary is processed ``chunk_size`` columns at a
    time with an online log-sum-exp; the backward pass recomputes each chunk's logits
    (custom VJP), so memory is O(B*T*chunk). Logits are float32.
    ``chunk_size=None`` or ``>= vocab``: one plain full-logits cross-entropy.
    Returns (sum_nll float32 scalar, n_tokens float32 scalar).
    """
    d = hidden.shape[-1]
    vocab = out_embedding.shape[1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    mask = loss_mask.reshape(-1).astype(jnp.float32)
    n_tokens = jnp.sum(mask)
    if chunk_size is None or chunk_size >= vocab:
        logits = jnp.dot(h, out_embedding.astype(h.dtype), preferred_element_type=jnp.float32)
        return _full_nll(logits, t, mask), n_tokens
    pad = (-vocab) % chunk_size
    w = jnp.pad(out_embedding, ((0, 0), (0, pad))) if pad else out_embedding
    nll = _make_chunked_nll(int(chunk_size), int(vocab))(h, w, t, mask)
    return nll, n_tokens
