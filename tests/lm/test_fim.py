"""Code Llama fill-in-the-middle: the document transform, sentinels, infilling prompt."""

import math

import numpy as np
import pytest

from herd.lm import fim
from herd.lm import tokenizer as tl
from herd.lm.data import stdlib_files


@pytest.fixture(scope="module")
def files():
    train, _ = stdlib_files("train", eval_fraction=0.05)
    return train


@pytest.fixture(scope="module")
def tok(tmp_path_factory, files):
    """A herd code tokenizer (no dummy prefix) with the FIM sentinels as user-defined pieces."""
    path = tmp_path_factory.mktemp("tok") / "fim.model"
    return tl.train_tokenizer(
        files[::80],
        512,
        path,
        max_sentences=5000,
        user_defined_symbols=fim.FIM_USER_DEFINED_SYMBOLS,
    )


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory, files):
    """A LLaMA-style model (implicit leading space) whose sentinels are '\u2581<PRE>' ... like
    Code Llama's."""
    path = tmp_path_factory.mktemp("tok") / "llama.model"
    syms = ["\n"] + ["\u2581" + p for p in fim.FIM_PIECES]
    return tl.train_tokenizer(
        files[::120], 400, path, max_sentences=3000, add_dummy_prefix=True, pad_id=-1,
        user_defined_symbols=syms,
    )  # fmt: skip


@pytest.fixture(scope="module")
def docs(files):
    """Some real Python files (the stdlib's own), without FIM sentinel text in them."""
    out = []
    for p in files[7::150]:
        with open(p, encoding="utf-8", errors="strict") as f:
            try:
                text = f.read()
            except UnicodeDecodeError:
                continue
        if 200 < len(text) < 60_000 and not any(s in text for s in fim.FIM_PIECES):
            out.append(text)
        if len(out) == 6:
            break
    assert len(out) == 6
    return out


class CharTok:
    """A fake tokenizer (one id per character): for the random decisions, which do not depend
    on the tokenizer."""

    vocab_size, bos_id, eos_id, pad_id = 1_000_000, 1, 2, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [10 + ord(c) for c in text] + [2] * eos

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)


FAKE_FIM = fim.FimTokens(3, 4, 5, 6)


def _positions(ids, t):
    pos = {}
    for name, sid in zip(fim.FIM_PIECES, t.as_tuple(), strict=True):
        where = [k for k, i in enumerate(ids) if i == sid]
        assert len(where) == 1, (name, where)
        pos[name] = where[0]
    return pos


def test_sentinels_resolved(tok, llama_tok):
    t = fim.FimTokens.from_tokenizer(tok)
    assert t.as_tuple() == tuple(tok.piece_to_id(p) for p in fim.FIM_PIECES)
    assert len(set(t.as_tuple()) | {tok.bos_id, tok.eos_id, tok.unk_id}) == 7
    assert tok.decode([t.pre, t.eot]) == "<PRE><EOT>"
    t2 = fim.FimTokens.from_tokenizer(llama_tok)
    assert t2.as_tuple() == tuple(llama_tok.piece_to_id("\u2581" + p) for p in fim.FIM_PIECES)
    assert fim.CODE_LLAMA_FIM.as_tuple() == (32007, 32008, 32009, 32010)


def test_missing_fim_tokens_error(tmp_path, files):
    plain = tl.train_tokenizer(files[:6], 600, tmp_path / "plain.model", max_sentences=2000)
    with pytest.raises(ValueError, match=r"<PRE>, <SUF>, <MID>, <EOT>.*FIM_USER_DEFINED_SYMBOLS"):
        fim.FimTokens.from_tokenizer(plain)
    with pytest.raises(ValueError, match="no FIM sentinel"):
        fim.FimTransform(plain)
    with pytest.raises(ValueError, match="no FIM sentinel"):
        fim.infilling_prompt("a", "b", plain)

    class Partial(CharTok):
        special_tokens = {"<PRE>": 3, "<SUF>": 4}

    with pytest.raises(ValueError, match=r"token\(s\) <MID>, <EOT> "):
        fim.FimTokens.from_tokenizer(Partial())
    with pytest.raises(ValueError, match="distinct"):
        fim.FimTokens(3, 3, 4, 5)


