"""Tokenizers for the Llama herd: SentencePiece (LLaMA 1/2, Code Llama), tiktoken BPE (Llama 3).

One interface (:class:`Tokenizer`) over both formats::

    tok = load_tokenizer("tokenizer.model")     # either format, detected from the file
    tok = load_tokenizer("tokenizer.json")      # a Hugging Face byte-level BPE (Llama 3's)
    ids = tok.encode("def f():\\n\\treturn 1\\n", bos=True, eos=True)
    text = tok.decode(ids)                       # special tokens (bos/eos/...) decode to ''
                                                 # for SentencePiece, to their text for tiktoken

``train_tokenizer`` builds a SentencePiece BPE model for code: byte fallback, digits split,
identity normalisation, whitespace kept (no dummy prefix, no whitespace collapsing, whitespace-only
pieces allowed) and ``"\\n"`` as a user-defined piece, so that ``decode(encode(text)) == text``
exactly for any text (indentation, tabs, CRLF, trailing blanks, blank lines, non-ASCII, even the
literal ``"\\u2581"`` that SentencePiece uses as its space marker: see ``exact``).

Public API::

    class Tokenizer(Protocol): vocab_size, bos_id, eos_id, pad_id,
        encode(text, bos=False, eos=False) -> list[int]; decode(ids) -> str
        # both implementations also have: encode_batch(texts, bos=False, eos=False),
        # special_tokens (dict str -> id), fingerprint (sha256 of the model file), path
    class SentencePieceTokenizer(path_or_bytes, *, exact=None)
    class TiktokenTokenizer(path, *, special_tokens=None (Llama 3's 256), pat_str=LLAMA3_PAT_STR)
        # path: a tiktoken file, or a tokenizer.json (its added tokens are the special tokens;
        # merges_exact: encoded by tiktoken, else by MergesBPE with HF's merge rule)
        decode_bytes(ids) -> bytes
    def load_tokenizer(path, **kwargs) -> SentencePieceTokenizer | TiktokenTokenizer
    def read_tokenizer_json(path) -> TokenizerJsonSpec   # ranks, merges, specials, regex
    def is_tokenizer_json(path) -> bool; bytes_to_unicode() -> dict[int, str] (GPT-2's map)
    def find_hf_tokenizer(directory) -> str   # tokenizer.model / tokenizer.json of an HF dir
    def train_tokenizer(texts_or_files, vocab_size, model_path, *, max_sentences=300_000,
        max_sentence_length=4192, seed=0, ...) -> SentencePieceTokenizer
    def get_or_train_tokenizer(model_path, texts_or_files, vocab_size, **kw)  # cache on disk
    def llama3_special_tokens(variant='llama3', num_reserved=256) -> list[str]
    def load_tiktoken_ranks(path) / write_tiktoken_ranks(ranks, path)
    def check_token_ids(ids, vocab_size, where='') -> raises ValueError naming a bad id

``pad_id`` is always a valid id in ``[0, vocab_size)``: the model's own pad piece when it has one,
otherwise the eos id (Llama 1/2 and Llama 3 define no pad token; the data pipeline masks padding
out of the loss, so the value only has to be embeddable).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

# Llama 3's pre-tokenizer regex (the same as OpenAI's cl100k_base).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Limits Meta's Llama 3 tokenizer applies before calling tiktoken (its Rust regex engine can
# overflow its stack on very long runs of whitespace or non-whitespace).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
TIKTOKEN_MAX_RUN_CHARS = 25_000
SPM_SPACE = "\u2581"  # SentencePiece's meta symbol for a space


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def check_token_ids(ids, vocab_size: int, where: str = "") -> np.ndarray:
    """Returns ``ids`` as an int array; raises ValueError naming the first id outside [0, V)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}{_at(where)}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        first = int(arr.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]])
        raise ValueError(
            f"token id {first} is outside the vocabulary [0, {vocab_size})"
            f" ({int(bad.sum())} bad ids){_at(where)}"
        )
    return arr


