"""Tokenizers: SentencePiece training for code (exact round trips), tiktoken (Llama 3) loading."""

import os
import pickle

import pytest

from herd.lm import tokenizer as tl
from herd.lm.data import stdlib_files

TRICKY = [
    "",
    "x",
    "\tdef f(a,\tb):\r\n\t\treturn a  \t\r\n\n\n   \n",
    "    indented\n        more\n\n\n  trailing   \n\n",
    "  leading spaces and trailing tab\t",
    "unicode: héllo wörld 日本語 🙂 \u00a0nbsp \u3000 ideographic ½ ﬁ \u200b zero-width",
    "sentencepiece meta symbol \u2581 literal \u2581\u2581 twice\u2581",
    "digits 1234567890 3.14159 0x1F",
    "\r\n\r\n",
    " " * 37 + "\n" + "\t" * 9,
    "<s></s><unk><pad> <|begin_of_text|>",
]


@pytest.fixture(scope="module")
def files():
    train, _ = stdlib_files("train", eval_fraction=0.05)
    return train


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, files):
    path = tmp_path_factory.mktemp("tok") / "code.model"
    tl.train_tokenizer(files[::40], 1024, path, max_sentences=20_000)
    return str(path)


@pytest.fixture(scope="module")
def sp(sp_path):
    return tl.load_tokenizer(sp_path)


def test_trained_sentencepiece_settings(sp):
    assert isinstance(sp, tl.SentencePieceTokenizer)
    assert isinstance(sp, tl.Tokenizer)
    assert sp.vocab_size == 1024
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
    assert sp.exact
    spec = sp.model_proto
    assert spec.normalizer_spec.name == "identity"
    assert not spec.normalizer_spec.add_dummy_prefix
    assert not spec.normalizer_spec.remove_extra_whitespaces
    assert spec.trainer_spec.byte_fallback and spec.trainer_spec.split_digits
    assert spec.trainer_spec.allow_whitespace_only_pieces
    assert sp.special_tokens["\n"] == sp.piece_to_id("\n")
    # digits are split: no (non-byte) piece holds two digits
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size)]
    assert not [p for p in pieces if not p.startswith("<0x") and sum(map(str.isdigit, p)) > 1]
    # indentation runs became pieces
    assert sp.piece_to_id("\u2581" * 4) != sp.unk_id


@pytest.mark.parametrize("text", TRICKY)
def test_sentencepiece_exact_round_trip_tricky(sp, text):
    ids = sp.encode(text)
    assert sp.unk_id not in ids
    assert sp.decode(ids) == text
    with_specials = sp.encode(text, bos=True, eos=True)
    assert with_specials[0] == sp.bos_id and with_specials[-1] == sp.eos_id
    assert with_specials[1:-1] == ids
    assert sp.decode(with_specials) == text  # control tokens decode to ''


def test_sentencepiece_round_trip_stdlib_files(sp, files):
    picked = files[3::60]
    texts = []
    for p in picked:
        with open(p, "rb") as f:
            try:
                texts.append(f.read().decode("utf-8"))
            except UnicodeDecodeError:
                pass
    assert len(texts) > 20
    for text, ids in zip(texts, sp.encode_batch(texts), strict=True):
        assert ids == sp.encode(text)
        assert sp.decode(ids) == text
    # compression is real (not all byte fallback)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tok = sum(len(i) for i in sp.encode_batch(texts))
    assert n_bytes / n_tok > 2.0


def test_decode_out_of_vocab_raises_naming_id(sp):
    with pytest.raises(ValueError, match="1024"):
        sp.decode([5, 1024])
    with pytest.raises(ValueError, match="-1"):
        sp.decode([-1])


def test_sentencepiece_pickles(sp):
    again = pickle.loads(pickle.dumps(sp))
    assert again.encode("a\u2581 b\n") == sp.encode("a\u2581 b\n")