@pytest.mark.parametrize("fmt", ["psm", "spm"])
def test_round_trip_and_layout_on_stdlib(tok, docs, fmt):
    t = fim.FimTokens.from_tokenizer(tok)
    tr = fim.FimTransform(tok, rate=1.0, spm_rate=1.0 if fmt == "spm" else 0.0)
    rng = np.random.default_rng(0)
    for text in docs:
        s = tr(text, rng)
        assert s.fmt == fmt
        prefix, middle, suffix = s.parts(text)
        assert prefix + middle + suffix == text
        ids = s.ids
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        p = _positions(ids, t)
        if fmt == "psm":
            assert p["<PRE>"] == 1 < p["<SUF>"] < p["<MID>"] < p["<EOT>"] == len(ids) - 2
            assert ids[p["<PRE>"] + 1 : p["<SUF>"]] == tok.encode(prefix)
            assert ids[p["<SUF>"] + 1 : p["<MID>"]] == tok.encode(suffix)
            assert ids[p["<MID>"] + 1 : p["<EOT>"]] == tok.encode(middle)
            assert tok.decode(ids[p["<MID>"] + 1 : p["<EOT>"]]) == middle
        else:
            assert (p["<PRE>"], p["<SUF>"]) == (1, 2)
            assert p["<SUF>"] < p["<MID>"] < p["<EOT>"] == len(ids) - 2
            assert ids[p["<SUF>"] + 1 : p["<MID>"]] == tok.encode(suffix)
            assert ids[p["<MID>"] + 1 : p["<EOT>"]] == tok.encode(prefix + middle)  # joint
        assert tok.decode(ids[p["<SUF>"] + 1 : p["<MID>"]]) == suffix


def test_spm_separate_encoding_matches_prompt(tok, docs):
    """spm_joint=False encodes prefix and middle apart: the infilling prompt is then exactly
    the start of the training sequence, for both formats."""
    t = fim.FimTokens.from_tokenizer(tok)
    for fmt, joint in [("psm", True), ("spm", False)]:
        tr = fim.FimTransform(tok, rate=1.0, spm_rate=float(fmt == "spm"), spm_joint=joint)
        for k, text in enumerate(docs[:3]):
            s = tr.for_record(text, seed=5, index=k)
            prefix, middle, suffix = s.parts(text)
            prompt = fim.infilling_prompt(prefix, suffix, tok, fmt)
            assert s.ids[: len(prompt)] == prompt
            rest = s.ids[len(prompt) :]
            assert rest == tok.encode(middle) + [t.eot, tok.eos_id]
            got, finished = fim.infill_text(rest, tok)
            assert (got, finished) == (middle, True)


def test_infilling_prompt_layout(tok):
    t = fim.FimTokens.from_tokenizer(tok)
    pre, suf = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    e = tok.encode
    assert fim.infilling_prompt(pre, suf, tok) == (
        [tok.bos_id, t.pre] + e(pre) + [t.suf] + e(suf) + [t.mid]
    )
    assert fim.infilling_prompt(pre, suf, tok, "spm") == (
        [tok.bos_id, t.pre, t.suf] + e(suf) + [t.mid] + e(pre)
    )
    assert fim.infilling_prompt(pre, suf, tok, "psm", bos=False)[0] == t.pre
    with pytest.raises(ValueError, match="psm"):
        fim.infilling_prompt(pre, suf, tok, "pms")


