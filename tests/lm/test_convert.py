"""Tests for herd.lm.convert's checkpoint conversion: Hugging Face directories (from_hf /
to_hf, sharded, bf16, explicit head_dim), Meta consolidated shards (from_meta), herd
workdirs and the CLI, and every bad-input error. CPU, tiny models (dim 64, 2 layers).
The HF and Meta parity tests need torch + transformers (the peers extra)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.lm import convert
from herd.lm.config import LlamaConfig
from tests.lm.test_model import _apply_fn, _golden_tool, _init

TINY = LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=96, max_seq_len=256
)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, k
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


def _herd_dir(tmp_path, name="hf", cfg=TINY, **kw):
    """An HF directory written by to_hf from random herd params (no torch needed)."""
    path = str(tmp_path / name)
    convert.to_hf(cfg, _init(cfg), path, **kw)
    return path


# --------------------------------------------------------------------------- HF parity

HF_CASES = ("mha", "gqa", "rope_scaling", "tied", "head_dim")


def _hf_model(case, seed=3, dtype=None):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    tool = _golden_tool()
    if case == "head_dim":  # 4 heads of 24: n_heads * head_dim != hidden_size
        kwargs = dict(tool._BASE, num_key_value_heads=2, head_dim=24)
    else:
        kwargs = tool.CASES[case][0]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFConfig(**kwargs, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("norm.weight") else 0.15
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model


def _inputs(case):
    tool = _golden_tool()
    return tool.inputs("rope_scaling" if case == "rope_scaling" else "mha", seed=5)


def _hf_ref(path, tokens, positions):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return _golden_tool().hf_logits(model, tokens, positions)


def _herd_logits(cfg, params, tokens, positions):
    return np.asarray(_apply_fn(cfg)(params, jnp.asarray(tokens), jnp.asarray(positions)))


@pytest.mark.parametrize("case", HF_CASES)
def test_from_hf_to_hf_parity(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = _hf_model(case)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    tokens, positions = _inputs(case)
    ref = _golden_tool().hf_logits(model, tokens, positions)
    scan = case not in ("gqa", "head_dim")  # both layouts
    cfg, params = convert.from_hf(src, scan_layers=scan)
    assert cfg.scan_layers == scan and ("layers" in params) == scan
    assert cfg.tie_embeddings == (case == "tied")
    assert (cfg.rope_scaling is not None) == (case == "rope_scaling")
    assert cfg.head_dim == (24 if case == "head_dim" else 16)
    diff = float(np.abs(_herd_logits(cfg, params, tokens, positions) - ref).max())
    assert diff <= 1e-4, diff
    # herd -> HF: transformers loads it and gives the same logits
    out = str(tmp_path / "out")
    convert.to_hf(cfg, params, out)
    np.testing.assert_allclose(_hf_ref(out, tokens, positions), ref, atol=1e-6)
    # HF -> herd again: identical params, either layout asked for
    cfg2, params2 = convert.from_hf(out, scan_layers=scan)
    assert cfg2 == cfg
    _tree_equal(params2, params)
    _, other = convert.from_hf(out, scan_layers=not scan)
    _tree_equal(other, convert.stack_layers(params) if not scan else convert.unstack_layers(params))


def test_bf16_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    import torch

    model = _hf_model("gqa", dtype=torch.bfloat16)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    tokens, positions = _inputs("gqa")
    ref = _hf_ref(src, tokens, positions)  # float32 compute on the bf16 weights
    cfg, params = convert.from_hf(src)
    assert params["layers"]["attention"]["wq"].dtype == np.float32
    diff = float(np.abs(_herd_logits(cfg, params, tokens, positions) - ref).max())
    assert diff <= 1e-4, diff
    # kept in bfloat16 on request, and written back as bfloat16 byte for byte
    cfg16, p16 = convert.from_hf(src, param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert p16["layers"]["feed_forward"]["w1"].dtype == jnp.bfloat16
    out = str(tmp_path / "out")
    convert.to_hf(cfg16, p16, out)
    from safetensors.numpy import load_file

    a, b = (
        load_file(os.path.join(src, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert sorted(a) == sorted(b)
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k])


def test_sharded_checkpoints(tmp_path):
    pytest.importorskip("transformers")
    model = _hf_model("gqa")
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    model.save_pretrained(one)
    model.save_pretrained(many, max_shard_size="60KB")
    assert os.path.exists(os.path.join(many, "model.safetensors.index.json"))
    cfg, params = convert.from_hf(one)
    _, sharded = convert.from_hf(many)
    _tree_equal(sharded, params)
    out = str(tmp_path / "out")
    files = convert.to_hf(cfg, params, out, max_shard_size=60_000)
    assert len(files) > 2 and all(os.path.getsize(f) < 60_000 + 4096 for f in files)
    tokens, positions = _inputs("gqa")
    ref = _golden_tool().hf_logits(model, tokens, positions)
    np.testing.assert_allclose(_hf_ref(out, tokens, positions), ref, atol=1e-6)
    _, back = convert.from_hf(out)
    _tree_equal(back, params)


# --------------------------------------------------------------------------- Meta


def _write_meta(model, path, emb_axis, n=2):
    """`model`'s weights as Meta's n model-parallel consolidated shards + params.json."""
    import torch

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    shards = [{} for _ in range(n)]
    cfg = convert.config_from_hf(c)
    for hf in convert.hf_shapes(cfg):
        meta, axis = convert._meta_name(hf)
        w = sd[hf]
        if meta.endswith("attention.wq.weight"):
            w = convert.hf_to_meta_qk(w, cfg.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = convert.hf_to_meta_qk(w, cfg.n_kv_heads)
        axis = emb_axis if axis == -1 else axis
        parts = [w] * n if axis is None else np.split(w, n, axis=axis)
        for s, part in zip(shards, parts, strict=True):
            s[meta] = torch.from_numpy(np.ascontiguousarray(part)).to(torch.bfloat16)
    os.makedirs(path)
    for k, s in enumerate(shards):
        torch.save(s, os.path.join(path, f"consolidated.{k:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(
            dict(
                dim=cfg.dim,
                n_layers=cfg.n_layers,
                n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size,
                multiple_of=32,  # int(0.5 * int(2 * 4 * 64 / 3)) = 85 -> 96
                ffn_dim_multiplier=0.5,
                norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta,
            ),
            f,
        )


@pytest.mark.parametrize("emb_axis", [1, 0], ids=["llama2_embedding", "llama3_embedding"])
def test_from_meta_equals_hf(emb_axis, tmp_path):
    pytest.importorskip("transformers")
    import torch

    model = _hf_model("gqa", dtype=torch.bfloat16)  # Meta ships bf16
    meta = str(tmp_path / "meta")
    _write_meta(model, meta, emb_axis)
    hf = str(tmp_path / "hf")
    model.save_pretrained(hf)
    cfg_m, p_m = convert.from_meta(meta)
    cfg_h, p_h = convert.from_hf(hf)
    assert cfg_m.hidden_dim == cfg_h.hidden_dim and cfg_m.rope_theta == cfg_h.rope_theta
    _tree_equal(p_m, p_h)
    tokens, positions = _inputs("gqa")
    a = _herd_logits(cfg_m, p_m, tokens, positions)
    np.testing.assert_allclose(a, _hf_ref(hf, tokens, positions), atol=1e-4)
    # the permutation matters: without it the logits differ
    bad = jax.tree.map(np.copy, p_m)
    wq = bad["layers"]["attention"]["wq"]
    wq[...] = wq.reshape(2, 64, 4, 2, 8).transpose(0, 1, 2, 4, 3).reshape(wq.shape)
    assert np.abs(_herd_logits(cfg_m, bad, tokens, positions) - a).max() > 1e-3


def test_from_meta_errors(tmp_path):
    pytest.importorskip("transformers")
    model = _hf_model("gqa")
    meta = str(tmp_path / "meta")
    _write_meta(model, meta, 1)
    broken = str(tmp_path / "broken")
    shutil.copytree(meta, broken)
    os.remove(os.path.join(broken, "consolidated.00.pth"))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth is missing"):
        convert.from_meta(broken)
    pj = os.path.join(meta, "params.json")
    d = json.load(open(pj))
    json.dump({**d, "n_kv_heads": 4}, open(pj, "w"))
    with pytest.raises(ValueError, match=r"wk\.weight\): .*k_proj\.weight has shape \(32, 64\)"):
        convert.from_meta(meta)


# --------------------------------------------------------------------------- bad input


def _edit_config(path, **kw):
    fp = os.path.join(path, "config.json")
    d = json.load(open(fp))
    d.update(kw)
    json.dump(d, open(fp, "w"))


def test_shapes_disagreeing_with_config(tmp_path):
    path = _herd_dir(tmp_path)
    _edit_config(path, intermediate_size=128)
    with pytest.raises(ValueError, match=r"model\.safetensors: .*gate_proj\.weight has shape"):
        convert.from_hf(path)


def test_missing_and_truncated_shards(tmp_path):
    path = _herd_dir(tmp_path, max_shard_size=60_000)
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-0"))[1]
    os.rename(os.path.join(path, shard), os.path.join(tmp_path, "aside"))
    with pytest.raises(ValueError, match=rf"index\.json lists {shard}, which is not in"):
        convert.from_hf(path)
    data = open(os.path.join(tmp_path, "aside"), "rb").read()
    open(os.path.join(path, shard), "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard} cannot be read \(truncated"):
        convert.from_hf(path)
    single = _herd_dir(tmp_path, "single")
    fp = os.path.join(single, "model.safetensors")
    data = open(fp, "rb").read()
    open(fp, "wb").write(data[:-8])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        convert.from_hf(single)
    os.remove(fp)
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        convert.from_hf(single)


@pytest.mark.parametrize(
    "key,value",
    [
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
    ],
)
def test_unimplemented_rope_types(key, value, tmp_path):
    path = _herd_dir(tmp_path)
    _edit_config(path, **{key: value})
    rtype = value.get("rope_type", value.get("type"))
    with pytest.raises(ValueError, match=rf"config\.json: {key} has rope type '{rtype}'"):
        convert.from_hf(path)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"attention_bias": True}, "attention_bias is true"),
        ({"mlp_bias": True}, "mlp_bias is true"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_unsupported_configs(kw, match, tmp_path):
    path = _herd_dir(tmp_path)
    _edit_config(path, **kw)
    with pytest.raises(ValueError, match=match):
        convert.from_hf(path)


def test_bias_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _herd_dir(tmp_path)
    fp = os.path.join(path, "model.safetensors")
    tensors = load_file(fp)
    tensors["model.layers.1.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, fp, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds bias weights \(model\.layers\.1\.self_attn"):
        convert.from_hf(path)


def test_to_hf_refuses_params_of_another_config(tmp_path):
    with pytest.raises(ValueError, match=r"feed_forward.*w1.* has shape"):
        convert.to_hf(TINY.replace(ffn_dim=128), _init(TINY), str(tmp_path / "x"))


def test_head_dim_config():
    c = TINY.replace(head_dim=24)
    assert c.head_dim == 24 and c.replace(dim=128).head_dim == 24
    assert TINY.replace(dim=128).head_dim == 32  # a derived head_dim stays derived
    with pytest.raises(ValueError, match="head_dim=23 must be even"):
        TINY.replace(head_dim=23)
    p = _init(c)
    assert p["layers"]["attention"]["wq"].shape == (2, 64, 4, 24)
    assert p["layers"]["attention"]["wo"].shape == (2, 4, 24, 64)


# --------------------------------------------------------------------------- CLI


def test_cli_hf_to_workdir_and_back(tmp_path, capsys):
    from herd.core.checkpoint import read_config
    from herd.curation.embed import load_params, run_model_config
    from herd.lm.presets import build_model_config

    src = _herd_dir(tmp_path, "src", cfg=TINY.replace(tie_embeddings=True))
    open(os.path.join(src, "tokenizer.model"), "wb").write(b"not really a tokenizer\n")
    wd = str(tmp_path / "wd")
    assert convert.main(["convert", f"--from_hf={src}", f"--to={wd}"]) == 0
    cfg, params = convert.from_hf(src)
    stored = read_config(os.path.join(wd, "checkpoints"))
    assert build_model_config(stored["model"]) == cfg
    assert run_model_config(wd) == cfg
    _tree_equal(jax.tree.map(np.asarray, load_params(wd, cfg)), params)
    c2, p2 = convert.load_workdir(wd)
    assert c2 == cfg
    _tree_equal(jax.tree.map(np.asarray, p2), params)
    assert open(os.path.join(wd, "tokenizer", "tokenizer.model"), "rb").read().startswith(b"not")
    out = str(tmp_path / "out")
    assert convert.main(["convert", f"--from_workdir={wd}", f"--to_hf={out}"]) == 0
    _, back = convert.from_hf(out)
    _tree_equal(back, params)
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    if _has_transformers():
        tokens, positions = _inputs("mha")
        np.testing.assert_allclose(
            _hf_ref(out, tokens, positions),
            _herd_logits(cfg, params, tokens, positions),
            atol=1e-4,
        )
    # errors: one line, exit code 2
    capsys.readouterr()
    assert convert.main(["convert", f"--from_hf={tmp_path / 'nope'}", f"--to={wd}2"]) == 2
    assert "nope is not a directory" in capsys.readouterr().err
    assert convert.main(["convert", f"--from_hf={src}", f"--to={wd}"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert convert.main(["convert", f"--from_hf={src}"]) == 2
    assert "needs --to=WORKDIR" in capsys.readouterr().err


def test_cli_llama3_tokenizer_json_travels(tmp_path):
    """A Llama 3 HF directory has tokenizer.json (no tokenizer.model at the top): the
    workdir keeps it and the HF directory written back carries it."""
    src = _herd_dir(tmp_path, "src")
    text = '{"model": {"type": "BPE"}}'
    open(os.path.join(src, "tokenizer.json"), "w").write(text)
    wd = str(tmp_path / "wd")
    assert convert.main(["convert", f"--from_hf={src}", f"--to={wd}"]) == 0
    assert open(os.path.join(wd, "tokenizer", "tokenizer.json")).read() == text
    out = str(tmp_path / "out")
    assert convert.main(["convert", f"--from_workdir={wd}", f"--to_hf={out}"]) == 0
    assert open(os.path.join(out, "tokenizer.json")).read() == text


def _has_transformers():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
