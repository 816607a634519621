"""python -m herd.lm.generate: completion, infilling, chat, --hf directories, streaming and
the one-line errors. In-process (herd.lm.generate.run_cli) on tiny models whose next token
is known: attention and MLP outputs zeroed, so the hidden state is the current token's
embedding, and output columns set so that chosen tokens follow each other (a chain that
ends in a stop token). Nothing is trained."""

from __future__ import annotations

import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd.lm import chat
from herd.lm import generate as gen
from herd.lm import tokenizer as tl
from herd.lm.config import LlamaConfig
from herd.lm.convert import save_workdir, to_hf
from herd.lm.fim import FIM_USER_DEFINED_SYMBOLS, FimTokens
from herd.lm.model import Llama


def _config(vocab):
    return LlamaConfig(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=64, max_seq_len=96
    )


def _chain_params(cfg, chain: dict[int, int], seed=0):
    """Params whose greedy (and low-temperature) next token after `a` is chain[a]."""
    init = Llama(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))
    p = jax.tree.map(np.array, nn.meta.unbox(init)["params"])
    p["layers"]["attention"]["wo"][:] = 0  # the residual stream stays the token embedding
    p["layers"]["feed_forward"]["w2"][:] = 0
    emb = p["tok_embeddings"]["embedding"]
    h = emb / np.sqrt(np.mean(emb**2, axis=-1, keepdims=True) + cfg.norm_eps)
    w = 0.01 * p["output"]["kernel"]
    for a, b in chain.items():
        w[:, b] += 10.0 * h[a]  # logit 10 * dim for b after a; others ~ +-10 * sqrt(dim)
    p["output"]["kernel"] = w
    return p


def _chain(ids):
    assert len(set(ids)) == len(ids), ids
    return dict(zip(ids[:-1], ids[1:], strict=True))


def _byte_tiktoken(path):
    """A tiktoken file of the 256 bytes alone (+ Llama 3's 256 special tokens: vocab 512)."""
    tl.write_tiktoken_ranks({bytes([b]): b for b in range(256)}, path)
    return tl.load_tokenizer(path, special_tokens=tl.llama3_special_tokens("llama3.1"))


def _byte_tokenizer_json(path):
    """The same tokenizer as a Hugging Face tokenizer.json (byte-level BPE, no merges)."""
    to_char = tl.bytes_to_unicode()
    specials = tl.llama3_special_tokens("llama3.1")
    d = {
        "version": "1.0",
        "added_tokens": [
            {"id": 256 + i, "content": t, "special": True, "normalized": False}
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tl.LLAMA3_PAT_STR},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "ignore_merges": True,
            "vocab": {to_char[b]: b for b in range(256)},
            "merges": [],
        },
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f)


ANSWER = "Hi!"


@pytest.fixture(scope="module")
def llama3_dirs(tmp_path_factory):
    """(herd workdir, HF directory) of one byte-level model with Llama 3's special tokens:
    after '\\n' it says 'Hi!' then <|eot_id|>."""
    root = tmp_path_factory.mktemp("llama3")
    tok = _byte_tiktoken(root / "tokenizer.model")
    cfg = _config(tok.vocab_size)
    ids = list(tok.encode("\n" + ANSWER)) + [tok.special_tokens[chat.EOT]]
    params = _chain_params(cfg, _chain(ids))
    workdir = str(root / "w")
    save_workdir(cfg, params, workdir, tokenizer=str(root / "tokenizer.model"))
    hf = str(root / "hf")
    to_hf(cfg, params, hf)
    _byte_tokenizer_json(os.path.join(hf, "tokenizer.json"))
    return workdir, hf


@pytest.fixture(scope="module")
def fim_workdir(tmp_path_factory):
    """A SentencePiece model with the FIM sentinels: after <MID> it writes MIDDLE then <EOT>;
    after the Llama 2 chat prompt's last token, ANSWER then EOS."""
    from herd.lm.data import stdlib_files

    root = tmp_path_factory.mktemp("fim")
    files, _ = stdlib_files("train")
    tok = tl.train_tokenizer(
        files[::200], 512, root / "fim.model", max_sentences=3000, character_coverage=0.99,
        user_defined_symbols=FIM_USER_DEFINED_SYMBOLS,
    )  # fmt: skip
    fim = FimTokens.from_tokenizer(tok)
    inst_end = chat.llama2_chat_ids([{"role": "user", "content": "hello"}], tok)[-1]
    chain = _chain([fim.mid, *tok.encode(MIDDLE), fim.eot])
    answer = _chain([inst_end, *tok.encode(" " + ANSWER), tok.eos_id])  # answers start with ' '
    assert not set(chain) & set(answer)
    chain.update(answer)
    cfg = _config(tok.vocab_size)
    workdir = str(root / "w")
    save_workdir(cfg, _chain_params(cfg, chain), workdir, tokenizer=str(root / "fim.model"))
    return workdir, tok


MIDDLE = "x=1"