def test_leading_space_suppressed_for_dummy_prefix_models(llama_tok, docs):
    tk = llama_tok
    assert tk.model_proto.normalizer_spec.add_dummy_prefix
    for s in ["x = 1", "  return y\n", " a", "", "\n\tz"]:
        ids = fim.encode_no_leading_space(tk, s)
        assert fim.decode_middle(ids, tk) == s
    # plain encode adds a space the infilling encoding does not
    assert fim.encode_no_leading_space(tk, "x") != tk.encode("x")
    t = fim.FimTokens.from_tokenizer(tk)
    pre, suf = "if x:", " y = 2\n"
    prompt = fim.infilling_prompt(pre, suf, tk)
    assert prompt == [tk.bos_id, t.pre] + tk.encode(pre) + [t.suf] + (
        fim.encode_no_leading_space(tk, suf)
    ) + [t.mid]
    tr = fim.FimTransform(tk, rate=1.0, spm_rate=0.0)
    for text in docs[:3]:
        sample = tr(text, 11)
        prefix, middle, suffix = sample.parts(text)
        p = _positions(sample.ids, t)
        assert fim.decode_middle(sample.ids[p["<SUF>"] + 1 : p["<MID>"]], tk) == suffix
        assert fim.decode_middle(sample.ids[p["<MID>"] + 1 : p["<EOT>"]], tk) == middle


def test_rates_match_config_binomial():
    """Over many documents the FIM share is `rate` and the SPM share of those `spm_rate`,
    within 4 binomial standard deviations (fixed seed: deterministic)."""
    docs = ["".join(chr(97 + (k * 7 + i) % 26) for i in range(20 + k % 50)) for k in range(4000)]
    for rate, spm_rate in [(0.9, 0.5), (0.3, 0.8)]:
        tr = fim.FimTransform(CharTok(), rate=rate, spm_rate=spm_rate, fim_tokens=FAKE_FIM)
        rng = np.random.default_rng(1234)
        samples = [tr(d, rng) for d in docs]
        n = len(docs)
        n_fim = sum(s.fmt is not None for s in samples)
        n_spm = sum(s.fmt == "spm" for s in samples)
        assert abs(n_fim / n - rate) <= 4 * math.sqrt(rate * (1 - rate) / n)
        assert abs(n_spm / n_fim - spm_rate) <= 4 * math.sqrt(spm_rate * (1 - spm_rate) / n_fim)
        # cut points uniform over the document: E[min] = 1/3, E[max] = 2/3 of its length
        lo = [s.cut[0] / len(d) for s, d in zip(samples, docs, strict=True) if s.cut]
        hi = [s.cut[1] / len(d) for s, d in zip(samples, docs, strict=True) if s.cut]
        assert abs(np.mean(lo) - 1 / 3) < 0.02 and abs(np.mean(hi) - 2 / 3) < 0.02
        for s, d in zip(samples, docs, strict=True):
            if s.fmt is None:
                assert s.ids == [1] + [10 + ord(c) for c in d] + [2]
            else:
                assert "".join(s.parts(d)) == d
                assert [i for i in s.ids if 3 <= i <= 6] == (
                    [3, 4, 5, 6]
                )  # <PRE> <SUF> <MID> <EOT> in this order in both formats


def test_deterministic_per_record():
    tr = fim.FimTransform(CharTok(), fim_tokens=FAKE_FIM)
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    a = [tr.for_record(text, 7, i) for i in range(50)]
    b = [tr.for_record(text, 7, i) for i in reversed(range(50))][::-1]
    assert a == b
    c = [tr.for_record(text, 8, i) for i in range(50)]
    assert a != c
    assert tr(text, 3) == tr(text, np.random.default_rng(3))


def test_max_tokens_leaves_long_documents_plain():
    tr = fim.FimTransform(CharTok(), rate=1.0, fim_tokens=FAKE_FIM, max_tokens=30)
    assert tr("x" * 10, 0).fmt is not None
    long = tr("x" * 40, 0)
    assert long.fmt is None and long.ids == CharTok().encode("x" * 40, True, True)


