"""Optimisers (AdamW, LAMB, SGD), schedules, masks and lr rules."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from herd.core.optim import (
    DEIT3_NO_DECAY,
    decay_mask,
    make_optimizer,
    make_schedule,
    preset,
    validate,
    vit_layer_decay,
    warmup_cosine,
)


def _tree(rng, shapes, scale=1.0):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _run(tx, params, grads_seq):
    """Applies `tx` for each grads tree; returns (params, last updates, state)."""
    state = tx.init(params)
    updates = None
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, updates, state


# ------------------------------------------------------------------------- schedules


def test_warmup_cosine_values():
    s = warmup_cosine(1.0, warmup_steps=10, total_steps=110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine
    assert float(s(110)) == pytest.approx(0.1)  # floor: 10% of the peak
    assert float(s(500)) == pytest.approx(0.1)
    vals = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b - 1e-7 for a, b in zip(vals, vals[1:], strict=False))


def test_schedule_start_lr_and_absolute_floor_closed_form():
    peak, start, floor, w, total = 2e-3, 1e-6, 1e-5, 20, 220
    cfg = dict(lr=peak, warmup_steps=w, start_lr=start, min_lr=floor)
    s = make_schedule(cfg, total)
    for t in (0, 7, 19):
        assert float(s(t)) == pytest.approx(start + t * (peak - start) / w, rel=1e-5)
    for t in (20, 50, 120, 219, 220):
        want = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * (t - w) / (total - w)))
        assert float(s(t)) == pytest.approx(want, rel=1e-5)
    assert float(s(10_000)) == pytest.approx(floor, rel=1e-6)


def test_deit3_schedule_per_epoch():
    # DEIT3_LAMB: 5 warmup epochs from 1e-6, cosine clock from epoch 0 (timm), floor 1e-5.
    spe, epochs = 7, 40
    cfg = preset("deit3")
    s = make_schedule(cfg, epochs * spe, steps_per_epoch=spe)
    peak, start, floor = cfg["lr"], cfg["start_lr"], cfg["min_lr"]
    assert float(s(0)) == pytest.approx(start)
    for e in range(epochs + 3):
        first = float(s(e * spe))
        # constant within an epoch
        assert all(float(s(e * spe + j)) == first for j in range(1, spe))
        if e < 5:
            want = start + e * (peak - start) / 5
        else:
            want = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * min(e, epochs) / epochs))
        assert first == pytest.approx(want, rel=1e-5), e
    assert float(s(epochs * spe)) == pytest.approx(floor)


def test_constant_schedule():
    s = make_schedule({"lr": 0.25, "schedule": "constant"}, 10)
    assert [float(s(t)) for t in (0, 5, 100)] == [0.25, 0.25, 0.25]


# ----------------------------------------------------------------------------- masks


def test_decay_mask():
    params = {
        "tok_embeddings": {"embedding": jnp.zeros((10, 4))},
        "layers": {
            "attention": {"wq": jnp.zeros((2, 4, 2, 2))},
            "attention_norm": {"scale": jnp.zeros((2, 4))},  # scanned: 2-D but a norm
            "ls": {"gamma": jnp.zeros((2, 4))},  # scanned LayerScale: 1-D per layer
        },
        "norm": {"scale": jnp.zeros((4,))},
        "output": {"kernel": jnp.zeros((4, 10)), "bias": jnp.zeros((10,))},
        "pos_embed": jnp.zeros((1, 5, 4)),
    }
    m = decay_mask(params)
    assert m["tok_embeddings"]["embedding"] is True  # Meta decays every matrix
    assert m["layers"]["attention"]["wq"] is True
    assert m["layers"]["attention_norm"]["scale"] is False
    assert m["layers"]["ls"]["gamma"] is True  # rank 2 unless the stack is declared
    assert m["norm"]["scale"] is False
    assert m["output"]["kernel"] is True and m["output"]["bias"] is False
    assert m["pos_embed"] is True
    m = decay_mask(params, DEIT3_NO_DECAY, stacked=r"^layers/")
    assert m["layers"]["ls"]["gamma"] is False and m["layers"]["attention"]["wq"] is True
    assert m["pos_embed"] is False


# ------------------------------------------------------------------------ optimisers


def test_adamw_decays_only_masked():
    tx, _ = make_optimizer(
        {"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.5, "schedule": "constant"}, 10
    )
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_global_norm_clipping(factor):
    """SGD without momentum at lr 1 shows the clipped gradient itself."""
    rng = np.random.default_rng(0)
    params = _tree(rng, {"a": (3, 4), "b": {"c": (5,)}})
    grads = _tree(rng, {"a": (3, 4), "b": {"c": (5,)}}, scale=factor)
    cfg = dict(optimizer="sgd", lr=1.0, schedule="constant", momentum=0.0, clip_norm=1.0)
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]).astype(np.float64)
    u = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)]).astype(np.float64)
    norm = np.linalg.norm(g)
    want = -g / max(norm, 1.0)  # scaled down to norm 1 only when above it
    np.testing.assert_allclose(u, want, rtol=1e-5)
    assert np.linalg.norm(u) == pytest.approx(min(norm, 1.0), rel=1e-5)
    if norm < 1.0:  # below the threshold the gradient passes untouched
        np.testing.assert_array_equal(u, -g)


def _old_llama_adamw(optim_cfg, total_steps):
    """The pre-LAMB construction of herd's make_optimizer, verbatim in behaviour."""
    w = int(max(0, min(optim_cfg["warmup_steps"], total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg["lr"],
        warmup_steps=w,
        decay_steps=max(int(total_steps), w + 1),
        end_value=optim_cfg["lr"] * optim_cfg.get("min_lr_ratio", 0.1),
    )
    pattern = re.compile(r"(^|/)([^/]*norm[^/]*|scale|bias)(/|$)")

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: bool(
                jnp.ndim(x) >= 2
                and not pattern.search("/".join(str(getattr(k, "key", k)) for k in path))
            ),
            params,
        )

    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.get("clip_norm", 1.0)),
        optax.adamw(
            schedule,
            b1=optim_cfg.get("b1", 0.9),
            b2=optim_cfg.get("b2", 0.95),
            eps=optim_cfg.get("eps", 1e-5),
            weight_decay=optim_cfg.get("weight_decay", 0.1),
            mask=mask,
        ),
    )
    return tx, schedule


