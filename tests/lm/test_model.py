"""Tests for herd.lm.model, herd.lm.presets and herd.lm.convert: presets, RoPE, HF parity
(live and golden), packing, scan/remat, bf16, the model with the chunked loss, layouts and
config errors. CPU, tiny shapes. The loss alone: tests/lm/test_loss.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.lm.config import REMAT_POLICIES, LlamaConfig
from herd.lm.convert import (
    config_from_hf,
    meta_to_hf_qk,
    params_from_hf,
    params_to_hf,
    stack_layers,
    unstack_layers,
)
from herd.lm.loss import chunked_cross_entropy
from herd.lm.model import (
    Llama,
    apply_rope,
    output_embedding,
    rope_cos_sin,
    rope_inv_freq,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden")
CASES = ("mha", "gqa", "rope_scaling", "tied")

TINY = LlamaConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=48, max_seq_len=64
)


@functools.cache
def _init(cfg, seed=0):
    init = jax.jit(lambda rng: Llama(cfg).init(rng, jnp.zeros((1, 4), jnp.int32)))
    return nn.meta.unbox(init(jax.random.PRNGKey(seed)))["params"]


@functools.cache
def _apply_fn(cfg, return_hidden=False):
    def f(params, tokens, positions=None, segment_ids=None):
        return Llama(cfg).apply(
            {"params": params}, tokens, positions, segment_ids, return_hidden=return_hidden
        )

    return jax.jit(f)


def _tokens(cfg, b=2, t=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


# --------------------------------------------------------------------------- presets

# Published totals (the papers' model tables) where given; otherwise the well-known totals:
# LLaMA 1 paper sizes 6.7B/13.0B/32.5B/65.2B (7B: 6.74B as Llama 2-7B), Code Llama = the
# Llama 2 shapes plus 16 extra vocabulary rows (x2 for embedding and head) for 7B/13B/70B,
# and 33.7B for Code Llama 34B (its HF checkpoint size).
PUBLISHED = {
    "llama1-7b": 6.74e9,
    "llama1-13b": 13.0e9,
    "llama1-33b": 32.5e9,
    "llama1-65b": 65.2e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
    "llama2-70b": 69.0e9,
    "code-llama-7b": 6.74e9 + 2 * 16 * 4096,
    "code-llama-13b": 13.0e9 + 2 * 16 * 5120,
    "code-llama-34b": 33.7e9,
    "code-llama-70b": 69.0e9 + 2 * 16 * 8192,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.6e9,
    "llama3.1-405b": 405.9e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
}
# FFN widths of the released checkpoints (intermediate_size in their HF configs); the
# presets derive them with Meta's rule.
FFN = {
    "llama1-7b": 11008,
    "llama1-13b": 13824,
    "llama1-33b": 17920,
    "llama1-65b": 22016,
    "llama2-70b": 28672,
    "code-llama-34b": 22016,
    "llama3-8b": 14336,
    "llama3-70b": 28672,
    "llama3.1-405b": 53248,
    "llama3.2-1b": 8192,
    "llama3.2-3b": 8192,
}


def test_every_preset_has_a_published_total():
    assert sorted(PUBLISHED) == sorted(LlamaConfig.presets())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count(name):
    cfg = LlamaConfig.preset(name)
    n = cfg.num_params()
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.005, (name, n)
    if name in FFN:
        assert cfg.hidden_dim == FFN[name]


def test_preset_details():
    assert LlamaConfig.preset("llama2-7b").hidden_dim == 11008
    assert LlamaConfig.preset("llama1-7b").norm_eps == 1e-6
    assert LlamaConfig.preset("llama3-8b").rope_theta == 5e5
    assert LlamaConfig.preset("code-llama-7b").rope_theta == 1e6
    assert LlamaConfig.preset("code-llama-7b").vocab_size == 32016
    assert LlamaConfig.preset("code-llama-34b").vocab_size == 32000
    assert LlamaConfig.preset("llama3.1-8b").rope_scaling["factor"] == 8
    assert LlamaConfig.preset("llama3.2-1b").rope_scaling["factor"] == 32
    assert LlamaConfig.preset("llama3.2-1b").tie_embeddings
    assert not LlamaConfig.preset("llama3.1-8b").tie_embeddings
    assert LlamaConfig.preset("llama2-7b").optimizer_eps == 1e-5
    c = LlamaConfig.preset("llama3-8b", n_layers=2, dtype="bfloat16")
    assert c.n_layers == 2 and c.dtype == "bfloat16"
    # head_dim 128 everywhere except the 1B/3B (64/128)
    assert LlamaConfig.preset("llama1-33b").head_dim == 128
    assert LlamaConfig.preset("llama3.2-1b").head_dim == 64
    # non-embedding count keeps the head (used for 6N FLOPs)
    c8 = LlamaConfig.preset("llama3-8b")
    assert c8.num_params() - c8.num_params(include_embeddings=False) == 128256 * 4096
    hash(LlamaConfig.preset("llama3.1-8b"))  # hashable despite the rope_scaling dict


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(dim=30), "dim=30 is not divisible by n_heads=4"),
        (dict(dim=12, n_heads=4, n_kv_heads=4), "head_dim=3"),
        (dict(remat_policy="sometimes"), "remat_policy 'sometimes'"),
        (dict(attention_impl="flash9"), "flash9"),
        (dict(dtype="float8"), "dtype 'float8'"),
        (dict(n_layers=0), "n_layers must be a positive int, got 0"),
        (dict(rope_scaling={"factor": 8.0}), "missing keys"),
        (
            dict(
                rope_scaling={
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                }
            ),
            "high_freq_factor > low_freq_factor",
        ),
        (dict(attention_impl="splash", attention_q_chunk=128), "q_chunk=128"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**kw)


def test_every_attention_impl_accepted():
    for impl in ("xla", "xla_chunked", "splash", "cudnn", "pallas_gpu"):
        assert TINY.replace(attention_impl=impl).attention_impl == impl
    with pytest.raises(ValueError, match="head_dim"):
        TINY.replace(dim=48, n_heads=4, n_kv_heads=2, attention_impl="pallas_gpu")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="llama3-8b.*llama3.2-3b|valid presets: llama1-7b"):
        LlamaConfig.preset("llama4-8b")
    with pytest.raises(ValueError, match="'llama4-8b'"):
        LlamaConfig.preset("llama4-8b")


def test_seq_len_above_max_raises():
    cfg = TINY.replace(max_seq_len=8)
    with pytest.raises(ValueError, match="sequence length 16 exceeds max_seq_len=8"):
        jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), int)))


# --------------------------------------------------------------------------- RoPE


def _np_inv_freq(head_dim, theta, scaling):
    """Independent float64 reference: loop over frequencies, explicit bands."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        if scaling:
            factor, lo, hi = (
                scaling["factor"],
                scaling["low_freq_factor"],
                scaling["high_freq_factor"],
            )
            old = scaling["original_max_position_embeddings"]
            wl = 2 * math.pi / f
            if wl < old / hi:
                pass
            elif wl > old / lo:
                f = f / factor
            else:
                a = (old / wl - lo) / (hi - lo)
                f = (1 - a) * f / factor + a * f
        out.append(f)
    return np.array(out)