def test_split_infill_output():
    t = FAKE_FIM
    assert fim.split_infill_output([50, 51, 6, 52], t) == ([50, 51], True)
    assert fim.split_infill_output([50, 2, 51, 6], t, stop_ids=[2]) == ([50], False)
    assert fim.split_infill_output(np.array([50, 51]), t) == ([50, 51], False)
    assert fim.infill_text([10 + ord("a"), 6, 10 + ord("b")], CharTok(), t) == ("a", True)


def test_bad_config():
    with pytest.raises(ValueError, match="rate"):
        fim.FimTransform(CharTok(), rate=1.5, fim_tokens=FAKE_FIM)
    with pytest.raises(ValueError, match="spm_rate"):
        fim.FimTransform(CharTok(), spm_rate=-0.1, fim_tokens=FAKE_FIM)
    with pytest.raises(TypeError):
        fim.FimTransform(CharTok(), fim_tokens=FAKE_FIM)(b"bytes", 0)


# ----------------------------------------------------------------- infilling evaluation

SOURCE = "import os\n\n\ndef f(x):\n    if x:\n        return 1\n    else:\n        return 2\n"


def test_single_line_examples_cut_whole_lines(docs):
    ex = fim.single_line_examples(docs, 50, seed=3, max_prefix_chars=120, max_suffix_chars=90)
    assert len(ex) == 50 and len({e.where for e in ex}) == 50
    assert ex == fim.single_line_examples(
        docs, 50, seed=3, max_prefix_chars=120, max_suffix_chars=90
    )  # deterministic
    assert ex != fim.single_line_examples(docs, 50, seed=4, max_prefix_chars=120)
    for e in ex:
        assert e.middle.strip() and "\n" not in e.middle and len(e.middle) <= 80
        assert len(e.prefix) <= 120 and len(e.suffix) <= 90
        assert e.prefix == "" or e.prefix.endswith("\n")  # the line starts a line
        assert e.suffix == "" or e.suffix.startswith(("\n", "\r\n"))
        assert any(e.prefix + e.middle + e.suffix in d for d in docs)
        doc = next(d for d in docs if e.prefix + e.middle + e.suffix in d)
        start = doc.index(e.prefix + e.middle + e.suffix)
        assert start == 0 or doc[start - 1] == "\n"  # the prefix starts at a line start
        end = start + len(e.prefix + e.middle + e.suffix)
        assert end == len(doc) or e.suffix.endswith("\n")  # the suffix ends at a line end


