"""LM data pipeline: sources, packing (no token lost), shuffling, sharding, checkpointing."""

import json
import logging
import os

import numpy as np
import pytest

from herd.core import data as cd
from herd.lm import data as dl
from herd.lm import ramp as ramp_lib
from herd.lm import tokenizer as tl


class ByteTokenizer:
    """ids = utf-8 bytes + 3; pad 0, bos 1, eos 2 (exact, fast, easy to reason about)."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, bos=False, eos=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


TOK = ByteTokenizer()


def write_docs(tmp_path, texts, prefix="doc"):
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"{prefix}{i:04d}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


def doc_texts(n, seed=0, max_len=90):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, max_len))
        body = "".join(rng.choice(list("abc def\n\t"), size=length))
        out.append(f"<{i}>" + body)
    return out


def all_batches(it):
    return list(it)


def pieces(batches):
    """Each packed segment as (inputs, targets, positions) in stream order."""
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1 if seg.size else 1):
                idx = np.flatnonzero(seg == s)
                out.append((b["inputs"][r, idx], b["targets"][r, idx], b["positions"][r, idx]))
    return out


def check_batch_format(b, batch_size, seq_len):
    assert set(b) == set(dl.BATCH_KEYS)
    for k in ("inputs", "targets", "positions", "segment_ids"):
        assert b[k].dtype == np.int32 and b[k].shape == (batch_size, seq_len), k
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == (batch_size, seq_len)
    seg = b["segment_ids"]
    # loss_mask is 0 exactly at padding
    np.testing.assert_array_equal(b["loss_mask"], (seg > 0).astype(np.float32))
    for r in range(batch_size):
        row = seg[r]
        n = int((row > 0).sum())
        assert (row[n:] == 0).all(), "padding only at the end of a row"
        if n:
            # segments numbered 1, 2, ... contiguously
            changes = np.diff(row[:n])
            assert row[0] == 1 and set(np.unique(changes)) <= {0, 1}
            # positions restart at 0 for each segment and count up
            pos = b["positions"][r, :n]
            starts = np.r_[0, np.flatnonzero(changes) + 1]
            assert (pos[starts] == 0).all()
            expected = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
            np.testing.assert_array_equal(pos, expected)
            # within a segment the next input is the current target
            same = changes == 0
            np.testing.assert_array_equal(b["inputs"][r, 1:n][same], b["targets"][r, : n - 1][same])
        assert (b["inputs"][r, n:] == TOK.pad_id).all()
        assert (b["targets"][r, n:] == TOK.pad_id).all()


def expected_tokens(texts):
    return [np.array(TOK.encode(t, bos=True, eos=True), np.int32) for t in texts]


# --------------------------------------------------------------------------------------------
# stdlib corpus
# --------------------------------------------------------------------------------------------


def test_stdlib_files_split_and_hash():
    train, h1 = dl.stdlib_files("train", eval_fraction=0.05)
    ev, h2 = dl.stdlib_files("eval", eval_fraction=0.05)
    every, _ = dl.stdlib_files("all")
    assert train == sorted(train) and ev == sorted(ev)
    assert not set(train) & set(ev)
    assert set(train) | set(ev) == set(every)
    assert 0.02 < len(ev) / len(every) < 0.1
    assert all(p.endswith(".py") for p in every)
    assert not [p for p in every if "site-packages" in p or "dist-packages" in p]
    assert any("/test/" in p or "/tests/" in p for p in every)  # test code is kept
    assert len(h1) == 64 and h1 != h2
    assert dl.stdlib_files("train", eval_fraction=0.05) == (train, h1)  # deterministic
    with pytest.raises(ValueError, match="eval_fraction"):
        dl.stdlib_files("eval", eval_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        dl.stdlib_files("dev")


def test_stdlib_files_custom_root(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("b = 2\n")
    (tmp_path / "site-packages" / "c.py").write_text("c = 3\n")
    (tmp_path / "d.txt").write_text("not python\n")
    files, h = dl.stdlib_files("all", root=str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.py", os.path.join("pkg", "b.py")]
    (tmp_path / "a.py").write_text("a = 2\n")
    assert dl.stdlib_files("all", root=str(tmp_path))[1] != h  # content changes the hash


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["concat", "pad"])
@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_packing_loses_no_token(tmp_path, packing, seq_len):
    texts = doc_texts(40, seed=seq_len) + ["x" * 100, "y" * (seq_len - 2), "z" * (2 * seq_len)]
    paths = write_docs(tmp_path, texts)
    it = dl.make_lm_iterator(
        paths, TOK, seq_len=seq_len, batch_size=3, seed=0, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1, packing=packing,
    )  # fmt: skip
    batches = all_batches(it)
    for b in batches:
        check_batch_format(b, 3, seq_len)
    docs = expected_tokens(texts)
    n_pred = sum(d.size - 1 for d in docs)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == n_pred
    assert it.counters["tokens"] == n_pred and it.counters["docs"] == len(texts)
    # the stream of pieces, in order, rebuilds every document exactly; no piece spans two
    segs = pieces(batches)
    rebuilt, cur = [], []
    for inputs, targets, _ in segs:
        if inputs[0] == TOK.bos_id and cur:
            rebuilt.append(cur)
            cur = []
        assert TOK.bos_id not in inputs[1:], "a segment crosses a document boundary"
        assert TOK.eos_id not in targets[:-1], "a segment crosses a document boundary"
        cur.extend(inputs.tolist())
        if targets[-1] == TOK.eos_id:
            cur.append(TOK.eos_id)
    rebuilt.append(cur)
    assert [np.array(r) for r in rebuilt] != []
    assert len(rebuilt) == len(docs)
    for r, d in zip(rebuilt, docs, strict=True):
        np.testing.assert_array_equal(r, d)
    long_pieces = [p for p in segs if p[0].size > seq_len]
    assert not long_pieces
    if packing == "pad":
        # documents that fit in a row are never split
        for d in docs:
            if d.size - 1 <= seq_len:
                assert any(p[0].size == d.size - 1 and (p[0] == d[:-1]).all() for p in segs), (
                    "short doc split"
                )
    else:
        # concat packs densely: only the very last row may have padding
        rows = np.concatenate([b["segment_ids"] for b in batches])
        n_full = int(((rows > 0).sum(1) == seq_len).sum())
        assert n_full >= rows.shape[0] - 3


def test_long_document_is_chunked_not_truncated(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    paths = write_docs(tmp_path, [text])
    it = dl.make_lm_iterator(
        paths, TOK, seq_len=64, batch_size=4, seed=0, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1, packing="pad",
    )  # fmt: skip
    batches = list(it)
    assert sum(b["loss_mask"].sum() for b in batches) == 1001  # 1002 tokens, 1001 predictions
    assert it.counters["split_docs"] == 1
    assert len(batches) == 4  # 15 full rows of 64 and one of 41
    assert (batches[-1]["segment_ids"][-1] > 0).sum() == 1001 - 15 * 64


def test_last_batch_padded_then_stop(tmp_path):
    paths = write_docs(tmp_path, ["abc"])
    it = dl.make_lm_iterator(
        paths, TOK, seq_len=16, batch_size=4, seed=0, num_epochs=1, shard_index=0, shard_count=1
    )
    b = next(it)
    assert b["loss_mask"].sum() == 4 and b["segment_ids"][1:].max() == 0
    with pytest.raises(StopIteration):
        next(it)


# --------------------------------------------------------------------------------------------
# shuffling, sharding, checkpointing
# --------------------------------------------------------------------------------------------


def first_docs(batches):
    """The document index (<i> prefix) of every segment that starts a document."""
    out = []
    for inputs, _, _ in pieces(batches):
        if inputs[0] == TOK.bos_id:
            text = TOK.decode(inputs[1:])
            out.append(int(text[1 : text.index(">")]))
    return out


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tmp_path):
    paths = write_docs(tmp_path, doc_texts(30, max_len=10))
    kw = dict(seq_len=32, batch_size=2, num_epochs=2, shard_index=0, shard_count=1, packing="pad")
    a = first_docs(list(dl.make_lm_iterator(paths, TOK, seed=1, **kw)))
    b = first_docs(list(dl.make_lm_iterator(paths, TOK, seed=1, **kw)))
    c = first_docs(list(dl.make_lm_iterator(paths, TOK, seed=2, **kw)))
    plain = first_docs(list(dl.make_lm_iterator(paths, TOK, seed=1, shuffle=False, **kw)))
    assert a == b
    assert a != c
    assert plain == list(range(30)) * 2
    assert sorted(a[:30]) == list(range(30)) and sorted(a[30:]) == list(range(30))
    assert a[:30] != a[30:], "each epoch gets its own permutation"


def test_process_sharding_partitions_documents(tmp_path):
    paths = write_docs(tmp_path, doc_texts(31, max_len=10))
    seen = []
    for shard in range(3):
        it = dl.make_lm_iterator(
            paths, TOK, seq_len=32, batch_size=2, seed=5, num_epochs=1,
            shard_index=shard, shard_count=3, packing="pad",
        )  # fmt: skip
        seen.append(first_docs(list(it)))
    assert sorted(sum(seen, [])) == list(range(31))
    assert all(len(s) in (10, 11) for s in seen)
    with pytest.raises(ValueError, match="shard_index"):
        dl.make_lm_iterator(paths, TOK, seq_len=8, batch_size=1, seed=0, shard_index=3,
                            shard_count=3)  # fmt: skip


@pytest.mark.parametrize("skip", [0, 1, 3, 7, 12])
def test_checkpoint_restore_continues_exactly(tmp_path, skip):
    texts = doc_texts(9, seed=3, max_len=60) + ["", "q" * 50]  # an empty doc (skipped)
    paths = write_docs(tmp_path, texts)
    kw = dict(seq_len=24, batch_size=2, seed=11, shard_index=0, shard_count=1, read_threads=2)
    it = dl.make_lm_iterator(paths, TOK, **kw)  # infinite: crosses epoch boundaries
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as checkpoints store it
    counters = dict(it.counters)
    expected = [next(it) for _ in range(6)]
    again = dl.make_lm_iterator(paths, TOK, **kw)
    next(again)  # some progress that the restore must discard
    again.set_state(state)
    assert again.counters == counters
    got = [next(again) for _ in range(6)]
    for e, g in zip(expected, got, strict=True):
        for k in dl.BATCH_KEYS:
            np.testing.assert_array_equal(e[k], g[k])
    assert again.counters == it.counters


# --------------------------------------------------------------------------------------------
# sources and bad input
# --------------------------------------------------------------------------------------------


def test_jsonl_corrupt_records_are_counted(tmp_path, caplog):
    p = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',
        json.dumps({"content": "wrong field"}).encode(),
        json.dumps({"text": 5}).encode(),
        b"   ",
        b"",
        b'{"text": "bad utf8 \xff\xfe"}',
        json.dumps({"text": "good two \u00e9"}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps([1, 2]).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\r\n")
    with caplog.at_level(logging.WARNING, logger="herd.core.data"):
        it = dl.make_lm_iterator(
            f"jsonl:{tmp_path}/*.jsonl", TOK, seq_len=64, batch_size=1, seed=0,
            shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
        )  # fmt: skip
        batches = list(it)
    c = it.counters
    assert c["docs"] == 2
    assert c["skipped_bad_json"] == 2  # truncated object, invalid utf-8 inside JSON
    assert c["skipped_missing_field"] == 3  # wrong key, non-string value, not an object
    assert c["skipped_blank"] == 1 and c["skipped_empty"] == 1
    text = "".join(TOK.decode(i) for i, _, _ in pieces(batches))
    assert "good one" in text and "good two \u00e9" in text
    assert "data.jsonl:2" in caplog.text and "bad_json" in caplog.text


def test_jsonl_field_and_token_lists(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"body": "hi"}) + "\n" + json.dumps({"body": [10, 11, 12]}) + "\n")
    it = dl.make_lm_iterator(
        f"jsonl:{p}:body", TOK, seq_len=16, batch_size=1, seed=0, shuffle=False,
        num_epochs=1, shard_index=0, shard_count=1,
    )  # fmt: skip
    b = next(it)
    assert b["inputs"][0, :8].tolist() == [1, ord("h") + 3, ord("i") + 3, 1, 10, 11, 12, 0]
    assert b["targets"][0, :7].tolist() == [ord("h") + 3, ord("i") + 3, 2, 10, 11, 12, 2]


def test_out_of_vocab_ids_raise_naming_the_id(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": [5, 6, 999]}) + "\n")
    it = dl.make_lm_iterator(
        f"jsonl:{p}", TOK, seq_len=16, batch_size=1, seed=0, shard_index=0, shard_count=1
    )
    with pytest.raises(ValueError, match="999"):
        next(it)
    # a model vocabulary smaller than the tokenizer's
    paths = write_docs(tmp_path, ["zzz"])
    it = dl.make_lm_iterator(
        paths, TOK, seq_len=16, batch_size=1, seed=0, shard_index=0, shard_count=1,
        vocab_size=100,
    )  # fmt: skip
    with pytest.raises(ValueError, match=str(ord("z") + 3)):
        next(it)


def test_bad_utf8_text_file_counted(tmp_path):
    paths = write_docs(tmp_path, ["fine"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    it = dl.make_lm_iterator(
        paths + [str(bad)], TOK, seq_len=16, batch_size=1, seed=0, num_epochs=1,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    list(it)
    assert it.counters["skipped_bad_utf8"] == 1 and it.counters["docs"] == 1


def test_missing_or_empty_corpus_raises(tmp_path):
    kw = dict(seq_len=8, batch_size=1, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="nothing_here"):
        dl.make_lm_iterator(f"text:{tmp_path}/nothing_here/*.txt", TOK, **kw)
    with pytest.raises(ValueError, match="missing.txt"):
        dl.make_lm_iterator([str(tmp_path / "missing.txt")], TOK, **kw)
    with pytest.raises(ValueError, match="empty"):
        dl.make_lm_iterator([], TOK, **kw)
    with pytest.raises(ValueError, match="directory"):
        dl.make_lm_iterator([str(tmp_path)], TOK, **kw)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="e.jsonl"):
        dl.make_lm_iterator(f"jsonl:{empty}", TOK, **kw)
    paths = write_docs(tmp_path, ["", ""])  # files exist but hold no text
    with pytest.raises(ValueError, match="no usable document"):
        next(dl.make_lm_iterator(paths, TOK, **kw))
    with pytest.raises(ValueError, match="no usable document"):
        next(dl.make_lm_iterator(paths, TOK, num_epochs=1, **kw))


def test_array_record_sources(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    raw = tmp_path / "raw.array_record"
    w = ArrayRecordWriter(str(raw), "group_size:1")
    for t in ["first doc", "second \u00e9", "third"]:
        w.write(t.encode())
    w.write(b"\xff\xfe not utf8")
    w.close()
    js = tmp_path / "js.array_record"
    w = ArrayRecordWriter(str(js), "group_size:1")
    for rec in [{"text": "json doc"}, {"other": 1}]:
        w.write(json.dumps(rec).encode())
    w.write(b"{oops")
    w.close()
    kw = dict(seq_len=64, batch_size=1, seed=0, shuffle=False, num_epochs=1, shard_index=0,
              shard_count=1)  # fmt: skip
    it = dl.make_lm_iterator(f"array_record:{raw}", TOK, **kw)
    texts = [TOK.decode(i) for b in it for i, _, _ in pieces([b])]
    assert texts == ["first doc", "second \u00e9", "third"]
    assert it.counters["skipped_bad_utf8"] == 1
    it = dl.make_lm_iterator(f"array_record:{tmp_path}/js.*:text", TOK, **kw)
    texts = [TOK.decode(i) for b in it for i, _, _ in pieces([b])]
    assert texts == ["json doc"]
    assert it.counters["skipped_missing_field"] == 1 and it.counters["skipped_bad_json"] == 1


def test_tfds_source_adapter_with_fake_data_source():
    """tfds.data_source needs a prepared dataset (TensorFlow or a download to build one), so the
    adapter is tested with a stand-in of the same shape: random access to feature dicts."""
    calls = {}

    def fake_data_source(name, *, split, download, **kw):
        calls.update(name=name, split=split, download=download, **kw)
        return [{"text": b"tfds one", "id": 0}, {"text": "tfds two"}, {"label": 3}]

    src = cd.TfdsSource("my_corpus", "validation", data_source_fn=fake_data_source)
    assert calls == {"name": "my_corpus", "split": "validation", "download": False}
    it = dl.make_lm_iterator(
        src, TOK, seq_len=32, batch_size=1, seed=0, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    texts = [TOK.decode(i) for b in it for i, _, _ in pieces([b])]
    assert texts == ["tfds one", "tfds two"]
    assert it.counters["skipped_missing_field"] == 1


def test_real_sentencepiece_on_stdlib(tmp_path):
    train, _ = dl.stdlib_files("train")
    ev, _ = dl.stdlib_files("eval")
    tok = tl.train_tokenizer(train[::50], 512, tmp_path / "t.model", max_sentences=10_000)
    small = [p for p in ev if os.path.getsize(p) < 20_000][:6]
    it = dl.make_lm_iterator(
        small, tok, seq_len=128, batch_size=4, seed=0, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    batches = list(it)
    docs = []
    for p in small:
        with open(p, encoding="utf-8") as f:
            docs.append(tok.encode(f.read(), bos=True, eos=True))
    assert sum(b["loss_mask"].sum() for b in batches) == sum(len(d) - 1 for d in docs)
    stream = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    np.testing.assert_array_equal(stream, np.concatenate([d[1:] for d in docs]))
    assert tok.decode(stream[stream != tok.eos_id].tolist()) == "".join(
        open(p, encoding="utf-8").read() for p in small
    )


def test_tfds_source_real_dataset_built_without_tensorflow(tmp_path):
    """A tiny tfds dataset written as ArrayRecord (no TensorFlow, no download), then read
    through the 'tfds:<name>:<split>' spec."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class HerdTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "validation": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"doc {i} \u00e9\n\tx"}

    # tfds looks for a checksums file next to a builder's module; for a module inside a package
    # that needs `importlib_resources` (not installed here), so present the builder as a script's.
    HerdTinyText.__module__ = "__main__"
    data_dir = str(tmp_path / "tfds")
    HerdTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    it = dl.make_lm_iterator(
        "tfds:herd_tiny_text:validation", TOK, seq_len=32, batch_size=1, seed=0,
        shuffle=False, num_epochs=1, shard_index=0, shard_count=1, tfds_data_dir=data_dir,
    )  # fmt: skip
    texts = [TOK.decode(i) for b in it for i, _, _ in pieces([b])]
    assert sorted(texts) == ["doc 0 \u00e9\n\tx", "doc 1 \u00e9\n\tx"]


