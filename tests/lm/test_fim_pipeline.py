"""Code Llama FIM in the LM data pipeline and in training (herd.lm.data fim_rate)."""

import json
import math

import numpy as np
import pytest

from herd.core.config import load_config
from herd.lm import data as dl
from herd.lm import fim
from herd.lm import tokenizer as tl


class ByteFimTokenizer:
    """utf-8 bytes + 3 (pad 0, bos 1, eos 2) and the four FIM sentinels as special tokens."""

    vocab_size = 263
    pad_id, bos_id, eos_id = 0, 1, 2
    special_tokens = {"<PRE>": 259, "<SUF>": 260, "<MID>": 261, "<EOT>": 262}

    def encode(self, text, bos=False, eos=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8")


class PlainByteTokenizer(ByteFimTokenizer):
    special_tokens = {}


BYTE = ByteFimTokenizer()


def write_docs(tmp_path, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        body = "".join(rng.choice(list("abcdef ghij\n"), size=int(rng.integers(5, 60))))
        p = tmp_path / f"d{i:04d}.txt"
        p.write_text(f"#{i}\n{body}", encoding="utf-8")
        paths.append(str(p))
    return paths


def segments(batches):
    """Each packed segment's tokens (inputs + the last target) in stream order."""
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == s)
                out.append(list(b["inputs"][r, idx]) + [int(b["targets"][r, idx[-1]])])
    return out


def documents(batches, bos):
    """Segments joined back into documents (a piece continuing a document has no BOS)."""
    docs = []
    for seg in segments(batches):
        if seg[0] == bos or not docs:
            docs.append(seg)
        else:
            docs[-1] = docs[-1] + seg[1:]  # a continuation repeats the previous last target
    return docs


def it(paths, tok, **kw):
    args = dict(seq_len=64, batch_size=4, seed=3, shard_index=0, shard_count=1, read_threads=1)
    return dl.make_lm_iterator(paths, tok, **{**args, **kw})


def _split(ids, t):
    """(fmt, prefix ids, middle ids, suffix ids) of a FIM sequence [BOS ... EOS]."""
    body = ids[1:-1]
    assert [i for i in body if i in t.as_tuple()] == list(t.as_tuple()), body
    p, s, m, e = (body.index(x) for x in t.as_tuple())
    assert p == 0 and e == len(body) - 1
    if s == 1:  # SPM: <PRE> <SUF> suffix <MID> prefix+middle <EOT>
        return "spm", body[m + 1 : e], [], body[s + 1 : m]
    return "psm", body[1:s], body[m + 1 : e], body[s + 1 : m]


# ----------------------------------------------------------------- real tokenizer, stdlib


@pytest.fixture(scope="module")
def stdlib_tok(tmp_path_factory):
    files, _ = dl.stdlib_files("train", eval_fraction=0.05)
    path = tmp_path_factory.mktemp("tok") / "fim.model"
    tok = tl.train_tokenizer(
        files[::80], 512, path, max_sentences=5000,
        user_defined_symbols=fim.FIM_USER_DEFINED_SYMBOLS,
    )  # fmt: skip
    small = []
    for p in files:
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        if (
            40 < len(text) < 1500
            and not any(s in text for s in fim.FIM_PIECES)
            and tok.decode(tok.encode(text)) == text
            and len(tok.encode(text)) < 400
        ):
            small.append((p, text))
        if len(small) == 24:
            break
    assert len(small) == 24
    return tok, small


def test_rate_one_every_document_is_fim_and_reassembles(stdlib_tok):
    tok, small = stdlib_tok
    t = fim.FimTokens.from_tokenizer(tok)
    paths = [p for p, _ in small]
    itr = it(paths, tok, seq_len=512, num_epochs=1, fim_rate=1.0, fim_spm_rate=0.5)
    batches = list(itr)
    docs = documents(batches, tok.bos_id)
    assert len(docs) == len(small)
    got, fmts = [], []
    for ids in docs:
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        fmt, pre, mid, suf = _split(ids, t)
        fmts.append(fmt)
        if fmt == "psm":
            got.append(tok.decode(pre) + tok.decode(mid) + tok.decode(suf))
        else:
            got.append(tok.decode(pre) + tok.decode(suf))  # prefix+middle encoded jointly
    assert sorted(got) == sorted(text for _, text in small)
    assert set(fmts) == {"psm", "spm"}
    c = itr.counters
    assert c["fim_psm"] + c["fim_spm"] == len(small) and c.get("fim_none", 0) == 0
    assert c["fim_spm"] == fmts.count("spm")


# ----------------------------------------------------------------- byte tokenizer (fast)


def test_rate_half_binomial_and_new_decisions_each_epoch(tmp_path):
    paths = write_docs(tmp_path, 300)
    epochs = 3
    itr = it(paths, BYTE, seq_len=128, num_epochs=epochs, fim_rate=0.5, fim_spm_rate=0.25)
    batches = list(itr)
    c = itr.counters
    n = len(paths) * epochs
    assert c["docs"] == n and c["fim_psm"] + c["fim_spm"] + c["fim_none"] == n
    n_fim = c["fim_psm"] + c["fim_spm"]
    assert abs(n_fim / n - 0.5) <= 4 * math.sqrt(0.25 / n)
    assert abs(c["fim_spm"] / n_fim - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / n_fim)
    # the same record is not transformed the same way in every epoch
    t = fim.FimTokens.from_tokenizer(BYTE)
    per_record = {}
    for ids in documents(batches, BYTE.bos_id):
        if t.pre in ids:
            _, pre, mid, suf = _split(ids, t)
            text = BYTE.decode(pre) + BYTE.decode(mid) + BYTE.decode(suf)
            key = "spm" if ids[2] == t.suf else "psm"
        else:
            text, key = BYTE.decode(ids), "plain"
        per_record.setdefault(text, []).append((key, len(pre) if key != "plain" else -1))
    assert len(per_record) == len(paths)
    assert all(len(v) == epochs for v in per_record.values())
    assert sum(len(set(v)) > 1 for v in per_record.values()) > len(paths) // 2


def test_rate_zero_is_todays_pipeline(tmp_path):
    paths = write_docs(tmp_path, 40)
    plain = list(it(paths, BYTE, num_epochs=2))
    off = it(paths, BYTE, num_epochs=2, fim_rate=0.0, fim_spm_rate=0.9)
    zero = list(off)
    assert len(plain) == len(zero) > 0
    for a, b in zip(plain, zero, strict=True):
        for k in dl.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not any(k.startswith("fim") for k in off.counters)
    texts = {open(p, encoding="utf-8").read() for p in paths}
    assert {BYTE.decode(d) for d in documents(zero, BYTE.bos_id)} == texts
    assert all(t not in d for d in documents(zero, 1) for t in range(259, 263))


def test_resume_mid_stream_with_fim_is_exact(tmp_path):
    paths = write_docs(tmp_path, 50)
    kw = dict(seq_len=32, batch_size=3, fim_rate=0.9, fim_spm_rate=0.5)
    ref_it = it(paths, BYTE, **kw)
    ref = [next(ref_it) for _ in range(60)]  # several epochs of 50 short documents
    ref_counters = dict(ref_it.counters)
    assert ref_counters["fim_psm"] > 0 and ref_counters["fim_spm"] > 0
    for cut in (1, 17, 41):
        a = it(paths, BYTE, **kw)
        for _ in range(cut):
            next(a)
        state = json.loads(json.dumps(a.get_state()))
        b = it(paths, BYTE, **kw)
        b.set_state(state)
        rest = [next(b) for _ in range(60 - cut)]
        for x, y in zip(ref[cut:], rest, strict=True):
            for k in dl.BATCH_KEYS:
                np.testing.assert_array_equal(x[k], y[k])
        assert b.counters == ref_counters


def test_token_id_records_pass_through(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": [10, 11, 12]}, {"text": "abc def"}, {"text": [13, 14]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    itr = it(f"jsonl:{p}", BYTE, shuffle=False, num_epochs=1, fim_rate=1.0)
    docs = documents(list(itr), BYTE.bos_id)
    assert docs[0] == [1, 10, 11, 12, 2] and docs[2] == [1, 13, 14, 2]
    assert 259 in docs[1]
    assert itr.counters["fim_skipped_token_records"] == 2
    assert itr.counters.get("fim_psm", 0) + itr.counters.get("fim_spm", 0) == 1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"fim_rate": 1.5}, "fim_rate must be a number in"),
        ({"fim_rate": 0.5, "fim_spm_rate": -0.1}, "fim_spm_rate must be a number in"),
    ],
)
def test_bad_rates_raise(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        it(write_docs(tmp_path, 3), BYTE, **kw)


def test_tokenizer_without_sentinels_raises(tmp_path):
    with pytest.raises(ValueError, match="no FIM sentinel"):
        it(write_docs(tmp_path, 3), PlainByteTokenizer(), fim_rate=0.9)
    # rate 0: no sentinels needed
    next(it(write_docs(tmp_path, 3), PlainByteTokenizer(), fim_rate=0.0))


# ----------------------------------------------------------------- training


@pytest.fixture
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HERD_CACHE", str(tmp_path_factory.getbasetemp() / "herd_cache"))


def _cfg(name="configs/lm/tiny_fim.py", **over):
    cfg = load_config(name)
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        node[last] = v
    return cfg


@pytest.mark.parametrize(
    "over, match",
    [
        ({"data.fim_rate": 1.5}, r"data\.fim_rate must be a number in \[0, 1\]"),
        ({"data.fim_spm_rate": -0.5}, r"data\.fim_spm_rate must be a number in \[0, 1\]"),
    ],
)
def test_train_bad_rates_raise_before_compiling(over, match, tmp_path, monkeypatch, _cache):
    from herd.lm import train

    monkeypatch.setattr(train, "_build", lambda *a: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=match):
        train.run(_cfg(**over), str(tmp_path / "w"))


def test_train_tokenizer_without_sentinels_raises_before_compiling(tmp_path, monkeypatch, _cache):
    from herd.lm import train

    files, _ = dl.stdlib_files("train")
    plain = str(tmp_path / "plain.model")
    tl.train_tokenizer(files[:20], 512, plain)
    monkeypatch.setattr(train, "_build", lambda *a: pytest.fail("compiled"))
    with pytest.raises(ValueError, match="no FIM sentinel"):
        train.run(_cfg(**{"data.tokenizer": plain}), str(tmp_path / "w"))


def test_tiny_fim_trains(tmp_path, _cache):
    from herd.lm import train

    cfg = _cfg(**{"train.steps": 2, "train.eval_batches": 1, "train.sample_tokens": 2})
    out = train.run(cfg, str(tmp_path / "w"))
    assert out["final_step"] == 2
    assert all(math.isfinite(v["eval_loss"]) for v in out["eval"].values())
    # its tokenizer (trained here, cached apart from tiny.py's) has the sentinels
    tok = tl.load_tokenizer(tl.workdir_tokenizer_path(str(tmp_path / "w")))
    fim.FimTokens.from_tokenizer(tok)


# ----------------------------------------------------------------- documents of max_doc_chars

CODE = '''"""Module docstring."""
import os
import sys

X = 1


@decorator
def f(a):
    """f's docstring."""
    return a + 1


# a comment about C
class C:
    def m(self):
        return (
            1
        )

    def n(self):
        pass


if __name__ == "__main__":
    f(2)
'''


def test_split_code_document_cuts_before_top_level_statements():
    pieces = dl.split_code_document(CODE, 120)
    assert "".join(pieces) == CODE and all(0 < len(p) <= 120 for p in pieces)
    # whole top-level statements, as many as fit; a decorator / comment stays with its
    # statement
    assert pieces[1].startswith("# a comment about C\nclass C:\n") and "def n" in pieces[1]
    assert pieces[2] == 'if __name__ == "__main__":\n    f(2)\n'
    assert dl.split_code_document(CODE, len(CODE)) == [CODE]  # fits: one document
    # 'class C' (> 80 chars) is cut before its methods, not between the comment and it
    small = dl.split_code_document(CODE, 80)
    assert "".join(small) == CODE and all(len(p) <= 80 for p in small)
    assert "# a comment about C\nclass C:\n" in small
    assert "@decorator\ndef f(a):\n" in small[1]
    method_m = "    def m(self):\n        return (\n            1\n        )\n"
    assert any(p.startswith(method_m) for p in small)
    for size in (30, 60, 80, 120):  # never before a closing bracket or after a decorator
        for p in dl.split_code_document(CODE, size)[1:]:
            assert p.lstrip()[:1] not in (")", "]", "}") and not p.startswith("def f"), (size, p)


def test_split_code_document_long_lines_and_bad_sizes():
    text = "x = '" + "a" * 250 + "'\ny = 2\n"
    pieces = dl.split_code_document(text, 100)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert dl.split_code_document("", 10) == []
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"max_chars must be >= 1, got {bad}"):
            dl.split_code_document(text, bad)
    with pytest.raises(TypeError, match="max_chars must be an int"):
        dl.split_code_document(text, 1.5)