def _at(where: str) -> str:
    return f" in {where}" if where else ""


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` (LLaMA 1/2, Code Llama, or one made by ``train_tokenizer``).

    ``exact``: SentencePiece turns spaces into U+2581 and back, so a literal U+2581 in the
    input decodes as a space. With ``exact=True`` such characters are encoded through their
    byte-fallback pieces (``<0xE2><0x96><0x81>``), which decode back to U+2581, making
    ``decode(encode(t)) == t`` for every string. ``None`` (default) turns it on for models that
    keep text verbatim (identity normalisation, no dummy prefix, byte fallback: the models made
    by ``train_tokenizer``) and off for others (e.g. LLaMA's, to match the reference ids).
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, *, exact: bool | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2

        self._init_args = (path_or_bytes, exact)
        if isinstance(path_or_bytes, bytes):
            proto, self.path = path_or_bytes, None
        else:
            self.path = os.fspath(path_or_bytes)
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"SentencePiece model not found: {self.path!r}")
            with open(self.path, "rb") as f:
                proto = f.read()
        self.fingerprint = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError
            raise ValueError(
                f"{self.path or '<bytes>'} is not a valid SentencePiece model: {e}"
            ) from e
        mp = spm_pb2.ModelProto()
        mp.ParseFromString(proto)
        self.model_proto = mp
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.unk_id = int(self._sp.unk_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else 0)
        self._byte_ids = None
        if mp.trainer_spec.byte_fallback:
            ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
            if all(i != self.unk_id for i in ids):
                self._byte_ids = ids
        if exact is None:
            exact = (
                mp.normalizer_spec.name == "identity"
                and not mp.normalizer_spec.add_dummy_prefix
                and not mp.normalizer_spec.remove_extra_whitespaces
                and self._byte_ids is not None
            )
        if exact and self._byte_ids is None:
            raise ValueError("exact=True needs a model with byte-fallback pieces")
        self.exact = bool(exact)
        if self.exact:
            self._meta_ids = [self._byte_ids[b] for b in SPM_SPACE.encode("utf-8")]
        self.special_tokens = {
            self._sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i) or _is_user_defined(mp, i)
        }

    def __getstate__(self):  # picklable (grain worker processes): rebuilt from the file/bytes
        return {"init_args": self._init_args}

    def __setstate__(self, state):
        path_or_bytes, exact = state["init_args"]
        self.__init__(path_or_bytes, exact=exact)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self!r} has no bos token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self!r} has no eos token")
            ids.append(self.eos_id)
        return ids

    def _encode_exact(self, text: str) -> list[int]:
        parts = text.split(SPM_SPACE)
        out: list[int] = []
        for i, part in enumerate(parts):
            if i:
                out.extend(self._meta_ids)
            if part:
                out.extend(self._sp.encode(part))
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.exact and SPM_SPACE in text:
            ids = self._encode_exact(text)
        else:
            ids = self._sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encodes many texts at once with SentencePiece's C++ threads (-1: all cores)."""
        texts = list(texts)
        out = self._sp.encode(texts, num_threads=num_threads)
        if self.exact:
            for i, t in enumerate(texts):
                if SPM_SPACE in t:
                    out[i] = self._encode_exact(t)
        return [self._wrap(list(ids), bos, eos) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        arr = check_token_ids(ids, self.vocab_size, "decode")
        return self._sp.decode(arr.reshape(-1).tolist())

    def id_to_piece(self, i: int) -> str:
        check_token_ids([i], self.vocab_size)
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))


def _is_user_defined(mp, i: int) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    return mp.pieces[i].type == spm_pb2.ModelProto.SentencePiece.USER_DEFINED


# --------------------------------------------------------------------------------------------
# tiktoken (Llama 3)
# --------------------------------------------------------------------------------------------


def llama3_special_tokens(variant: str = "llama3", num_reserved: int = 256) -> list[str]:
    """The special tokens that follow the BPE ranks in Meta's Llama 3 tokenizers, in id order.

    'llama3' (Llama 3): <|begin_of_text|>, <|end_of_text|>, reserved 0-3, <|start_header_id|>,
    <|end_header_id|>, reserved 4, <|eot_id|>, then reserved 5..250.
    'llama3.1' (Llama 3.1/3.2, llama-models): reserved 2 and 3 became <|finetune_right_pad_id|>
    and <|step_id|>, reserved 4 became <|eom_id|>, then <|python_tag|>, <|image|>, and the
    reserved tokens continue from 2. Both give 256 tokens (ids 128000-128255 for Llama 3).
    """
    if variant == "llama3":
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>",
            "<|reserved_special_token_3|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_4|>",
            "<|eot_id|>",
        ]
        first = 5
    elif variant == "llama3.1":
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|step_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|image|>",
        ]
        first = 2
    else:
        raise ValueError(f"unknown Llama 3 special-token variant {variant!r}: 'llama3', 'llama3.1'")
    if num_reserved < len(named):
        raise ValueError(f"num_reserved={num_reserved} < {len(named)} named special tokens")
    rest = [f"<|reserved_special_token_{first + i}|>" for i in range(num_reserved - len(named))]
    return named + rest


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken BPE file (lines of ``base64(token) rank``), as Llama 3's tokenizer.model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiktoken BPE file not found: {path!r}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}:{lineno}: not a tiktoken BPE line: {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"tiktoken BPE file {path!r} is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


class TiktokenTokenizer:
    """A tiktoken BPE file with Llama 3's regex and special tokens (ids after the BPE ranks).

    ``encode`` treats special-token strings found in the text as plain text unless they are
    listed in ``allowed_special`` (or ``allowed_special='all'``), as Meta's tokenizer does.
    bos = <|begin_of_text|>, eos = <|end_of_text|>, pad = <|finetune_right_pad_id|> when the
    special tokens have it, else eos.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        special_tokens: Sequence[str] | None = None,
        pat_str: str = LLAMA3_PAT_STR,
        bos_token: str = "<|begin_of_text|>",
        eos_token: str = "<|end_of_text|>",
        name: str | None = None,
    ):
        import tiktoken

        self._init_args = (
            path,
            dict(
                special_tokens=special_tokens,
                pat_str=pat_str,
                bos_token=bos_token,
                eos_token=eos_token,
                name=name,
            ),
        )
        self.path = os.fspath(path)
        self.fingerprint = _file_sha256(self.path) if os.path.isfile(self.path) else None
        if is_tokenizer_json(self.path):
            if special_tokens is not None:
                raise ValueError(
                    f"{self.path} is a tokenizer.json: its added tokens are the special tokens "
                    "(special_tokens cannot be given)"
                )
            spec = read_tokenizer_json(self.path)
            ranks, pat_str, self.special_tokens = spec.ranks, spec.pat_str, spec.special_tokens
            self.num_base_tokens = len(ranks)
            self.vocab_size = spec.vocab_size
            self.merges_exact = spec.tiktoken_exact
            if spec.tiktoken_exact:
                self._model = tiktoken.Encoding(
                    name=name or os.path.basename(self.path),
                    pat_str=pat_str,
                    mergeable_ranks=ranks,
                    special_tokens=self.special_tokens,
                )
            else:
                self._model = MergesBPE(spec)
            bos_token = spec.bos_token or bos_token
            eos_token = spec.eos_token or eos_token
        else:
            ranks = load_tiktoken_ranks(self.path)
            self.num_base_tokens = len(ranks)
            if special_tokens is None:
                special_tokens = llama3_special_tokens()
            if len(set(special_tokens)) != len(special_tokens):
                raise ValueError("special_tokens has duplicates")
            self.special_tokens = {
                t: self.num_base_tokens + i for i, t in enumerate(special_tokens)
            }
            self._model = tiktoken.Encoding(
                name=name or os.path.basename(self.path),
                pat_str=pat_str,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
            self.vocab_size = self.num_base_tokens + len(self.special_tokens)
            self.merges_exact = True
        for tok in (bos_token, eos_token):
            if tok not in self.special_tokens:
                raise ValueError(f"special token {tok!r} missing from special_tokens")
        self.bos_id = self.special_tokens[bos_token]
        self.eos_id = self.special_tokens[eos_token]
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>", self.eos_id)
        self.eot_id = self.special_tokens.get("<|eot_id|>", self.eos_id)
        self.stop_ids = {self.eos_id, self.eot_id}

    def __getstate__(self):  # picklable (grain worker processes): rebuilt from the file
        return {"init_args": self._init_args}

    def __setstate__(self, state):
        path, kwargs = state["init_args"]
        self.__init__(path, **kwargs)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        *,
        allowed_special: str | Iterable[str] = (),
        disallowed_special: str | Iterable[str] = (),
    ) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else set(disallowed_special)
        ids: list[int] = [self.bos_id] if bos else []
        for piece in _split_for_tiktoken(text):
            ids.extend(
                self._model.encode(piece, allowed_special=allowed, disallowed_special=disallowed)
            )
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 8
    ) -> list[list[int]]:
        """Encodes many texts with tiktoken's threads; special-token text is plain text."""
        texts = list(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= TIKTOKEN_MAX_RUN_CHARS]
        out: list[list[int] | None] = [None] * len(texts)
        enc = self._model.encode_ordinary_batch([texts[i] for i in short], num_threads=num_threads)
        for i, ids in zip(short, enc, strict=True):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = [x for p in _split_for_tiktoken(t) for x in self._model.encode_ordinary(p)]
        return [
            ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out
        ]

    def decode(self, ids: Sequence[int]) -> str:
        arr = check_token_ids(ids, self.vocab_size, "decode")
        try:
            return self._model.decode(arr.reshape(-1).tolist())
        except KeyError as e:  # an id in a gap of a tokenizer.json vocabulary
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {self!r}") from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids` (special tokens as their text): for incremental decoding."""
        arr = check_token_ids(ids, self.vocab_size, "decode")
        return self._model.decode_bytes(arr.reshape(-1).tolist())

    def id_to_piece(self, i: int) -> str:
        check_token_ids([i], self.vocab_size)
        return self._model.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self._model.encode_single_token(piece.encode("utf-8"))


_RUN_RE = re.compile(r"\s+|\S+")


def _split_for_tiktoken(text: str) -> Iterator[str]:
    """Cuts text into pieces of at most TIKTOKEN_MAX_ENCODE_CHARS characters, and cuts runs of
    more than TIKTOKEN_MAX_RUN_CHARS whitespace / non-whitespace characters (Meta's limits)."""
    if len(text) <= TIKTOKEN_MAX_RUN_CHARS:
        yield text
        return
    buf: list[str] = []
    size = 0
    for m in _RUN_RE.finditer(text):
        run = m.group()
        for j in range(0, len(run), TIKTOKEN_MAX_RUN_CHARS):
            part = run[j : j + TIKTOKEN_MAX_RUN_CHARS]
            if j or size + len(part) > TIKTOKEN_MAX_ENCODE_CHARS:
                if buf:
                    yield "".join(buf)
                buf, size = [], 0
            buf.append(part)
            size += len(part)
    if buf:
        yield "".join(buf)


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE, the Llama 3 kind)
# --------------------------------------------------------------------------------------------

