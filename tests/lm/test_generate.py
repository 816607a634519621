"""KV-cache decoding and herd.lm.generate: cache == full recomputation, greedy == a no-cache
loop and Hugging Face's generate, batched == one by one, sampling settings, a mesh, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.lm.config import LlamaConfig
from herd.lm.generate import generate, generate_tokens
from herd.lm.model import Llama, init_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(kv=2, scan=True, **kw):
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv,
        vocab_size=128,
        ffn_dim=128,
        max_seq_len=96,
        scan_layers=scan,
        init_std=0.1,
    )
    return LlamaConfig(**{**base, **kw})


def _params(cfg, seed=0):
    return Llama(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]


def _prompts(lengths, vocab=128, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("kv,scan", [(4, True), (2, False), (1, True)], ids=["mha", "gqa", "mqa"])
def test_cached_decode_equals_full_forward(kv, scan):
    """Left-padded prompts prefilled into the cache, then one token at a time: every
    step's logits equal the full forward pass over that row's whole sequence."""
    cfg = _config(kv, scan)
    model, params = Llama(cfg), _params(cfg)
    seqs = _prompts([5, 9], seed=2)
    extra = _prompts([8, 8], seed=3)
    full = [
        model.apply({"params": params}, jnp.asarray([s + e]))[0]
        for s, e in zip(seqs, extra, strict=True)
    ]
    p = 9
    tokens = np.zeros((2, p), np.int32)
    positions = np.full((2, p), -1, np.int32)
    for r, s in enumerate(seqs):
        tokens[r, p - len(s) :] = s
        positions[r, p - len(s) :] = np.arange(len(s))
    cache = init_cache(cfg, 2, p + 8)
    assert cache["k"].shape == (2, 2, p + 8, kv, 16)
    logits, cache = model.apply(
        {"params": params}, tokens, positions=positions, cache=cache, cache_index=0
    )
    worst = 0.0
    for r, s in enumerate(seqs):
        got = logits[r, p - len(s) :]
        worst = max(worst, float(jnp.abs(got - full[r][: len(s)]).max()))
    for i in range(8):
        tok = np.asarray([[e[i]] for e in extra], np.int32)
        pos = np.asarray([[len(s) + i] for s in seqs], np.int32)
        logits, cache = model.apply(
            {"params": params}, tok, positions=pos, cache=cache, cache_index=p + i
        )
        for r, s in enumerate(seqs):
            worst = max(worst, float(jnp.abs(logits[r, 0] - full[r][len(s) + i]).max()))
    assert worst <= 1e-5, worst


def _greedy_no_cache(cfg, params, ids, n):
    """A no-cache greedy loop (what herd.lm.train sampled with before generate.py): the full
    forward pass on a fixed buffer, one token at a time."""
    model = Llama(cfg)
    total = len(ids) + n
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(ids)] = ids
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for cur in range(len(ids), total):
        buf[0, cur] = int(jnp.argmax(fwd(params, buf)[0, cur - 1]))
    return buf[0, len(ids) :].tolist()


@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_greedy_equals_no_cache_loop_and_batched_equals_single(kv):
    cfg = _config(kv)
    params = _params(cfg, seed=kv)
    prompts = _prompts([3, 11, 7], seed=4)
    batched = generate_tokens(cfg, params, prompts, max_new_tokens=24)
    for ids, got in zip(prompts, batched, strict=True):
        assert len(got) == 24
        assert got == _greedy_no_cache(cfg, params, ids, 24)
        assert generate_tokens(cfg, params, [ids], max_new_tokens=24) == [got]


def test_decode_weights_prepared_once_per_params():
    """generate_tokens prepares its decode weights (per layer, fused q/k/v and gate/up) once
    per params object: the same params reuse them; other params, params in the unscanned
    layout and numpy params get their own (the same tokens for the same values), and the
    prepared weights go when their params do."""
    import gc

    from herd.lm import generate as gen
    from herd.lm.convert import unstack_layers

    cfg = _config()
    params = _params(cfg)
    prompts = _prompts([3, 6], seed=12)
    first = generate_tokens(cfg, params, prompts, max_new_tokens=6)
    prepared = gen._PREPARED[0][3]
    assert generate_tokens(cfg, params, prompts, max_new_tokens=6) == first
    assert gen._PREPARED[0][3] is prepared
    other = _params(cfg, seed=1)
    got = generate_tokens(cfg, other, prompts, max_new_tokens=6)
    assert gen._PREPARED[0][3] is not prepared and got != first
    unscanned = cfg.replace(scan_layers=False)
    assert generate_tokens(unscanned, unstack_layers(other), prompts, max_new_tokens=6) == got
    del other
    gc.collect()
    assert not gen._PREPARED  # the unstacked copy died with its call, `other` just now
    numpy_params = jax.tree.map(np.asarray, params)  # mutable: never cached
    assert generate_tokens(cfg, numpy_params, prompts, max_new_tokens=6) == first
    assert not gen._PREPARED


def _decode_loop_copies(cfg, params, batch):
    """The non-scalar copies in the optimized HLO of generate's decode loop body."""
    import re

    from herd.lm import generate as gen

    weights = gen._decode_weights_for(cfg, gen._unbox_params(params), None)
    fn = gen._generate_fn(cfg, 8, (0.0, 0, 1.0, 1.0), (), 0, False)
    zeros = np.zeros((batch, 16), np.int32)
    hlo = fn.lower(weights, zeros, zeros, zeros[:, 0], jax.random.PRNGKey(0), np.int32(0))
    hlo = hlo.compile().as_text()
    body = re.search(r" while\(.*?body=%?([\w.\-]+)", hlo).group(1)
    start = hlo.index("\n%" + body + " ")
    text = hlo[start : hlo.index("\n}\n", start)]
    return [c for c in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(", text) if "," in c]


@pytest.mark.parametrize("batch,kv", [(1, 2), (1, 1), (3, 2)], ids=["b1", "b1-mqa", "b3"])
def test_decode_loop_copies_no_weight_or_cache(batch, kv):
    """The compiled decode loop writes each layer's cache in place and reads the prepared
    weights as they lie: no weight or cache is copied per token (a layer scan inside the
    loop copied every layer's weights each token, a [1, ...] cache was copied 3 times)."""
    cfg = _config(kv)
    params = _params(cfg)
    assert _decode_loop_copies(cfg, params, batch) == []
    if batch == 1:  # and decodes right with the size-1 batch / kv dims left out of the cache
        ids = _prompts([5], seed=13)[0]
        assert generate_tokens(cfg, params, [ids], max_new_tokens=10) == [
            _greedy_no_cache(cfg, params, ids, 10)
        ]


def test_stop_tokens_end_rows():
    cfg = _config()
    params = _params(cfg)
    prompts = _prompts([4, 6], seed=5)
    free = generate_tokens(cfg, params, prompts, max_new_tokens=20)
    stop = free[0][5]
    first = free[0].index(stop)
    got = generate_tokens(cfg, params, prompts, max_new_tokens=20, stop_ids=[stop])
    assert got[0] == free[0][:first]
    cut1 = free[1].index(stop) if stop in free[1] else 20
    assert got[1] == free[1][:cut1]


def _hf_tiny(tmp_path):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            scale = 0.2 if name.endswith("norm.weight") else 0.15
            p.copy_(base + scale * torch.randn_like(p))
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    return model, path


def test_greedy_matches_hf_generate(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    from herd.lm.convert import from_hf

    model, path = _hf_tiny(tmp_path)
    cfg, params = from_hf(path)
    prompts = _prompts([6, 2, 10], seed=7)
    n = 20
    ours = generate_tokens(cfg, params, prompts, max_new_tokens=n, stop_ids=[2])

    def hf(batch):
        p = max(len(x) for x in batch)
        ids = torch.zeros((len(batch), p), dtype=torch.long)
        mask = torch.zeros((len(batch), p), dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, p - len(x) :] = torch.tensor(x)
            mask[r, p - len(x) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=0,
                eos_token_id=2,
                pad_token_id=0,
            )
        rows = []
        for row in out[:, p:].tolist():
            rows.append(row[: row.index(2)] if 2 in row else row)
        return rows

    model.generation_config.temperature = None
    model.generation_config.top_p = None
    model.generation_config.top_k = None
    assert ours == hf(prompts)  # a left-padded batch
    for ids, got in zip(prompts, ours, strict=True):  # and each prompt alone
        assert [got] == hf([ids])
    assert max(len(x) for x in ours) > 5  # not a trivial early stop
    # HF's repetition penalty (greedy) too
    pen = generate_tokens(
        cfg, params, prompts[:1], max_new_tokens=n, stop_ids=[2], repetition_penalty=1.5
    )
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(prompts[:1]),
            attention_mask=torch.ones((1, len(prompts[0])), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            repetition_penalty=1.5,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompts[0]) :].tolist()
    assert pen[0] == (ref[: ref.index(2)] if 2 in ref else ref)


def test_sampling_settings():
    cfg = _config()
    params = _params(cfg)
    prompts = _prompts([5, 8], seed=8)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20)
    a = generate_tokens(cfg, params, prompts, seed=3, **kw)
    assert a == generate_tokens(cfg, params, prompts, seed=3, **kw)
    others = [generate_tokens(cfg, params, prompts, seed=s, **kw) for s in (4, 5)]
    assert any(o != a for o in others)
    greedy = generate_tokens(cfg, params, prompts, max_new_tokens=16)
    assert generate_tokens(cfg, params, prompts, max_new_tokens=16, temperature=0.7, top_k=1) == (
        greedy
    )
    # a tiny nucleus keeps only the most likely token: greedy as well
    assert (
        generate_tokens(cfg, params, prompts, max_new_tokens=16, temperature=1.0, top_p=1e-6)
        == greedy
    )
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p must be in"):
            generate_tokens(cfg, params, prompts, max_new_tokens=4, temperature=1.0, top_p=bad)
    with pytest.raises(ValueError, match="temperature"):
        generate_tokens(cfg, params, prompts, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match=r"max_new_tokens=90 .*max_seq_len=96"):
        generate_tokens(cfg, params, prompts, max_new_tokens=90)


def test_sample_top_k_top_p_masks():
    from herd.lm.generate import _sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    seen = jnp.zeros((1, 4), bool)
    draws = {
        name: {
            int(_sample(logits, seen, jax.random.PRNGKey(i), 1.0, k, p, 1.0)[0]) for i in range(64)
        }
        for name, k, p in (("k2", 2, 1.0), ("p07", 0, 0.7), ("p081", 0, 0.81), ("all", 0, 1.0))
    }
    assert draws["k2"] == {0, 1}
    assert draws["p07"] == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws["p081"] == {0, 1, 2}
    assert draws["all"] >= {0, 1, 2}
    # repetition penalty, HF semantics: positive logits divided, negative multiplied
    lg = jnp.asarray([[2.0, 1.9, -1.0]])
    seen = jnp.asarray([[True, False, True]])
    assert int(_sample(lg, seen, None, 0.0, 0, 1.0, 1.2)[0]) == 1


def test_generation_on_mesh_equals_one_device():
    from herd.core.mesh import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    cfg = _config(kv=2)
    params = _params(cfg)
    prompts = _prompts([4, 9, 6], seed=9)
    one = generate_tokens(cfg, params, prompts, max_new_tokens=16)
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    assert generate_tokens(cfg, params, prompts, max_new_tokens=16, mesh=mesh) == one
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=30, seed=1)
    sampled = generate_tokens(cfg, params, prompts, **kw)
    assert generate_tokens(cfg, params, prompts, mesh=mesh, **kw) == sampled
    steps = []  # streaming on the mesh: the host gets each step's tokens of the real rows
    got = generate_tokens(
        cfg, params, prompts, mesh=mesh, on_tokens=lambda t, a: steps.append(t), **kw
    )
    assert got == sampled and [[int(t[r]) for t in steps] for r in range(3)] == sampled


