"""herd.lm.train fine-tuning (train.init_from): a tiny model trained a few steps, then
fine-tuned from its workdir with another rope_theta / seq_len / max_seq_len (what Code
Llama's long-context fine-tuning changes); a random Hugging Face model fine-tuned from the
workdir `python -m herd.lm.convert` wrote; bad init_from values refused before compiling."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from herd.core.checkpoint import read_config
from herd.lm import train
from herd.lm.data import make_lm_iterator, stdlib_files
from herd.lm.model import Llama
from herd.lm.presets import build_model_config
from herd.lm.tokenizer import load_tokenizer, workdir_tokenizer_path
from tests.lm.test_train import _tiny

QUIET = {"train.sample_tokens": 0, "train.eval_batches": 1, "train.log_every": 1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the tokenizer cache test_train.py uses: the tiny tokenizer is trained once a session
    mp = pytest.MonkeyPatch()
    mp.setenv("HERD_CACHE", str(tmp_path_factory.getbasetemp() / "herd_cache"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pretrained(cache, tmp_path_factory):
    """(workdir, summary) of the tiny model trained 4 steps with Llama 2's rope_theta 1e4."""
    workdir = str(tmp_path_factory.mktemp("pre") / "w")
    over = {"model.rope_theta": 1e4, "train.steps": 4, "train.eval_every": 4, **QUIET}
    summary = train.run(_tiny(**over), workdir)
    assert summary["final_step"] == 4
    return workdir, summary


def _finetune_config(init_from, **over):
    """tiny.py with every model field unset (the checkpoint's model is the base)."""
    cfg = _tiny(**{"train.init_from": init_from, **QUIET, **over})
    for k in cfg.model.keys():
        if f"model.{k}" not in over:
            cfg.model[k] = None
    return cfg


def _first_batch(tokenizer, seq_len, batch_size=8):
    """The first training batch of a tiny-config run on the stdlib (seed 0)."""
    files, _ = stdlib_files("train", eval_fraction=0.02)
    it = make_lm_iterator(
        files,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        shuffle=True,
        num_epochs=None,
        shard_index=0,
        shard_count=1,
    )
    batch = next(iter(it))
    return {k: np.asarray(batch[k]) for k in train.BATCH_KEYS}


def _loss(model_config, params, batch):
    loss_fn = train._loss_fn(Llama(model_config), 0)
    s, n, _ = jax.jit(lambda p, b: loss_fn(p, b, None, None))(params, batch)
    return float(s) / float(n)


def _counts(opt_state):
    return [
        int(x)
        for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
        if jax.tree_util.keystr(path).endswith("count")
    ]


def test_finetune_loads_the_weights_with_a_new_rope_theta_and_seq_len(pretrained, tmp_path, capsys):
    pre_dir, pre = pretrained
    work = str(tmp_path / "ft")
    over = {
        "model.rope_theta": 1e6,  # Code Llama LCFT: 1e4 -> 1e6
        "model.max_seq_len": 512,  # the stored model's 256
        "data.seq_len": 128,  # pre-training's 64
        "train.steps": 2,
        "train.eval_every": 2,
        "train.checkpoint_every": 1,
    }
    first = train.run(_finetune_config(pre_dir, **over, **{"train.stop_after": 1}), work)
    log = capsys.readouterr().out
    assert "fine-tuning from" in log and "fresh optimiser state, step 0" in log
    assert first["final_step"] == 1  # the step counter starts again at 0
    assert _counts(first["state"].opt_state) and set(_counts(first["state"].opt_state)) == {1}
    # the checkpoint describes its whole model (base + changes) for generate / embed
    stored = build_model_config(read_config(os.path.join(work, "checkpoints"))["model"])
    assert (stored.rope_theta, stored.max_seq_len, stored.dim, stored.vocab_size) == (
        1e6,
        512,
        64,
        512,
    )
    # the weights' tokenizer came along
    pre_tok = workdir_tokenizer_path(pre_dir)
    with open(pre_tok, "rb") as a, open(workdir_tokenizer_path(work), "rb") as b:
        assert a.read() == b.read()

    # the first step's loss (at the params the run started from) is the pre-trained
    # params' loss on that batch under the new rope_theta: the weights were loaded
    batch = _first_batch(load_tokenizer(pre_tok), 128)
    params = jax.device_get(pre["state"].params)
    at_init = _loss(stored, params, batch)
    fresh_params = Llama(stored).init(jax.random.key(0), batch["inputs"][:1])["params"]
    fresh = _loss(stored, jax.device_get(fresh_params), batch)
    with capsys.disabled():  # the measured numbers, for the log of a -s run
        print(
            f"first fine-tune loss {first['loss'][1]:.5f}; restored params {at_init:.5f}; "
            f"fresh init {fresh:.5f}"
        )
    np.testing.assert_allclose(first["loss"][1], at_init, rtol=2e-5)
    assert fresh - at_init > 0.1  # and a re-initialised model would be far off

    # the workdir now has checkpoints: they win over init_from (resumed, not reloaded)
    rest = train.run(_finetune_config(pre_dir, **over), work)
    log = capsys.readouterr().out
    assert "is not read: the workdir holds checkpoints of this run" in log
    assert "resuming from checkpoint step 1" in log and "fine-tuning from" not in log
    assert rest["final_step"] == 2 and set(rest["loss"]) == {2}
    assert set(_counts(rest["state"].opt_state)) == {2}