def test_single_line_examples_small_document_and_errors():
    ex = fim.single_line_examples([SOURCE], 6, seed=0, names=["m.py"])
    assert sorted(e.where for e in ex) == [f"m.py:{k}" for k in (1, 4, 5, 6, 7, 8)]
    e = next(e for e in ex if e.where == "m.py:7")
    cut = SOURCE.index("    else:")
    assert (e.prefix, e.middle, e.suffix) == (SOURCE[:cut], "    else:", "\n        return 2\n")
    with pytest.raises(ValueError, match="only 6 non-blank lines"):
        fim.single_line_examples([SOURCE], 7)
    with pytest.raises(ValueError, match="max_line_chars must be >= 1, got 0"):
        fim.single_line_examples([SOURCE], 1, max_line_chars=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        fim.single_line_examples([SOURCE], 0)


def test_infill_exact_match_prompts_and_scoring(tok, monkeypatch):
    """The prompts handed to generate_tokens and how its output is scored (the generation
    itself is herd.lm.generate's, tested there)."""
    from herd.lm import generate as gen

    t = fim.FimTokens.from_tokenizer(tok)
    nl = tok.encode("\n")
    assert len(nl) == 1
    ex = [
        fim.InfillExample("def f(x):\n", "    return x", "\n\nY = 2\n"),
        fim.InfillExample("if a:\n    b()\n", "else:", "\n    c()\n"),
        fim.InfillExample("", "import os", "\nimport sys\n"),
    ]
    seen = {}

    def fake(config, params, prompts, *, max_new_tokens, stop_ids, pad_id, mesh=None):
        seen.update(prompts=prompts, stops=set(stop_ids), max_new=max_new_tokens)
        return [
            tok.encode("    return x  "),  # trailing spaces: still exact
            tok.encode("else"),  # wrong
            tok.encode("import os") + nl + tok.encode("junk"),  # cut at the newline
        ][: len(prompts)]

    monkeypatch.setattr(gen, "generate_tokens", fake)
    cfg = type("C", (), {"vocab_size": tok.vocab_size})()
    r = fim.infill_exact_match(cfg, None, tok, ex, mode="psm", max_new_tokens=20)
    assert (r.exact, r.n, r.rate, r.finished) == (2, 3, 2 / 3, 3)
    assert r.predictions == ("    return x  ", "else", "import os")
    assert seen["prompts"] == [fim.infilling_prompt(e.prefix, e.suffix, tok, "psm") for e in ex]
    assert seen["stops"] == {t.eot} and seen["max_new"] == 20
    r = fim.infill_exact_match(cfg, None, tok, ex, mode="left_to_right", max_new_tokens=4)
    lengths = [len(tok.encode(x)) for x in ("    return x  ", "else", "import os\njunk")]
    assert r.finished == sum(n < 4 for n in lengths) < 3  # a row of 4 ran out of budget
    assert seen["prompts"] == [tok.encode(e.prefix, bos=True) for e in ex]
    assert seen["stops"] == {tok.eos_id, nl[0]}  # no <EOT> without FIM
    fim.infill_exact_match(cfg, None, tok, ex, mode="spm")
    assert seen["prompts"][1] == fim.infilling_prompt(ex[1].prefix, ex[1].suffix, tok, "spm")
    with pytest.raises(ValueError, match="infill mode must be one of"):
        fim.infill_exact_match(cfg, None, tok, ex, mode="sideways")
    with pytest.raises(ValueError, match="no infilling examples"):
        fim.infill_exact_match(cfg, None, tok, [], mode="psm")


def test_infill_line_logprob_matches_a_direct_forward(tok):
    """Each example's sum of log p(target) in a padded batch equals an unpadded forward of
    that example alone, for the line + <EOT> after a PSM prompt and the line + newline left
    to right."""
    import jax
    import jax.numpy as jnp

    from herd.lm.config import LlamaConfig
    from herd.lm.model import Llama

    cfg = LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=tok.vocab_size,
        max_seq_len=256, dtype="float32", scan_layers=True,
    )  # fmt: skip
    model = Llama(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    ex = fim.single_line_examples([SOURCE * 3], 5, seed=1, max_prefix_chars=60)
    t = fim.FimTokens.from_tokenizer(tok)

    @jax.jit
    def log_probs(ids):  # right padding never changes a causal model's earlier positions
        return jax.nn.log_softmax(model.apply({"params": params}, ids)[0], axis=-1)

    for mode in ("psm", "left_to_right"):
        got = fim.infill_line_logprob(cfg, params, tok, ex, mode=mode, batch_size=4)
        lines = fim.infill_line_logprob(cfg, params, tok, ex, mode=mode, with_end=False)
        for e, value, line_only in zip(ex, got, lines, strict=True):
            if mode == "psm":
                prompt = fim.infilling_prompt(e.prefix, e.suffix, tok, "psm")
                target = tok.encode(e.middle) + [t.eot]
            else:
                prompt = tok.encode(e.prefix, bos=True)
                target = tok.encode(e.middle) + tok.encode("\n")
            ids = np.zeros((1, 256), np.int32)
            ids[0, : len(prompt) + len(target)] = prompt + target
            logp = log_probs(ids)
            want = [float(logp[len(prompt) - 1 + k, tok_id]) for k, tok_id in enumerate(target)]
            np.testing.assert_allclose(value, sum(want), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(line_only, sum(want[:-1]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="more than the model's max_seq_len"):
        long = [fim.InfillExample("x = 1\n" * 200, "y", "\n")]
        fim.infill_line_logprob(cfg, params, tok, long, mode="left_to_right")