class _CharTokenizer:
    """Bytes as ids 3.. (1 BOS, 2 EOS, 0 pad)."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128

    def encode(self, text, bos=False):
        return ([1] if bos else []) + [min(ord(ch), 124) + 3 for ch in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def test_generate_text_and_stop_strings():
    cfg = _config()
    params = _params(cfg)
    tok = _CharTokenizer()
    prompts = ["ab", "hello"]
    texts = generate(cfg, params, tok, prompts, max_new_tokens=12)
    ids = generate_tokens(
        cfg, params, [tok.encode(p, bos=True) for p in prompts], max_new_tokens=12, stop_ids=[2]
    )
    assert texts == [tok.decode(x) for x in ids]
    stop = texts[0][3:5]
    cut = generate(cfg, params, tok, prompts, max_new_tokens=12, stop_strings=[stop])
    assert cut[0] == texts[0][: texts[0].find(stop)]
    with pytest.raises(ValueError, match="list of strings"):
        generate(cfg, params, tok, "ab", max_new_tokens=2)


def _cli(*args):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""
    return subprocess.run(
        [sys.executable, "-m", "herd.lm.generate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli(tmp_path, monkeypatch):
    from herd.core.config import load_config
    from herd.lm import train

    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "herd_cache"))
    cfg = load_config(
        os.path.join(ROOT, "configs/lm/tiny.py"), ["train.steps=2", "train.sample_tokens=0"]
    )
    workdir = str(tmp_path / "w")
    train.run(cfg, workdir)
    r = _cli(f"--workdir={workdir}", "--prompt=import os", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import os")
    r = _cli(f"--workdir={workdir}", "--max_new_tokens=8", "--top_p=2")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    missing = str(tmp_path / "nothing")
    r = _cli(f"--workdir={missing}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m herd.lm.train" in lines[0], r.stderr


# ------------------------------------------------------- HF generate parity (golden files)

GOLDEN = os.path.join(ROOT, "tests", "golden")


@pytest.mark.parametrize("case", ["mha", "gqa", "rope_scaling", "tied"])
def test_greedy_equals_hf_generate_golden(case):
    """herd's greedy generate_tokens == HF generate(do_sample=False) for a left-padded batch
    of prompts of different lengths, 32 new tokens each (tools/make_golden_lm.py; no torch)."""
    import hashlib
    import json

    from herd.lm.convert import config_from_hf, params_from_hf

    gen = np.load(os.path.join(GOLDEN, f"lm_generate_{case}.npz"))
    z = np.load(os.path.join(GOLDEN, f"lm_{case}.npz"))
    sd = {k[3:]: z[k] for k in z.files if k.startswith("hf/")}
    h = hashlib.sha256()  # the weights the generations were made with (see the tool)
    for k in sorted(sd):
        v = np.ascontiguousarray(sd[k].astype(np.float32))
        h.update(k.encode() + str(v.shape).encode() + v.tobytes())
    assert h.hexdigest() == str(gen["weights_sha256"]), "rerun tools/make_golden_lm.py"
    assert json.loads(str(gen["config_json"])) == json.loads(str(z["config_json"]))
    cfg = config_from_hf(json.loads(str(z["config_json"])))
    params = params_from_hf(sd, cfg)
    padded, lengths = gen["gen_prompts"], gen["gen_lengths"]
    prompts = [row[len(row) - n :].tolist() for row, n in zip(padded, lengths, strict=True)]
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    want = gen["gen_tokens"].tolist()
    got = generate_tokens(cfg, params, prompts, max_new_tokens=len(want[0]))
    assert got == want


# ----------------------------------------------------------------------------- streaming


# The streaming tests share one model and settings (compiles are the slow part on CPU).
def _stream_setup():
    cfg = _config(vocab_size=264)
    return cfg, _params(cfg, seed=3), dict(max_new_tokens=16, temperature=1.0, seed=5)


def test_on_tokens_streams_every_step_and_changes_nothing():
    cfg, params, kw = _stream_setup()
    prompts = _prompts([4, 9, 6], vocab=264, seed=11)
    plain = generate_tokens(cfg, params, prompts, stop_ids=[2], **kw)
    assert max(len(x) for x in plain) == 16
    steps = []
    streamed = generate_tokens(
        cfg, params, prompts, stop_ids=[2], on_tokens=lambda t, a: steps.append((t, a)), **kw
    )
    assert streamed == plain
    assert len(steps) == 16  # one call per step, from inside the loop
    assert [[int(t[r]) for t, a in steps if a[r]] for r in range(3)] == plain
    # a stop token: its step and the later ones are inactive for that row
    stop = plain[1][4]
    want = [row[: row.index(stop)] if stop in row else row for row in plain]
    steps.clear()
    got = generate_tokens(
        cfg, params, prompts, stop_ids=[2, stop], on_tokens=lambda t, a: steps.append(a), **kw
    )
    assert got == want and len(got[1]) == 4
    assert [sum(bool(a[r]) for a in steps) for r in range(3)] == [len(x) for x in want]

    # the host ends row 0 after its 4th token: row 0 keeps 4 tokens, the others are unchanged
    def stop_row0(tokens, active):
        steps.append(1)
        return np.asarray([len(steps) == 4, False, False])

    steps.clear()
    got = generate_tokens(cfg, params, prompts, stop_ids=[2], on_tokens=stop_row0, **kw)
    assert got == [plain[0][:4], plain[1], plain[2]]

    def fails(tokens, active):  # the callback's own error, not an XLA runtime error
        steps.append(1)
        raise OSError("broken pipe")

    steps.clear()
    with pytest.raises(OSError, match="broken pipe"):
        generate_tokens(cfg, params, prompts, stop_ids=[2], on_tokens=fails, **kw)
    assert len(steps) == 1  # the loop ended at once


class _ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (1 BOS, 2 EOS, 0 pad); decode replaces broken bytes."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

    def encode(self, text, bos=False):
        return ([1] if bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def test_text_stream_holds_partial_characters_and_stop_strings():
    from herd.lm.generate import TextStream

    tok = _ByteTokenizer()
    text = "héllo 日本 🙂 wörld END tail"
    s = TextStream(tok.decode)
    pieces = [s.push(i) for i in tok.encode(text)] + [s.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert sum(bool(p) for p in pieces) > 10  # printed as it comes
    s = TextStream(tok.decode, stop_strings=["END", "日本語"])
    for i in tok.encode("héllo 日本"):
        s.push(i)
    assert s.emitted == "héllo "  # '日本' may begin '日本語': held
    pieces = [s.emitted]
    for i in tok.encode(" 🙂 wörld END tail"):
        pieces.append(s.push(i))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert s.stopped and "".join(pieces) == "héllo 日本 🙂 wörld "


def test_generate_streaming_text_equals_final_text():
    cfg, params, kw = _stream_setup()
    tok = _ByteTokenizer()
    prompts = ["é", "日本語の"]
    plain = generate(cfg, params, tok, prompts, **kw)
    pieces = {0: [], 1: []}
    streamed = generate(cfg, params, tok, prompts, on_text=lambda r, t: pieces[r].append(t), **kw)
    assert streamed == plain
    assert ["".join(pieces[r]) for r in (0, 1)] == plain
    assert all(len(pieces[r]) > 1 for r in (0, 1))
    # a stop string ends the row during generation: same text as cutting afterwards
    stop = plain[1][5:7]
    cut = generate(cfg, params, tok, prompts, stop_strings=[stop], **kw)
    pieces = {0: [], 1: []}
    got = generate(
        cfg, params, tok, prompts, stop_strings=[stop], on_text=lambda r, t: pieces[r].append(t),
        **kw,
    )  # fmt: skip
    assert got == cut and ["".join(pieces[r]) for r in (0, 1)] == cut