def _np_rope(x, positions, inv):
    """Half-split rotation as complex multiplication: (x_i + j x_{i+D/2}) * e^{j p w_i}."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    rot = np.exp(1j * positions[:, :, None, None] * inv[None, None, None, :])
    z = z * rot
    return np.concatenate([z.real, z.imag], axis=-1)


SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@pytest.mark.parametrize("scaling", [None, SCALING], ids=["plain", "llama3.1"])
def test_rope_against_numpy(scaling):
    hd, theta = 16, 5e5
    inv_ref = _np_inv_freq(hd, theta, scaling)
    np.testing.assert_allclose(rope_inv_freq(hd, theta, scaling), inv_ref, rtol=2e-6)
    if scaling:  # all three bands occur for this head_dim / theta / context
        wl = 2 * math.pi / _np_inv_freq(hd, theta, None)
        assert (wl < 64).any() and (wl > 256).any() and ((wl >= 64) & (wl <= 256)).any()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3, hd)).astype(np.float32)
    pos = rng.integers(0, 3000, (2, 12)).astype(np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(pos), hd, theta, scaling)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(got, _np_rope(x.astype(np.float64), pos, inv_ref), atol=2e-4)


def test_llama31_preset_frequencies():
    c = LlamaConfig.preset("llama3.1-8b")
    got = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    np.testing.assert_allclose(got, _np_inv_freq(128, 5e5, c.rope_scaling), rtol=2e-6)


def test_meta_permutation_matches_interleaved_rope():
    """Meta's interleaved RoPE on unpermuted wq == half-split RoPE on meta_to_hf_qk(wq)."""
    rng = np.random.default_rng(0)
    h, hd, d = 2, 8, 16
    w_meta = rng.standard_normal((h * hd, d))
    x = rng.standard_normal((1, 5, d))
    pos = np.arange(5)[None]
    inv = _np_inv_freq(hd, 1e4, None)
    q = (x @ w_meta.T).reshape(1, 5, h, hd)
    z = q[..., 0::2] + 1j * q[..., 1::2]  # Meta: pairs (2i, 2i+1)
    z = z * np.exp(1j * pos[:, :, None, None] * inv)
    meta = np.stack([z.real, z.imag], axis=-1).reshape(1, 5, h, hd)
    q_hf = (x @ meta_to_hf_qk(w_meta, h).T).reshape(1, 5, h, hd)
    hf = _np_rope(q_hf, pos, inv)
    # the same vectors up to the fixed permutation of each head's dimensions
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    np.testing.assert_allclose(hf, meta[..., perm], atol=1e-12)