def test_train_from_texts_long_lines_and_determinism(tmp_path):
    texts = [
        "def f(x):\n    return x * 2\n\n" * 20,
        "x" * 20_000 + "\n" + "é" * 3_000,  # lines longer than max_sentence_length
        "\tclass A:\n\t\tpass\r\n" * 10,
    ]
    a = tl.train_tokenizer(texts, 300, tmp_path / "a.model", max_sentence_length=2048)
    b = tl.train_tokenizer(iter(texts), 300, tmp_path / "b.model", max_sentence_length=2048)
    assert [a.id_to_piece(i) for i in range(300)] == [b.id_to_piece(i) for i in range(300)]
    for t in texts:
        assert a.decode(a.encode(t)) == t
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_train_empty_corpus_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        tl.train_tokenizer([], 300, tmp_path / "x.model")
    with pytest.raises(ValueError, match="no files match"):
        tl.train_tokenizer(str(tmp_path / "nothing" / "*.py"), 300, tmp_path / "x.model")


def test_get_or_train_caches(tmp_path, files):
    path = tmp_path / "c.model"
    t1 = tl.get_or_train_tokenizer(path, files[:5], 600, max_sentences=2000)
    mtime = os.path.getmtime(path)
    t2 = tl.get_or_train_tokenizer(path, files[:5], 600)
    assert os.path.getmtime(path) == mtime and t2.fingerprint == t1.fingerprint


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tl.load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage that is not a model")
    with pytest.raises(ValueError, match="bad.model"):
        tl.load_tokenizer(bad)


# ---------------------------------------------------------------------------------------------
# tiktoken (Llama 3 format)
# ---------------------------------------------------------------------------------------------


def test_llama3_special_token_order():
    toks = tl.llama3_special_tokens()
    assert len(toks) == 256
    ids = {t: 128000 + i for i, t in enumerate(toks)}
    assert ids["<|begin_of_text|>"] == 128000
    assert ids["<|end_of_text|>"] == 128001
    assert ids["<|reserved_special_token_0|>"] == 128002
    assert ids["<|reserved_special_token_3|>"] == 128005
    assert ids["<|start_header_id|>"] == 128006
    assert ids["<|end_header_id|>"] == 128007
    assert ids["<|reserved_special_token_4|>"] == 128008
    assert ids["<|eot_id|>"] == 128009
    assert ids["<|reserved_special_token_5|>"] == 128010
    assert toks[-1] == "<|reserved_special_token_250|>"
    t31 = tl.llama3_special_tokens("llama3.1")
    ids31 = {t: 128000 + i for i, t in enumerate(t31)}
    assert len(t31) == 256 and len(set(t31)) == 256
    assert ids31["<|finetune_right_pad_id|>"] == 128004
    assert ids31["<|eom_id|>"] == 128008
    assert ids31["<|eot_id|>"] == 128009
    assert ids31["<|python_tag|>"] == 128010
    assert ids31["<|reserved_special_token_2|>"] == 128012
    assert t31[-1] == "<|reserved_special_token_245|>"
    with pytest.raises(ValueError, match="variant"):
        tl.llama3_special_tokens("llama9")


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    """A small BPE in Llama 3's file format: the 256 bytes plus merges learned from code."""
    from tiktoken import _educational

    text = (
        "def forward(self, x):\n    return self.linear(x) + 1\n\n"
        "for i in range(10):\n\tprint(i, 'hello world')\n"
    ) * 3
    enc = _educational.bpe_train(text, 256 + 40, tl.LLAMA3_PAT_STR, visualise=None)
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    tl.write_tiktoken_ranks(enc, path)
    return str(path)