def test_sample_texts_for_tokenizer_training(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": f"doc {i}"}) for i in range(10)] + ["{bad", '{"text": [1, 2]}']
    p.write_text("\n".join(rows) + "\n")
    assert dl.sample_texts(f"jsonl:{p}") == [f"doc {i}" for i in range(10)]
    assert dl.sample_texts(f"jsonl:{p}", 4) == ["doc 0", "doc 3", "doc 6", "doc 9"]
    one_line = tmp_path / "doc 0"  # a text that is also a file name: say which it is
    one_line.write_text("file body")
    tok = tl.train_tokenizer(
        ["doc 0"] * 50 + ["def f():\n\treturn 1\n"] * 50, 285, tmp_path / "t.model",
        input_kind="texts",
    )  # fmt: skip
    assert tok.decode(tok.encode("doc 0")) == "doc 0"


# --------------------------------------------------------------------------------------------
# batch-size ramp (Llama 3 sec. 3.4.1)
# --------------------------------------------------------------------------------------------


def _brute_force_starts(ramp, batch, seq, steps):
    """Stage of each step by counting tokens step by step: a stage starts at the first step
    boundary where the tokens seen reach its threshold."""
    shapes = [(0.0, batch, seq)] + [
        (float(t), int(s.split("x")[0]), int(s.split("x")[1]))
        for t, s in (p.split(":") for p in ramp.split(","))
    ]
    seen, k, out = 0, 0, []
    for _ in range(steps):
        while k + 1 < len(shapes) and seen >= shapes[k + 1][0]:
            k += 1
        out.append(shapes[k][1:])
        seen += shapes[k][1] * shapes[k][2]
    return out, seen


def test_batch_stages_llama3_405b_ramp():
    ramp = "252e6:1024x8192,2.87e12:2048x8192"
    stages = ramp_lib.batch_stages(ramp, 1024, 4096)
    # 252M tokens at 4,194,304 per step: 60.08 steps -> the switch at step 61
    assert [(s.start_step, s.global_batch, s.seq_len) for s in stages] == [
        (0, 1024, 4096),
        (61, 1024, 8192),
        (342162, 2048, 8192),
    ]
    assert [s.tokens_per_step for s in stages] == [4 * 2**20, 8 * 2**20, 16 * 2**20]
    assert cd.stage_at(stages, 60).seq_len == 4096 and cd.stage_at(stages, 61).seq_len == 8192
    # a small ramp against step-by-step token counting, boundaries and budget included
    ramp = "100:4x8,150:2x4,1000:8x16"
    stages = ramp_lib.batch_stages(ramp, 2, 16)
    shapes, _ = _brute_force_starts(ramp, 2, 16, 40)
    assert [(cd.stage_at(stages, i).global_batch, cd.stage_at(stages, i).seq_len)
            for i in range(40)] == shapes  # fmt: skip
    for budget in (1, 32, 100, 150, 999, 1000, 3000):
        n = ramp_lib.steps_for_tokens(stages, budget)
        assert _brute_force_starts(ramp, 2, 16, n)[1] >= budget
        assert _brute_force_starts(ramp, 2, 16, n - 1)[1] < budget
    assert len(ramp_lib.batch_stages("", 8, 64)) == 1


@pytest.mark.parametrize(
    "ramp, match",
    [
        ("252e6:1024", "is not TOKENS:BATCHxSEQ"),
        ("lots:8x64", "is not TOKENS:BATCHxSEQ"),
        ("100:0x64", "batch and seq must be >= 1"),
        ("1000:8x64,500:8x128", "stages must start at increasing token counts"),
        ("10:8x64,20:8x128", "stages must start at increasing token counts"),  # same step
    ],
)
def test_batch_ramp_bad_spec(ramp, match):
    with pytest.raises(ValueError, match=match):
        ramp_lib.batch_stages(ramp, 8, 64)


def _staged_run(make, stages, n):
    """n batches of a StagedIterator, each with the (JSON round-tripped) state before it."""
    it = dl.StagedIterator(make, stages)
    states, batches = [], []
    for _ in range(n):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    return batches, states


def _assert_resumes(make, stages, state, expected, advance_first=False):
    again = dl.StagedIterator(make, stages)
    if advance_first:
        next(again)  # progress that the restore must discard
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in dl.BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])