# GPT-2's pre-tokenizer regex: what a ByteLevel pre-tokenizer with use_regex=True splits by.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in
    (printable Latin-1 bytes map to themselves, the others to U+0100 onwards in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def is_tokenizer_json(path: str | os.PathLike) -> bool:
    """Whether the file starts like a JSON object (a Hugging Face tokenizer.json)."""
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


class TokenizerJsonSpec:
    """What herd takes from a byte-level BPE tokenizer.json (see read_tokenizer_json)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _json_type(node) -> str | None:
    return node.get("type") if isinstance(node, dict) else None


def _sentencepiece_style(d: dict) -> bool:
    """Metaspace / '\u2581' pre-tokenizer, normaliser or decoder, or byte fallback: a
    SentencePiece BPE exported as tokenizer.json (Llama 1/2, Code Llama)."""
    text = json.dumps({k: d.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    model = d.get("model") or {}
    return (
        "Metaspace" in text
        or SPM_SPACE in text
        or "\\u2581" in text
        or bool(model.get("byte_fallback"))
    )


def _pre_tokenizer_pattern(pre, where: str) -> str:
    """The regex of a Llama-3-style pre-tokenizer: Split(Regex, Isolated) + ByteLevel(no
    regex), or ByteLevel alone (GPT-2's regex); no prefix space."""
    kind = _json_type(pre)
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else [pre]
    byte_level = [s for s in steps if _json_type(s) == "ByteLevel"]
    splits = [s for s in steps if _json_type(s) == "Split"]
    if len(byte_level) != 1 or len(splits) + len(byte_level) != len(steps) or len(splits) > 1:
        raise ValueError(
            f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not supported (herd reads a "
            "Split(Regex, 'Isolated') followed by ByteLevel, or ByteLevel alone)"
        )
    bl = byte_level[0]
    if bl.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    if splits:
        sp = splits[0]
        pattern = (sp.get("pattern") or {}).get("Regex")
        if (
            pattern is None
            or sp.get("behavior") != "Isolated"
            or sp.get("invert")
            or bl.get("use_regex", True)
            or steps[-1] is not bl
        ):
            raise ValueError(
                f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not supported (herd reads "
                "Split(pattern=Regex, behavior='Isolated', invert=false) then "
                "ByteLevel(use_regex=false))"
            )
        return pattern
    if not bl.get("use_regex", True):
        raise ValueError(f"{where}: a ByteLevel pre-tokenizer without a regex splits nothing")
    return GPT2_PAT_STR


def read_tokenizer_json(path: str | os.PathLike) -> TokenizerJsonSpec:
    """Reads a Hugging Face fast-tokenizer file of byte-level BPE (Llama 3's tokenizer.json).

    Returns the BPE ranks (token bytes -> id, from the vocabulary through GPT-2's
    byte-to-unicode map), the merges as byte pairs, the pre-tokenizer regex, the added
    tokens with their ids (herd's special tokens), bos/eos names and ``tiktoken_exact``:
    whether tiktoken's rule (merge the adjacent pair whose concatenation has the lowest
    rank) gives the ids HF's BPE does (merge the pair listed first in ``merges``). That holds
    when the merges are every split of every token into two tokens, ordered by the merged
    token's id, and the whole-word lookup is on (``ignore_merges``): files converted from
    tiktoken (transformers' TikTokenConverter, Llama 3's). Other files (e.g. one trained by
    the ``tokenizers`` library) are encoded with HF's rule by :class:`MergesBPE`.

    A SentencePiece-style BPE (Metaspace, byte fallback: Llama 2 / Code Llama) raises a
    ValueError that says to use its tokenizer.model.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json (no model.vocab)")
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (BPE only)")
    if _sentencepiece_style(d):
        raise ValueError(
            f"{path} is a SentencePiece-style BPE (Metaspace / byte fallback, as Llama 2 and "
            "Code Llama's): load the SentencePiece tokenizer.model next to it instead"
        )
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: BPE {key}={model[key]!r} is not supported")
    if d.get("normalizer") is not None:
        raise ValueError(
            f"{path}: normalizer {json.dumps(d['normalizer'])[:120]} is not supported "
            "(byte-level BPE files such as Llama 3's have none)"
        )
    pat_str = _pre_tokenizer_pattern(d.get("pre_tokenizer"), path)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in token)
        except KeyError as e:
            raise ValueError(
                f"{path}: vocabulary token {token!r} has the character {e.args[0]!r}, which "
                "is outside the byte-level alphabet (not a byte-level BPE)"
            ) from None

    added = {}
    for a in d.get("added_tokens") or []:
        added[a["content"]] = int(a["id"])
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if token in added and added[token] == i:
            continue  # a special token also listed in the vocabulary (trainer output)
        ranks[to_bytes(token)] = int(i)
    ids = list(ranks.values()) + list(added.values())
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: vocabulary and added tokens share ids")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of the 256 bytes are not tokens (e.g. {missing[0]})"
        )
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((to_bytes(a), to_bytes(b)))
    tiktoken_exact = bool(model.get("ignore_merges")) and _merges_are_tiktoken(ranks, merges)
    bos = eos = None
    for name in ("<|begin_of_text|>", "<s>", "<|endoftext|>"):
        if name in added:
            bos = bos or name
    for name in ("<|end_of_text|>", "</s>", "<|endoftext|>"):
        if name in added:
            eos = eos or name
    return TokenizerJsonSpec(
        ranks=ranks,
        merges=merges,
        special_tokens=added,
        pat_str=pat_str,
        vocab_size=max(ids) + 1,
        ignore_merges=bool(model.get("ignore_merges")),
        tiktoken_exact=tiktoken_exact,
        bos_token=bos,
        eos_token=eos,
    )


def _merges_are_tiktoken(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> bool:
    """Whether `merges` are all two-token splits of all tokens, by the merged token's rank."""
    last = -1
    for a, b in merges:
        r = ranks.get(a + b)
        if r is None or r < last or a not in ranks or b not in ranks:
            return False
        last = r
    n_splits = 0
    for tok in ranks:
        n_splits += sum(1 for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
    return n_splits == len(set(merges)) == len(merges)


class MergesBPE:
    """Byte-level BPE with Hugging Face's rule: the adjacent pair listed first in the merges
    is merged, one occurrence at a time, leftmost first (tokenizers' ``Word::merge_all``);
    a whole pre-token found in the vocabulary is one token when ``ignore_merges``. The
    tiktoken.Encoding methods TiktokenTokenizer uses, in Python (with a pre-token cache)."""

    def __init__(self, spec: TokenizerJsonSpec):
        import regex

        self._ranks = spec.ranks
        self._merge_rank: dict[tuple[bytes, bytes], int] = {}
        for i, pair in enumerate(spec.merges):
            self._merge_rank.setdefault(pair, i)
        self._ignore_merges = spec.ignore_merges
        self._special = dict(spec.special_tokens)
        self._decoder = {i: t for t, i in spec.ranks.items()}
        self._decoder.update({i: t.encode("utf-8") for t, i in spec.special_tokens.items()})
        self._pat = regex.compile(spec.pat_str)
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, piece: bytes) -> list[int]:
        if self._ignore_merges and piece in self._ranks:
            return [self._ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        rank = self._merge_rank
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = rank.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        return [self._ranks[p] for p in parts]

    def _pieces(self, text: str) -> Iterator[str]:
        """HF's Split(..., 'Isolated'): the matches and the text between them."""
        end = 0
        for m in self._pat.finditer(text):
            if m.start() > end:
                yield text[end : m.start()]
            if m.end() > m.start():
                yield m.group()
            end = m.end()
        if end < len(text):
            yield text[end:]

    def encode_ordinary(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._pieces(text):
            ids = self._cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(self._cache) < 200_000:
                    self._cache[piece] = ids
            out.extend(ids)
        return out

    def encode_ordinary_batch(self, texts, num_threads: int = 1) -> list[list[int]]:
        del num_threads
        return [self.encode_ordinary(t) for t in texts]

    def encode(self, text: str, allowed_special=(), disallowed_special=()) -> list[int]:
        allowed = set(self._special) if allowed_special == "all" else set(allowed_special)
        disallowed = (
            set(self._special) - allowed if disallowed_special == "all" else set(disallowed_special)
        )
        for tok in disallowed:
            if tok in text:
                raise ValueError(f"the text contains the disallowed special token {tok!r}")
        if not allowed:
            return self.encode_ordinary(text)
        import regex

        pat = "|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True))
        out: list[int] = []
        end = 0
        for m in regex.finditer(pat, text):
            out += self.encode_ordinary(text[end : m.start()]) + [self._special[m.group()]]
            end = m.end()
        return out + self.encode_ordinary(text[end:])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._decoder[i] for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, i: int) -> bytes:
        return self._decoder[i]

    def encode_single_token(self, piece: bytes) -> int:
        if piece in self._ranks:
            return self._ranks[piece]
        raise KeyError(piece)


# --------------------------------------------------------------------------------------------
# Loading and training
# --------------------------------------------------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+\s*$")


def load_tokenizer(path: str | os.PathLike, **kwargs) -> SentencePieceTokenizer | TiktokenTokenizer:
    """Loads a SentencePiece ``.model``, a tiktoken BPE file or a Hugging Face byte-level BPE
    ``tokenizer.json`` (as a TiktokenTokenizer), telling them apart by content.

    kwargs go to the class (``exact`` for SentencePiece; ``special_tokens``, ``pat_str`` for
    tiktoken). Missing file: FileNotFoundError; unreadable: ValueError naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise ValueError(f"tokenizer file {path!r} is empty")
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line) or head.lstrip().startswith(b"{"):
        return TiktokenTokenizer(path, **kwargs)
    return SentencePieceTokenizer(path, **kwargs)


def find_hf_tokenizer(directory: str | os.PathLike) -> str:
    """The tokenizer file of a Hugging Face model directory: a SentencePiece tokenizer.model
    at the top (Llama 1/2, Code Llama: their tokenizer.json is the same model exported, which
    herd refuses), else tokenizer.json (Llama 3: byte-level BPE), else
    original/tokenizer.model (Meta's tiktoken file inside Llama 3 repositories). ValueError
    naming the directory when there is none."""
    directory = os.fspath(directory)
    top = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(top) and not is_tokenizer_json(top):
        return top
    for rel in ("tokenizer.json", os.path.join("original", "tokenizer.model")):
        path = os.path.join(directory, rel)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"{directory} has no tokenizer.model or tokenizer.json: give one with --tokenizer=FILE"
    )


def _iter_documents(texts_or_files, input_kind: str = "auto") -> Iterator[str]:
    """Yields documents: file contents (paths) or the strings themselves (texts).

    Items that are os.PathLike are files. When all items are ``str``, they are files when the
    first one names an existing file and has no newline; otherwise they are texts. A single str
    or PathLike is one file (or a glob).
    """
    import glob as globlib

    if isinstance(texts_or_files, (str, os.PathLike)):
        p = os.fspath(texts_or_files)
        files = sorted(globlib.glob(p, recursive=True)) if globlib.has_magic(p) else [p]
        if not files:
            raise ValueError(f"no files match {p!r}")
        texts_or_files = [os.path.abspath(f) for f in files]
        as_files = True
    else:
        texts_or_files = iter(texts_or_files)
        try:
            first = next(texts_or_files)
        except StopIteration:
            raise ValueError("train_tokenizer: the corpus is empty") from None
        if input_kind not in ("auto", "files", "texts"):
            raise ValueError(f"input_kind must be 'auto', 'files' or 'texts', got {input_kind!r}")
        as_files = input_kind == "files" or (
            input_kind == "auto"
            and (
                isinstance(first, os.PathLike)
                or (isinstance(first, str) and "\n" not in first and os.path.isfile(first))
            )
        )
        texts_or_files = _chain([first], texts_or_files)
    for item in texts_or_files:
        if as_files:
            p = os.fspath(item)
            if not os.path.isfile(p):
                raise ValueError(f"train_tokenizer: not a file: {p!r}")
            with open(p, "rb") as f:
                data = f.read()
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("train_tokenizer: skipping %s (not valid UTF-8)", p)
        else:
            if not isinstance(item, str):
                raise TypeError(f"train_tokenizer: expected str texts, got {type(item).__name__}")
            yield item


def _chain(*its):
    for it in its:
        yield from it


def _training_sentences(
    texts_or_files, max_sentences: int, max_sentence_length: int, seed: int, input_kind: str
) -> tuple[list[str], int]:
    """Lines of the corpus ('\\n' removed; lines longer than max_sentence_length bytes cut into
    pieces), reservoir-sampled down to max_sentences with a seeded RNG (deterministic)."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    max_chars = max(1, max_sentence_length // 4)  # a char is at most 4 utf-8 bytes
    for doc in _iter_documents(texts_or_files, input_kind):
        for line in doc.split("\n"):
            if not line:
                continue
            if len(line) > max_chars and len(line.encode("utf-8")) > max_sentence_length:
                pieces = [line[i : i + max_chars] for i in range(0, len(line), max_chars)]
            else:
                pieces = [line]
            for piece in pieces:
                n += 1
                if len(sample) < max_sentences:
                    sample.append(piece)
                else:
                    j = rng.randrange(n)
                    if j < max_sentences:
                        sample[j] = piece
    return sample, n


def train_tokenizer(
    texts_or_files,
    vocab_size: int,
    model_path: str | os.PathLike,
    *,
    max_sentences: int = 300_000,
    max_sentence_length: int = 4192,
    seed: int = 0,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    user_defined_symbols: Sequence[str] = ("\n",),
    num_threads: int | None = None,
    input_kind: str = "auto",
    **extra_trainer_options,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece BPE model for code and writes it (atomically) to ``model_path``.

    texts_or_files: file paths (or a glob), or an iterable of document strings
    (``input_kind='files'|'texts'`` says which; 'auto': os.PathLike items, or str items whose
    first is an existing file's path, are files; otherwise texts). The corpus is
    cut into lines (SentencePiece's unit), lines longer than ``max_sentence_length`` bytes are
    cut into pieces (never dropped, never a crash) and at most ``max_sentences`` lines are kept
    by seeded reservoir sampling, so training is fast and deterministic.

    Settings: byte_fallback (any byte encodes), split_digits, identity normalisation,
    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True (indentation runs become
    pieces), add_dummy_prefix=False, '\\n' a user-defined piece; ids unk=0, bos=1, eos=2, pad=3.
    The result round-trips any text exactly (see SentencePieceTokenizer ``exact``).
    """
    import sentencepiece as spm

    model_path = os.fspath(model_path)
    sentences, n_total = _training_sentences(
        texts_or_files, max_sentences, max_sentence_length, seed, input_kind
    )
    if not sentences:
        raise ValueError("train_tokenizer: the corpus has no non-empty lines")
    log.info(
        "train_tokenizer: %d of %d lines, vocab %d -> %s",
        len(sentences),
        n_total,
        vocab_size,
        model_path,
    )
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    options.update(extra_trainer_options)
    import io

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, **options
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_path)
    return SentencePieceTokenizer(model_path)


def get_or_train_tokenizer(
    model_path: str | os.PathLike, texts_or_files, vocab_size: int, **kwargs
) -> SentencePieceTokenizer | TiktokenTokenizer:
    """Loads ``model_path`` if it exists (and has ``vocab_size`` pieces), else trains it."""
    if os.path.isfile(model_path):
        tok = load_tokenizer(model_path)
        if tok.vocab_size == vocab_size:
            return tok
        log.warning(
            "%s has vocab %d, wanted %d: retraining", model_path, tok.vocab_size, vocab_size
        )
    return train_tokenizer(texts_or_files, vocab_size, model_path, **kwargs)


# A run's workdir keeps a copy of the tokenizer it trained with, so that generation,
# fine-tuning and embedding need only the workdir (a cached or user-given tokenizer
# file may since have moved or changed).
WORKDIR_TOKENIZER_DIR = "tokenizer"


def save_to_workdir(path: str | os.PathLike, workdir: str | os.PathLike) -> str:
    """Copies the tokenizer file `path` into `workdir/tokenizer/`; returns the copy's path.

    A workdir that already holds a different tokenizer is refused: its checkpoints were
    trained with that one.
    """
    import shutil

    folder = os.path.join(os.fspath(workdir), WORKDIR_TOKENIZER_DIR)
    target = os.path.join(folder, os.path.basename(os.fspath(path)))
    existing = (
        [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
        if os.path.isdir(folder)
        else []
    )
    for other in existing:
        if _file_sha256(other) == _file_sha256(path):
            return other
    if existing:
        raise ValueError(
            f"workdir {os.fspath(workdir)!r} holds the tokenizer {existing[0]!r}, which differs "
            f"from {os.fspath(path)!r}: its checkpoints were trained with the former (use "
            "another --workdir, or set data.tokenizer to that file)"
        )
    os.makedirs(folder, exist_ok=True)
    partial = target + ".partial"
    shutil.copyfile(path, partial)
    os.replace(partial, target)  # a crash mid-copy never leaves a truncated tokenizer
    return target


def workdir_tokenizer_path(workdir: str | os.PathLike) -> str:
    """The tokenizer file a training run kept in `workdir` (FileNotFoundError if none)."""
    folder = os.path.join(os.fspath(workdir), WORKDIR_TOKENIZER_DIR)
    files = (
        sorted(f for f in os.listdir(folder) if not f.endswith(".partial"))
        if (os.path.isdir(folder))
        else []
    )
    if len(files) != 1:
        raise FileNotFoundError(
            f"{folder!r} should hold the one tokenizer file of the run (found {files}); "
            "workdirs of herd.lm.train keep it there"
        )
    return os.path.join(folder, files[0])


def load_from_workdir(workdir: str | os.PathLike, **kwargs):
    """The tokenizer of a herd.lm.train workdir (see save_to_workdir)."""
    return load_tokenizer(workdir_tokenizer_path(workdir), **kwargs)