def test_vocab_grows_keeping_the_checkpoints_rows(pretrained, tmp_path, capsys):
    # Code Llama 7B/13B: Llama 2's 32000 tokens + 16 (the infilling sentinels among them).
    # lr 0: the params after step 1 are the ones the fine-tune started from.
    pre_dir, pre = pretrained
    over = {"model.vocab_size": 520, "train.steps": 1, "optim.lr": 0.0}
    ft = train.run(_finetune_config(pre_dir, **over), str(tmp_path / "ft"))
    assert "vocabulary grown from 512 to 520 tokens" in capsys.readouterr().out
    old, new = jax.device_get(pre["state"].params), jax.device_get(ft["state"].params)
    for name, table, axis in [("tok_embeddings", "embedding", 0), ("output", "kernel", 1)]:
        grown = np.asarray(new[name][table])
        assert grown.shape[axis] == 520
        kept = grown[:512] if axis == 0 else grown[:, :512]
        added = grown[512:] if axis == 0 else grown[:, 512:]
        np.testing.assert_array_equal(kept, np.asarray(old[name][table]))
        assert 0.01 < added.std() < 0.04  # a fresh init_std=0.02 init, not zeros
    for a, b in zip(jax.tree.leaves(old["layers"]), jax.tree.leaves(new["layers"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"vocab_size 512 \(checkpoint\) vs 500"):
        train.run(_finetune_config(pre_dir, **{"model.vocab_size": 500}), str(tmp_path / "x"))


def test_init_from_accepts_workdir_checkpoints_and_step_dirs(pretrained):
    pre_dir, _ = pretrained
    ck = os.path.join(pre_dir, "checkpoints")
    assert train.resolve_init_from(pre_dir) == train.InitFrom(ck, None, pre_dir)
    assert train.resolve_init_from(ck) == train.InitFrom(ck, None, pre_dir)
    assert train.resolve_init_from(os.path.join(ck, "4")) == train.InitFrom(ck, 4, pre_dir)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"model.dim": 128}, r"dim 64 \(checkpoint\) vs 128 \(this run\)"),
        ({"model.n_kv_heads": 4}, r"n_kv_heads 2 \(checkpoint\) vs 4 \(this run\)"),
        (
            {"model.preset": "llama2-7b"},
            r"dim 64 \(checkpoint\) vs 4096 .*head_dim 16 \(checkpoint\) vs 128",
        ),
        ({"model.scan_layers": False}, r"scan_layers True \(checkpoint\) vs False"),
    ],
)
def test_weight_defining_mismatch_is_one_error_naming_the_field(pretrained, tmp_path, over, match):
    pre_dir, _ = pretrained
    with pytest.raises(ValueError, match=match) as e:
        train.run(_finetune_config(pre_dir, **over), str(tmp_path / "ft"))
    assert os.path.join(pre_dir, "checkpoints", "4", "config") in str(e.value)
    assert not os.path.exists(tmp_path / "ft" / "checkpoints")  # refused before any work


def test_init_from_pointing_at_nothing(pretrained, tmp_path):
    pre_dir, _ = pretrained
    for path, match in [
        (str(tmp_path / "nope"), "does not exist"),
        (str(tmp_path), "neither a herd workdir"),
        (os.path.join(pre_dir, "checkpoints", "3"), "does not exist"),
    ]:
        with pytest.raises(ValueError, match=f"train.init_from .*{match}"):
            train.run(_finetune_config(path), str(tmp_path / "ft"))


def _hf_llama(path, vocab_size):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = HFConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hf).float().save_pretrained(path)


def test_finetune_a_converted_hf_model(pretrained, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from herd.lm import convert

    pre_dir, _ = pretrained
    tok_file = workdir_tokenizer_path(pre_dir)  # 512 tokens, the HF model's vocabulary
    src, converted = str(tmp_path / "hf"), str(tmp_path / "converted")
    _hf_llama(src, vocab_size=512)
    assert convert.main(["convert", f"--from_hf={src}", f"--to={converted}"]) == 0
    work = str(tmp_path / "ft")
    over = {"model.rope_theta": 1e6, "data.seq_len": 128, "train.steps": 1}
    # the HF directory held no tokenizer, so the converted workdir keeps none
    with pytest.raises(ValueError, match="keeps no tokenizer .* set data.tokenizer"):
        train.run(_finetune_config(converted, **over), work)
    ft = train.run(_finetune_config(converted, **over, **{"data.tokenizer": tok_file}), work)
    assert ft["final_step"] == 1
    hf_config, hf_params = convert.from_hf(src)
    mc = hf_config.replace(rope_theta=1e6)
    at_init = _loss(mc, hf_params, _first_batch(load_tokenizer(tok_file), 128))
    print(f"converted HF model: first fine-tune loss {ft['loss'][1]:.5f}, HF weights {at_init:.5f}")
    np.testing.assert_allclose(ft["loss"][1], at_init, rtol=2e-5)