class _Out(io.StringIO):
    """stdout that records each write."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def _run(*args, stdin=""):
    out = _Out()
    code = gen.run_cli(["generate", *args], stdin=io.StringIO(stdin), stdout=out)
    return code, out


def test_completion_streams_from_workdir_and_hf_dir(llama3_dirs, capsys):
    workdir, hf = llama3_dirs
    code, out = _run(f"--workdir={workdir}", "--prompt=import os\\n")  # CLI sampling defaults
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == "import os\n" + ANSWER + "\n"  # stops at <|eot_id|>
    assert out.writes == ["import os\n", "H", "i", "!", "\n"]  # printed token by token
    code, out = _run(f"--hf={hf}", "--prompt=import os\\n", "--temperature=0", "--nostream")
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == "import os\n" + ANSWER + "\n"  # tokenizer.json, safetensors
    assert len(out.writes) == 1
    code, out = _run(f"--workdir={workdir}", "--prompt=x\\n", "--stop=i", "--temperature=0")
    assert code == 0 and out.getvalue() == "x\nH\n"


def test_chat_llama3_keeps_history_and_stops_at_eot(llama3_dirs, monkeypatch, capsys):
    workdir, _ = llama3_dirs
    prompts = []
    real = gen.generate_tokens

    def spy(config, params, prompt_ids, **kw):
        prompts.append(list(prompt_ids[0]))
        return real(config, params, prompt_ids, **kw)

    monkeypatch.setattr(gen, "generate_tokens", spy)
    code, out = _run(
        f"--workdir={workdir}",
        "--chat",
        "--system=Be brief.",
        "--max_new_tokens=8",
        stdin="hello\n\nhow are you\n",
    )
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == f"{ANSWER}\n{ANSWER}\n"
    tok = tl.load_from_workdir(workdir)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "how are you"},
    ]
    assert prompts == [
        chat.llama3_chat_ids(history[:2], tok),
        chat.llama3_chat_ids(history, tok),
    ]
    # a history past the context (96): the oldest exchanges go, with a note
    prompts.clear()
    line = "y" * 30
    code, out = _run(f"--workdir={workdir}", "--chat", "--max_new_tokens=8", stdin=f"{line}\n" * 3)
    err = capsys.readouterr().err
    assert code == 0, err
    assert out.getvalue() == f"{ANSWER}\n" * 3 and "dropped the oldest exchange" in err
    assert len(prompts[2]) + 8 <= 96 and len(prompts[2]) == len(prompts[1])
    # one turn longer than the context: an error
    code, out = _run(f"--workdir={workdir}", "--chat", stdin="z" * 200 + "\n")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "max_seq_len=96" in err[0], err


def test_infilling_and_llama2_chat(fim_workdir, capsys):
    workdir, tok = fim_workdir
    prefix, suffix = "def f():\\n    ", "\\n    return x\\n"
    code, out = _run(f"--workdir={workdir}", f"--prefix={prefix}", f"--suffix={suffix}")
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == "def f():\n    " + MIDDLE + "\n    return x\n"  # up to <EOT>
    assert out.writes[0] == "def f():\n    " and len(out.writes) > 3
    code, out = _run(f"--workdir={workdir}", "--chat", stdin="hello\nagain\n")
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == f"{ANSWER}\n{ANSWER}\n"  # Llama 2 format (default), ends at EOS
    code, _ = _run(f"--workdir={workdir}", "--chat", "--chat_format=llama3", stdin="hi\n")
    err = capsys.readouterr().err
    assert code == 2 and "lacks the Llama 3 chat special token" in err


def test_errors_are_one_line_before_the_weights(llama3_dirs, fim_workdir, monkeypatch, capsys):
    workdir, hf = llama3_dirs

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    import herd.lm.convert as convert

    monkeypatch.setattr(convert, "load_workdir", no_weights)
    monkeypatch.setattr(convert, "from_hf", no_weights)
    cases = [
        (["--top_p=2"], "top_p must be in (0, 1]"),
        (["--top_p=0"], "top_p must be in (0, 1]"),
        (["--max_new_tokens=90", "--prompt=" + "a" * 10], "max_new_tokens=90"),
        (["--prompt=" + "a" * 100], "fills the model's context"),
        (["--max_new_tokens=0"], "max_new_tokens must be a positive int"),
        (["--prefix=a", "--suffix=b"], "FIM sentinel"),
        (["--chat", "--prefix=a"], "cannot be combined"),
        (["--chat_format=llama9", "--chat"], "--chat_format must be one of"),
        ([f"--hf={hf}"], "give --workdir or --hf, not both"),
        (["--temperature=-1"], "temperature must be >= 0"),
    ]
    for args, message in cases:
        code, out = _run(f"--workdir={workdir}", *args, stdin="hi\n")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and out.getvalue() == "", (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    code, _ = _run(f"--hf={os.path.dirname(hf)}")
    assert code == 2 and "no config.json" in capsys.readouterr().err
    code, out = _run("--help")
    assert code == 0 and "--prefix" in out.getvalue() and "chat_format" in out.getvalue()
    # no model in ./workdir/lm: the line names the command to run first
    monkeypatch.chdir(os.path.dirname(workdir))
    code, _ = _run()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "python -m herd.lm.train" in err[0], err


def test_hf_tokenizer_path_order(tmp_path, fim_workdir):
    from herd.lm.tokenizer import workdir_tokenizer_path

    _, tok = fim_workdir
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_text("x")
    assert tl.find_hf_tokenizer(str(tmp_path)).endswith(os.path.join("original", "tokenizer.model"))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tl.find_hf_tokenizer(str(tmp_path)).endswith("tokenizer.json")
    sp = workdir_tokenizer_path(fim_workdir[0])
    (tmp_path / "tokenizer.model").write_bytes(open(sp, "rb").read())
    assert tl.find_hf_tokenizer(str(tmp_path)) == str(tmp_path / "tokenizer.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.json"):
        tl.find_hf_tokenizer(str(tmp_path / "empty"))