def test_staged_iterator_switches_shape_without_losing_a_token(tmp_path):
    paths = write_docs(tmp_path, doc_texts(40, seed=5, max_len=120))
    kw = dict(seed=3, shard_index=0, shard_count=1, read_threads=1)
    # 2 x 16 tokens for 3 steps, then 4 x 32 for 2, then 1 x 8
    stages = ramp_lib.batch_stages("96:4x32,352:1x8", 2, 16)
    assert [s.start_step for s in stages] == [0, 3, 5]

    def make(stage):
        return dl.make_lm_iterator(
            paths, TOK, seq_len=stage.seq_len, batch_size=stage.global_batch, **kw
        )

    batches, states = _staged_run(make, stages, 9)
    assert [b["inputs"].shape for b in batches] == [(2, 16)] * 3 + [(4, 32)] * 2 + [(1, 8)] * 4
    # 'concat' packing fills rows from one stream of (input, target) pairs, whatever their
    # shape: the ramped rows, flattened, are the unramped stream, nothing skipped or repeated
    plain = dl.make_lm_iterator(paths, TOK, seq_len=8, batch_size=1, **kw)
    stream = np.concatenate([b["inputs"].ravel() for b in batches])
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    expect = [next(plain) for _ in range(stream.size // 8)]
    np.testing.assert_array_equal(stream, np.concatenate([b["inputs"].ravel() for b in expect]))
    np.testing.assert_array_equal(targets, np.concatenate([b["targets"].ravel() for b in expect]))
    assert all(b["loss_mask"].all() for b in batches)
    # restoring before, exactly at and after a switch continues with the same batches
    for at in (2, 3, 4, 5, 7):
        _assert_resumes(make, stages, states[at], batches[at:], advance_first=True)
    with pytest.raises(ValueError, match="saved without a batch ramp"):
        dl.StagedIterator(make, stages).set_state(make(stages[0]).get_state())


def test_grain_workers_see_every_token_once_and_resume_through_a_ramp(tmp_path):
    """worker_count=2 (grain mp_prefetch, each worker packing its own slice of documents):
    one epoch holds every (input, target) pair of every document exactly once; a staged
    iterator over it switches shape and restores exactly, also right at a switch."""
    from collections import Counter

    texts = doc_texts(30, seed=9, max_len=100)
    paths = write_docs(tmp_path, texts)
    kw = dict(seed=2, shard_index=0, shard_count=1, worker_count=2)
    it = dl.make_lm_iterator(paths, TOK, seq_len=16, batch_size=2, num_epochs=1, **kw)
    batches = list(it)
    it.close()
    got = Counter()
    for b in batches:
        m = b["loss_mask"] > 0
        got.update(zip(b["inputs"][m].tolist(), b["targets"][m].tolist(), strict=True))
    want = Counter()
    for d in expected_tokens(texts):
        want.update(zip(d[:-1].tolist(), d[1:].tolist(), strict=True))
    assert got == want

    stages = ramp_lib.batch_stages("96:4x32,352:1x8", 2, 16)
    opened = []

    def make(stage):
        opened.append(
            dl.make_lm_iterator(
                paths, TOK, seq_len=stage.seq_len, batch_size=stage.global_batch, **kw
            )
        )
        return opened[-1]

    out, states = _staged_run(make, stages, 7)
    assert [b["inputs"].shape for b in out] == [(2, 16)] * 3 + [(4, 32)] * 2 + [(1, 8)] * 2
    # restored exactly at the first switch (each worker pool takes ~3 s to start)
    _assert_resumes(make, stages, states[3], out[3:])
    for o in opened:
        o.close()