# --------------------------------------------------------------------------- HF parity


def _golden(case):
    z = np.load(os.path.join(GOLDEN, f"lm_{case}.npz"))
    sd = {k[3:]: z[k] for k in z.files if k.startswith("hf/")}
    return z, json.loads(str(z["config_json"])), sd


def _made_by(z) -> str:
    """The torch / transformers versions a golden file records (tools/make_golden_lm.py)."""
    keys = ("torch_version", "transformers_version")
    missing = [k for k in keys if k not in z.files or not str(z[k])]
    assert not missing, f"golden file without {missing}: rerun tools/make_golden_lm.py"
    return ", ".join(f"{k.split('_')[0]} {z[k]}" for k in keys)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("case", CASES)
def test_golden_logits(case, scan):
    z, hf_cfg, sd = _golden(case)
    print(f"lm_{case}.npz made with {_made_by(z)}")
    cfg = config_from_hf(hf_cfg, scan_layers=scan)
    assert cfg.tie_embeddings == (case == "tied")
    assert (cfg.rope_scaling is not None) == (case == "rope_scaling")
    params = params_from_hf(sd, cfg)
    out = _apply_fn(cfg)(params, jnp.asarray(z["tokens"]), jnp.asarray(z["positions"]))
    assert out.dtype == jnp.float32
    diff = float(np.abs(np.asarray(out) - z["logits"]).max())
    assert diff <= 1e-4, diff
    if case == "rope_scaling":  # the scaling really matters for these positions
        plain = _apply_fn(cfg.replace(rope_scaling=None))(
            params, jnp.asarray(z["tokens"]), jnp.asarray(z["positions"])
        )
        assert float(np.abs(np.asarray(plain) - z["logits"]).max()) > 1e-2


def test_hf_conversion_round_trip():
    z, hf_cfg, sd = _golden("gqa")
    for scan in (True, False):
        cfg = config_from_hf(hf_cfg, scan_layers=scan)
        back = params_to_hf(params_from_hf(sd, cfg), cfg)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


def _golden_tool():
    path = os.path.join(ROOT, "tools", "make_golden_lm.py")
    spec = importlib.util.spec_from_file_location("make_golden_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", CASES)
def test_live_hf_parity(case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tool = _golden_tool()
    model, kwargs = tool.build_hf(case, seed=7)  # other weights than the golden files
    tokens, positions = tool.inputs(case, seed=7)
    ref = tool.hf_logits(model, tokens, positions)
    cfg = config_from_hf(model.config)
    params = params_from_hf(model.state_dict(), cfg)
    out = _apply_fn(cfg)(params, jnp.asarray(tokens), jnp.asarray(positions))
    diff = float(np.abs(np.asarray(out) - ref).max())
    assert diff <= 1e-4, diff
    # and back: herd params -> HF state dict loads into HF and gives the same logits
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(params, cfg).items()}
    model.load_state_dict(sd)
    np.testing.assert_allclose(tool.hf_logits(model, tokens, positions), ref, atol=1e-6)


# --------------------------------------------------------------------------- packing