@pytest.mark.parametrize(
    "cfg",
    [
        preset("llama", lr=3e-2, warmup_steps=3),
        {"lr": 1e-2, "warmup_steps": 2},  # the trainers' tests pass only these
    ],
)
def test_llama_adamw_bitwise_as_before(cfg):
    rng = np.random.default_rng(1)
    shapes = {
        "tok_embeddings": {"embedding": (11, 6)},
        "layers": {"attention": {"wq": (2, 6, 6)}, "attention_norm": {"scale": (2, 6)}},
        "norm": {"scale": (6,)},
        "output": {"kernel": (6, 11)},
    }
    params = _tree(rng, shapes)
    grads_seq = [_tree(rng, shapes, scale=s) for s in (0.1, 5.0, 0.3, 2.0, 0.01)]
    tx_new, s_new = make_optimizer(dict(cfg), 20)
    tx_old, s_old = _old_llama_adamw(cfg, 20)
    step_new = jax.jit(tx_new.update)
    step_old = jax.jit(tx_old.update)
    p_new, p_old = params, params
    st_new, st_old = tx_new.init(params), tx_old.init(params)
    for grads in grads_seq:
        u_new, st_new = step_new(grads, st_new, p_new)
        u_old, st_old = step_old(grads, st_old, p_old)
        for a, b in zip(jax.tree.leaves(u_new), jax.tree.leaves(u_old), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        p_new, p_old = optax.apply_updates(p_new, u_new), optax.apply_updates(p_old, u_old)
    assert jax.tree.structure(st_new) == jax.tree.structure(st_old)  # checkpoints still fit
    for t in range(25):
        assert np.asarray(s_new(t)).tobytes() == np.asarray(s_old(t)).tobytes()


def _lamb_reference(params, grads_seq, lr, b1, b2, eps, wd, clip, decayed):
    """timm's Lamb step, from the formulas, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        g = {k: x / max(norm / clip, 1.0) for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps)
            if decayed[k]:  # weight decay and trust ratio only here
                u = u + wd * p[k]
                pn, un = np.linalg.norm(p[k]), np.linalg.norm(u)
                u = u * (pn / un if pn > 0 and un > 0 else 1.0)
            p[k] = p[k] - lr * u
    return p


def test_lamb_matches_reference_two_steps():
    rng = np.random.default_rng(2)
    shapes = {
        "qkv": (4, 6),  # decayed
        "fc": (6, 3),  # decayed
        "head": (3, 2),  # decayed, starts at zero: trust ratio 1
        "bias": (6,),  # 1-D: no decay, plain Adam step
        "ln_scale": (4,),
        "pos_embed": (1, 5, 4),  # 3-D but listed: no decay, no trust ratio
        "cls_token": (1, 1, 4),
    }
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    params["head"] = jnp.zeros(shapes["head"])
    # step 1 is clipped (norm >> 1), step 2 is not (norm << 1)
    grads_seq = [
        {k: jnp.asarray(rng.normal(size=s) * f, jnp.float32) for k, s in shapes.items()}
        for f in (3.0, 0.01)
    ]
    cfg = preset("deit3", lr=0.01, schedule="constant", eps=1e-6, weight_decay=0.05)
    for k in ("warmup_epochs", "start_lr", "min_lr", "per_epoch", "warmup_prefix"):
        cfg.pop(k)
    tx, _ = make_optimizer(cfg, 10)
    got, _, _ = _run(tx, params, grads_seq)
    decayed = {k: k in ("qkv", "fc", "head") for k in shapes}
    assert {k: v for k, v in decay_mask(params, DEIT3_NO_DECAY).items()} == decayed
    want = _lamb_reference(params, grads_seq, 0.01, 0.9, 0.999, 1e-6, 0.05, 1.0, decayed)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=0, atol=1e-6, err_msg=k)
        assert not np.allclose(np.asarray(got[k]), np.asarray(params[k]))  # it moved


def test_lamb_trust_ratio_per_layer_on_stacks():
    """A scanned stack [L, ...] declared `stacked` steps like L separate layer tensors."""
    rng = np.random.default_rng(3)
    layer_scale = np.asarray([1.0, 5.0, 9.0])[:, None, None]  # very different layer norms
    w = jnp.asarray(rng.normal(size=(3, 4, 4)) * layer_scale, jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    # clip off: the stacked and the split trees then see the same gradients
    cfg = dict(optimizer="lamb", lr=0.1, schedule="constant", weight_decay=0.1, clip_norm=0.0)
    tx, _ = make_optimizer({**cfg, "stacked": r"^blocks/"}, 10)
    got, _, _ = _run(tx, {"blocks": {"w": w}}, [{"blocks": {"w": g}}])
    tx1, _ = make_optimizer(cfg, 10)
    split = {f"blocks_{i}": {"w": w[i]} for i in range(3)}
    want, _, _ = _run(tx1, split, [{f"blocks_{i}": {"w": g[i]} for i in range(3)}])
    for i in range(3):
        np.testing.assert_allclose(got["blocks"]["w"][i], want[f"blocks_{i}"]["w"], rtol=1e-6)
    # without `stacked`, one norm over the whole stack: a different step
    whole, _, _ = _run(tx1, {"blocks": {"w": w}}, [{"blocks": {"w": g}}])
    assert not np.allclose(whole["blocks"]["w"], got["blocks"]["w"], rtol=1e-4)


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_frozen_params_bit_identical(name):
    rng = np.random.default_rng(4)
    shapes = {
        "blocks_0": {"attn": {"qkv": (4, 12)}, "mlp": {"fc1": (4, 7), "bias": (7,)}},
        "head": {"kernel": (4, 3)},
    }
    params = _tree(rng, shapes)
    grads_seq = [_tree(rng, shapes, scale=1e3) for _ in range(3)]
    cfg = dict(optimizer=name, lr=0.1, warmup_steps=1, trainable=r"(^|/)(attn|head)/")
    tx, _ = make_optimizer(cfg, 10)
    got, _, state = _run(tx, params, grads_seq)
    frozen = got["blocks_0"]["mlp"]
    for key in ("fc1", "bias"):
        a = np.asarray(frozen[key]).view(np.uint32)
        assert np.array_equal(a, np.asarray(params["blocks_0"]["mlp"][key]).view(np.uint32))
    assert not np.allclose(got["blocks_0"]["attn"]["qkv"], params["blocks_0"]["attn"]["qkv"])
    assert not np.allclose(got["head"]["kernel"], params["head"]["kernel"])
    # no optimiser state for the frozen (4, 7) and (7,) leaves
    shapes_in_state = {tuple(np.shape(x)) for x in jax.tree.leaves(state)}
    assert (4, 7) not in shapes_in_state and (7,) not in shapes_in_state
    # the same via a `frozen` regex
    tx, _ = make_optimizer(dict(optimizer=name, lr=0.1, warmup_steps=1, frozen="mlp"), 10)
    got2, _, _ = _run(tx, params, grads_seq)
    assert np.array_equal(
        np.asarray(got2["blocks_0"]["mlp"]["fc1"]), np.asarray(params["blocks_0"]["mlp"]["fc1"])
    )


def test_frozen_grads_do_not_enter_the_clip():
    rng = np.random.default_rng(5)
    params = _tree(rng, {"attn": (3, 3), "mlp": (3, 3)})
    grads = {"attn": jnp.full((3, 3), 0.1), "mlp": jnp.full((3, 3), 1e6)}
    cfg = dict(
        optimizer="sgd", lr=1.0, schedule="constant", momentum=0.0, clip_norm=1.0, frozen="mlp"
    )
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["attn"], -0.1 * np.ones((3, 3)), rtol=1e-6)  # norm .3
    assert np.all(np.asarray(updates["mlp"]) == 0)


def test_frozen_init_on_boxed_abstract_params():
    """Trainers call init on nn.LogicallyPartitioned params inside jax.eval_shape."""
    params = {
        "attn": {"kernel": nn.LogicallyPartitioned(jnp.ones((4, 4)), ("embed", "mlp"))},
        "mlp": {"kernel": nn.LogicallyPartitioned(jnp.ones((4, 4)), ("embed", "mlp"))},
    }
    tx, _ = make_optimizer(dict(lr=0.1, warmup_steps=1, trainable="attn/kernel$"), 10)
    state = jax.eval_shape(tx.init, params)
    assert len([x for x in jax.tree.leaves(state) if np.shape(x) == (4, 4)]) == 2  # mu, nu
    bad, _ = make_optimizer(dict(lr=0.1, warmup_steps=1, trainable="attention/"), 10)
    with pytest.raises(ValueError, match="'attention/'"):
        jax.eval_shape(bad.init, params)


# --------------------------------------------------------------- per-parameter lr scales


def test_lr_scales_first_match_wins_exact_for_sgd():
    rng = np.random.default_rng(6)
    shapes = {
        "blocks_0": {"w": (3, 3)},
        "blocks_1": {"w": (3, 3)},
        "stack": {"w": (2, 3)},
        "head": {"w": (3, 2)},
    }
    params, grads = _tree(rng, shapes), _tree(rng, shapes)
    base = dict(optimizer="sgd", lr=0.1, schedule="constant", momentum=0.0)
    rules = [("blocks_0/", 0.5), ("blocks_", 0.25), ("stack/", [0.3, 0.7])]
    tx0, _ = make_optimizer(base, 10)
    tx, _ = make_optimizer({**base, "lr_scales": rules}, 10)
    u0, _ = tx0.update(grads, tx0.init(params), params)
    u, _ = tx.update(grads, tx.init(params), params)
    for key, s in (("blocks_0", 0.5), ("blocks_1", 0.25), ("head", 1.0)):
        np.testing.assert_array_equal(u[key]["w"], np.float32(s) * u0[key]["w"])
    np.testing.assert_array_equal(
        u["stack"]["w"], np.asarray([[0.3], [0.7]], np.float32) * u0["stack"]["w"]
    )


def test_vit_layer_decay():
    n, decay = 2, 0.5
    shapes = {
        "patch_embed": {"kernel": (3, 3)},
        "cls_token": (1, 1, 3),
        "blocks_0": {"attn": {"kernel": (3, 3)}},
        "blocks_1": {"attn": {"kernel": (3, 3)}},
        "norm": {"scale": (3,)},
        "head": {"kernel": (3, 4)},
    }
    rng = np.random.default_rng(7)
    params, grads = _tree(rng, shapes), _tree(rng, shapes)
    base = dict(optimizer="sgd", lr=1.0, schedule="constant", momentum=0.0)
    tx0, _ = make_optimizer(base, 10)
    tx, _ = make_optimizer({**base, "lr_scales": vit_layer_decay(n, decay)}, 10)
    u0, _ = tx0.update(grads, tx0.init(params), params)
    u, _ = tx.update(grads, tx.init(params), params)
    want = {
        "patch_embed": 0.125,
        "cls_token": 0.125,
        "blocks_0": 0.25,
        "blocks_1": 0.5,
        "norm": 1.0,
        "head": 1.0,
    }
    for key, s in want.items():
        for a, b in zip(jax.tree.leaves(u[key]), jax.tree.leaves(u0[key]), strict=True):
            np.testing.assert_array_equal(a, np.float32(s) * b)
    rules = vit_layer_decay(3, 0.5, scanned=r"^blocks/")
    np.testing.assert_allclose(rules[1][1], [0.125, 0.25, 0.5])  # block i: decay**(n - i)


# --------------------------------------------------------------------------- errors


def test_bad_input_errors_name_the_culprit():
    params = {"attn": {"kernel": jnp.ones((2, 2))}, "mlp": {"kernel": jnp.ones((2, 2))}}
    base = dict(lr=0.1, warmup_steps=1)
    for key, value, needle in [
        ("frozen", "mlp_nope", "'mlp_nope'"),
        ("trainable", "attention", "'attention'"),
        ("lr_scales", [("mlp", 0.5), ("blocks_9/", 0.1)], "'blocks_9/'"),
    ]:
        cfg = {**base, key: value}
        tx, _ = make_optimizer(cfg, 10)
        with pytest.raises(ValueError, match=re.escape(needle)) as err:
            tx.init(params)
        assert key in str(err.value)
        with pytest.raises(ValueError, match=re.escape(needle)):
            validate(cfg, params)
    with pytest.raises(ValueError, match=r"'adam'.*valid: 'adamw', 'lamb', 'sgd'"):
        make_optimizer({**base, "optimizer": "adam"}, 10)
    with pytest.raises(ValueError, match=r"'cosine'.*valid: 'warmup_cosine', 'constant'"):
        make_optimizer({**base, "schedule": "cosine"}, 10)
    with pytest.raises(ValueError, match="wieght_decay"):
        make_optimizer({**base, "wieght_decay": 0.1}, 10)
    with pytest.raises(ValueError, match="momentum"):  # an SGD key given to AdamW
        make_optimizer({**base, "momentum": 0.9}, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_optimizer(preset("deit3"), 100)
    with pytest.raises(ValueError, match="'vit'"):
        preset("vit")
    validate(dict(base, frozen="mlp"), params)  # fine: no error