def test_tiktoken_load_and_round_trip(tiktoken_path):
    tok = tl.load_tokenizer(tiktoken_path)
    assert isinstance(tok, tl.TiktokenTokenizer) and isinstance(tok, tl.Tokenizer)
    assert tok.num_base_tokens == 296
    assert tok.vocab_size == 296 + 256
    assert tok.bos_id == 296 and tok.eos_id == 297
    assert tok.special_tokens["<|eot_id|>"] == 296 + 9
    assert tok.pad_id == tok.eos_id  # Llama 3 (not 3.1) has no pad token
    for text in TRICKY + ["def forward(self, x):\n    return self.linear(x)\n"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text
        assert tok.encode_batch([text], bos=True, eos=True) == [ids]
    merged = tok.encode("def forward(self")
    assert len(merged) < len("def forward(self")  # merges apply


def test_tiktoken_special_tokens(tiktoken_path):
    tok = tl.load_tokenizer(tiktoken_path, special_tokens=tl.llama3_special_tokens("llama3.1"))
    assert tok.pad_id == 296 + 4  # <|finetune_right_pad_id|>
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    plain = tok.encode(text)  # special-token text is ordinary text by default
    assert tok.special_tokens["<|eot_id|>"] not in plain
    assert tok.decode(plain) == text
    special = tok.encode(text, allowed_special="all")
    assert special[0] == tok.special_tokens["<|start_header_id|>"]
    assert special[-1] == tok.special_tokens["<|eot_id|>"]
    assert tok.decode(special) == text
    assert tok.piece_to_id("<|eot_id|>") == tok.eot_id == 296 + 9
    with pytest.raises(ValueError, match="552"):
        tok.decode([1, 552])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(text) == plain


def test_tiktoken_long_runs_split(tiktoken_path, monkeypatch):
    tok = tl.load_tokenizer(tiktoken_path)
    monkeypatch.setattr(tl, "TIKTOKEN_MAX_RUN_CHARS", 50)
    monkeypatch.setattr(tl, "TIKTOKEN_MAX_ENCODE_CHARS", 200)
    text = ("x" * 130 + " " * 120 + "def f():\n    pass\n") * 5
    pieces = list(tl._split_for_tiktoken(text))
    assert "".join(pieces) == text
    assert all(len(p) <= 200 for p in pieces)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_tiktoken_bad_file(tmp_path):
    p = tmp_path / "bad.tiktoken"
    p.write_bytes(b"YQ== 0\nYg== 5\n")  # rank gap
    with pytest.raises(ValueError, match="ranks"):
        tl.load_tokenizer(p)
    p.write_bytes(b"YQ== 0\nnot base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        tl.TiktokenTokenizer(p)


def test_llama_style_sentencepiece_model(tmp_path, files):
    """A model with LLaMA's settings (dummy prefix, no pad piece): ids as SentencePiece gives
    them (no exact-mode escaping), pad falls back to eos."""
    import sentencepiece as spm

    tok = tl.train_tokenizer(
        files[:8], 600, tmp_path / "llama.model", max_sentences=5000, add_dummy_prefix=True,
        pad_id=-1,
    )  # fmt: skip
    assert not tok.exact
    assert tok.pad_id == tok.eos_id == 2
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama.model"))
    for text in ["hello world", "a\u2581b", "  x = 1\n"]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode("hello world")) == "hello world"


# --------------------------------------------------------------- HF tokenizer.json (Llama 3)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, files):
    """(tokenizer.json trained by the HF `tokenizers` library, Llama 3's pre-tokenizer and
    a few special tokens; tokenizer.json converted from a tiktoken file by transformers'
    TikTokenConverter, as Llama 3's is; that tiktoken file; held-out stdlib files)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("hfjson")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tl.LLAMA3_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files[::60]], trainer)
    trained = str(out / "trained.json")
    tok.save(trained)
    # its BPE as a tiktoken file (ranks = ids without the specials), then HF's conversion
    import json

    byte_of = {c: b for b, c in tl.bytes_to_unicode().items()}
    vocab = json.loads(_read(trained))["model"]["vocab"]
    ranks = {
        bytes(byte_of[c] for c in t): i - len(specials)
        for t, i in vocab.items()
        if t not in specials
    }
    tiktoken_file = str(out / "tokenizer.model")
    tl.write_tiktoken_ranks(ranks, tiktoken_file)
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(
        vocab_file=tiktoken_file, extra_special_tokens=tl.llama3_special_tokens("llama3.1")
    ).converted()
    converted = str(out / "converted.json")
    conv.save(converted)
    held_out, _ = stdlib_files("eval", eval_fraction=0.05)
    return trained, converted, tiktoken_file, held_out[:25]


def _parity(ours, ref, texts):
    """(texts whose ids equal, ids compared); asserts decode(ids) == HF's decode too. HF
    splits special-token text out by default: herd when asked (allowed_special='all')."""
    same = n = 0
    for text in texts:
        want = ref.encode(text, add_special_tokens=False).ids
        got = ours.encode(text, allowed_special="all")
        same += got == want
        n += len(want)
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=False)
    return same, n


def test_tokenizer_json_trained_bpe_matches_hf(hf_json):
    """A BPE trained by `tokenizers` (merges not tiktoken-complete: HF's merge rule in
    Python) encodes the held-out stdlib files with HF's ids, specials included."""
    from tokenizers import Tokenizer

    trained, _, _, held_out = hf_json
    ref = Tokenizer.from_file(trained)
    tok = tl.load_tokenizer(trained)
    assert isinstance(tok, tl.TiktokenTokenizer) and not tok.merges_exact
    assert tok.vocab_size == ref.get_vocab_size() == 800
    assert tok.special_tokens == {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2}
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (0, 1, 2)
    texts = [_read(f) for f in held_out] + [t for t in TRICKY if t]
    same, n = _parity(tok, ref, texts)
    print(f"trained tokenizer.json: {same}/{len(texts)} texts, {n} ids identical to HF")
    assert same == len(texts)
    chat = "<|begin_of_text|>user: hi<|eot_id|>\n  x = '<|eot_id|>'  <|end_of_text|>"
    want = ref.encode(chat, add_special_tokens=False).ids
    assert tok.encode(chat, allowed_special="all") == want
    assert want.count(2) == 2 and want[0] == 0
    assert tok.decode(want) == ref.decode(want, skip_special_tokens=False) == chat
    assert 2 not in tok.encode(chat)  # special text is plain text unless allowed
    assert tok.encode("x", bos=True, eos=True) == [0, *ref.encode("x").ids, 1]
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(texts[0]) == tok.encode(texts[0])


def test_tokenizer_json_converted_from_tiktoken_matches_hf(hf_json):
    """Llama 3's kind of file (TikTokenConverter: every split a merge, ignore_merges):
    encoded by tiktoken itself, ids identical to HF's and to the tiktoken file's."""
    from tokenizers import Tokenizer

    _, converted, tiktoken_file, held_out = hf_json
    ref = Tokenizer.from_file(converted)
    tok = tl.load_tokenizer(converted)
    plain = tl.load_tokenizer(tiktoken_file, special_tokens=tl.llama3_special_tokens("llama3.1"))
    assert tok.merges_exact
    assert tok.vocab_size == plain.vocab_size == ref.get_vocab_size()
    assert tok.special_tokens == plain.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (
        plain.bos_id, plain.eos_id, plain.eot_id, plain.pad_id
    )  # fmt: skip
    texts = [_read(f) for f in held_out] + [t for t in TRICKY if t]
    same, n = _parity(tok, ref, texts)
    print(f"converted tokenizer.json: {same}/{len(texts)} texts, {n} ids identical to HF")
    assert same == len(texts)
    assert all(tok.encode(t) == plain.encode(t) for t in texts)
    assert tok.encode(TRICKY[-1]) == plain.encode(TRICKY[-1])  # specials as plain text
    chat = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert tok.encode(chat, allowed_special="all") == ref.encode(chat).ids


def test_tokenizer_json_errors(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    spm_like = tokenizers.Tokenizer(
        models.BPE(vocab={"<unk>": 0, "\u2581a": 1, "a": 2}, merges=[], byte_fallback=True)
    )
    spm_like.pre_tokenizer = pre_tokenizers.Metaspace()
    spm_like.decoder = decoders.Metaspace()
    path = str(tmp_path / "tokenizer.json")
    spm_like.save(path)
    with pytest.raises(ValueError, match="SentencePiece-style.*tokenizer.model"):
        tl.load_tokenizer(path)
    wp = tokenizers.Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.save(path)
    with pytest.raises(ValueError, match="model type 'WordPiece'"):
        tl.load_tokenizer(path)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tl.load_tokenizer(path)