def test_packed_documents_equal_documents_alone():
    cfg = TINY
    params = _init(cfg)
    rng = np.random.default_rng(3)
    lens = [5, 7, 3]  # three documents, then 1 padding token
    docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lens]
    t = sum(lens) + 1
    tokens = np.zeros((1, t), np.int32)
    seg = np.zeros((1, t), np.int32)
    pos = np.zeros((1, t), np.int32)
    start = 0
    for i, d in enumerate(docs):
        tokens[0, start : start + len(d)] = d
        seg[0, start : start + len(d)] = i + 1
        pos[0, start : start + len(d)] = np.arange(len(d))
        start += len(d)
    packed = _apply_fn(cfg)(params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    # each document alone at the start of its own row (causal: what follows cannot matter),
    # plus the packed row without segment_ids
    rows = np.zeros((4, t), np.int32)
    rows_pos = np.broadcast_to(np.arange(t, dtype=np.int32), (4, t)).copy()
    for i, d in enumerate(docs):
        rows[i, : len(d)] = d
    rows[3], rows_pos[3] = tokens[0], pos[0]
    alone = _apply_fn(cfg)(params, jnp.asarray(rows), jnp.asarray(rows_pos))
    start = 0
    for i, d in enumerate(docs):
        np.testing.assert_allclose(packed[0, start : start + len(d)], alone[i, : len(d)], atol=1e-5)
        start += len(d)
    # without segment_ids the second document would see the first
    assert float(np.abs(alone[3, 5:12] - packed[0, 5:12]).max()) > 1e-3


# --------------------------------------------------------------------------- scan / remat


def _loss_fn(cfg):
    model = Llama(cfg)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))


def _assert_tree_close(a, b, atol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def test_scan_unrolled_and_remat_policies_agree():
    tokens = _tokens(TINY, t=17)
    base = TINY.replace(scan_layers=True, remat_policy="none")
    params = _init(base)
    ref_loss, ref_grads = _loss_fn(base)(params, tokens)
    flat = unstack_layers(params)
    # every policy under scan; the unrolled layout with and without remat
    runs = [(True, p) for p in REMAT_POLICIES if p != "none"] + [(False, "none"), (False, "full")]
    for scan, policy in runs:
        cfg = TINY.replace(scan_layers=scan, remat_policy=policy)
        loss, grads = _loss_fn(cfg)(params if scan else flat, tokens)
        if not scan:
            grads = stack_layers(grads)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5, (scan, policy)
        _assert_tree_close(grads, ref_grads, 1e-5)


def test_stack_unstack_and_scanned_init_layout():
    params = _init(TINY)
    assert params["layers"]["attention"]["wq"].shape == (2, 32, 4, 8)
    assert params["layers"]["attention"]["wk"].shape == (2, 32, 2, 8)
    assert params["layers"]["attention"]["wo"].shape == (2, 4, 8, 32)
    assert params["layers"]["feed_forward"]["w2"].shape == (2, 48, 32)
    flat = unstack_layers(params)
    assert sorted(flat) == ["layers_0", "layers_1", "norm", "output", "tok_embeddings"]
    unrolled = _init(TINY.replace(scan_layers=False))
    assert jax.tree_util.tree_structure(flat) == jax.tree_util.tree_structure(unrolled)
    _assert_tree_close(stack_layers(flat), params, 0)
    wrapped = stack_layers({"params": flat})
    _assert_tree_close(wrapped["params"], params, 0)


def test_every_param_has_logical_axes():
    for scan in (True, False):
        cfg = TINY.replace(scan_layers=scan)
        boxed = jax.eval_shape(
            lambda cfg=cfg: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
        )["params"]
        leaves = jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
        allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}
        for path, leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), path
            assert len(leaf.names) == leaf.value.ndim, path
            assert set(leaf.names) <= allowed, (path, leaf.names)
            if scan and "layers" in jax.tree_util.keystr(path):
                assert leaf.names[0] == "layers"


def test_param_dtype_and_bf16_compute():
    tokens = _tokens(TINY)
    params = _init(TINY)
    ref = _apply_fn(TINY)(params, tokens)
    cfg16 = TINY.replace(dtype="bfloat16")
    out = _apply_fn(cfg16)(params, tokens)
    hid = _apply_fn(cfg16, True)(params, tokens)
    assert out.dtype == jnp.float32 and hid.dtype == jnp.bfloat16
    # bf16 compute (float32 params, norms, softmax statistics and logits): stated tolerance
    # 5% of the largest logit magnitude; observed ~1%.
    err = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
    assert err < 0.05, err
    p16 = _init(TINY.replace(param_dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("tied", [False, True])
def test_model_hidden_with_chunked_loss_equals_logits_loss(tied):
    cfg = TINY.replace(tie_embeddings=tied)
    params = _init(cfg)
    tokens = _tokens(cfg, t=17)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = jnp.ones(targets.shape, jnp.float32)
    logits = _apply_fn(cfg)(params, inputs)
    ref = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    hidden = _apply_fn(cfg, True)(params, inputs)
    emb = output_embedding(params, cfg)
    assert emb.shape == (cfg.dim, cfg.vocab_size)
    val, n = chunked_cross_entropy(hidden, emb, targets, mask, 16)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    assert float(n) == targets.size