def test_split_code_document_on_stdlib_round_trips():
    files, _ = dl.stdlib_files("train")
    n_docs = n_files = 0
    for path in files[::25]:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        pieces = dl.split_code_document(text, 400)
        assert "".join(pieces) == text, path
        assert all(0 < len(p) <= 400 for p in pieces), path
        n_docs, n_files = n_docs + len(pieces), n_files + 1
    assert n_docs > 10 * n_files  # stdlib files are long: many documents per file


def test_max_doc_chars_pipeline_same_text_with_and_without_fim(tmp_path):
    # files of several top-level blocks: cut into documents, each packed as its own
    # document with BOS/EOS; FIM (rate 1) then reaches every one of them
    paths = []
    for i in range(6):
        body = "".join(f"def f{i}_{k}(x):\n    return x + {k}\n\n" for k in range(12))
        p = tmp_path / f"m{i}.py"
        p.write_text(body, encoding="utf-8")
        paths.append(str(p))
    expected = sorted(d for p in paths for d in dl.split_code_document(open(p).read(), 120))
    assert len(expected) > 6 * 3
    plain = list(it(paths, BYTE, seq_len=160, num_epochs=1, max_doc_chars=120))
    got = sorted(BYTE.decode(d[1:-1]) for d in documents(plain, BYTE.bos_id))
    assert got == expected
    itr = it(paths, BYTE, seq_len=160, num_epochs=1, max_doc_chars=120, fim_rate=1.0)
    batches = list(itr)
    c = itr.counters
    assert c["fim_psm"] + c["fim_spm"] == len(expected) and c.get("fim_none", 0) == 0
    t = fim.FimTokens.from_tokenizer(BYTE)
    texts = []
    for ids in documents(batches, BYTE.bos_id):
        fmt, pre, mid, suf = _split(ids, t)
        texts.append(BYTE.decode(pre) + BYTE.decode(mid) + BYTE.decode(suf))
    assert sorted(texts) == expected
    # without the cut, the whole files do not fit a row of 160: FIM leaves all of them plain
    itr = it(paths, BYTE, seq_len=160, num_epochs=1, fim_rate=1.0)
    list(itr)
    assert itr.counters["fim_none"] == len(paths) and itr.counters.get("fim_psm", 0) == 0


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_max_doc_chars_raises(tmp_path, bad):
    with pytest.raises(ValueError, match="max_doc_chars must be"):
        it(write_docs(tmp_path, 3), BYTE, max_doc_chars=bad)


def test_code_document_source_describes_pieces(tmp_path):
    p = tmp_path / "a.py"
    p.write_text(CODE, encoding="utf-8")
    src = dl.CodeDocumentSource(dl.make_source([str(p)]), 120)
    assert len(src) == len(dl.split_code_document(CODE, 120))
    assert [src[i] for i in range(len(src))] == dl.split_code_document(CODE, 120)
    assert src.describe(1) == f"{p} (document 1)"
    assert dl.code_documents([str(p)], 120) == dl.split_code_document(CODE, 120)


def test_train_passes_max_doc_chars_to_both_iterators(tmp_path, monkeypatch, _cache):
    """data.max_doc_chars reaches the train and eval pipelines; a bad value is refused first."""
    from herd.lm import train

    seen = []
    real = dl.make_lm_iterator

    def spy(*args, **kwargs):
        seen.append(kwargs["max_doc_chars"])
        return real(*args, **kwargs)

    class Built(Exception):
        pass

    def stop(*a):
        raise Built

    monkeypatch.setattr(train.data_lib, "make_lm_iterator", spy)
    monkeypatch.setattr(train, "_build", stop)
    with pytest.raises(Built):
        train.run(_cfg(**{"data.max_doc_chars": 300}), str(tmp_path / "w"))
    assert seen == [300, 300]
    with pytest.raises(ValueError, match=r"data\.max_doc_chars must be an int >= 0.*-1"):
        train.run(_cfg(**{"data.max_doc_chars": -1}), str(tmp_path / "w2"))
