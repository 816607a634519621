"""Fill-in-the-middle (FIM) for code models, as Code Llama trains and prompts it.

Code Llama (Roziere et al. 2023, sec. 2.3; /work/shared/RECIPES.md "Code Llama"): a fraction
0.9 of the training documents is split at two character positions drawn uniformly over the
document into prefix / middle / suffix and reordered, half of them in PSM order and half in SPM
order (suffix first); the rest stays plain text. Four sentinel tokens mark the parts:
``<PRE> <SUF> <MID> <EOT>``, vocabulary ids 32007-32010 of 32016 in the 7B/13B/70B tokenizers.

Layouts (sentinels as ``<X>``; BOS/EOS around the whole sequence as for a plain document)::

    PSM  <PRE> prefix <SUF> suffix <MID> middle <EOT>          (RECIPES.md)
    SPM  <PRE> <SUF> suffix <MID> prefix middle <EOT>          (Bavarian et al. 2022 app. D,
                                                                Code Llama's implementation and
                                                                Meta's Code Llama prompt docs)

RECIPES.md only says "suffix first" for SPM; the exact order above is the one of Code Llama's
reference ``infilling_prompt_tokens(suffix_first=True)`` and of Meta's published prompt format
``<s><PRE><SUF>{suffix}<MID>{prefix}``, which the training layout must continue.

Each part is encoded separately (the split is at characters, not tokens), and the middle and
suffix are encoded without SentencePiece's implicit leading space (RECIPES.md: the infilling
prompt encodes the suffix without it; the paper suppresses it for the middle and the suffix).
In SPM the prefix and middle are adjacent, and the paper encodes them together
(``spm_joint=True``, the default), so that the model never sees a token split at the prefix /
middle boundary in that format; ``spm_joint=False`` encodes them separately.

Public API::

    FIM_PIECES = ('<PRE>', '<SUF>', '<MID>', '<EOT>')
    CODE_LLAMA_FIM = FimTokens(pre=32007, suf=32008, mid=32009, eot=32010)
    class FimTokens(pre, suf, mid, eot)
        FimTokens.from_tokenizer(tokenizer) -> FimTokens   # ValueError if it has none
    class FimSample(ids, fmt, cut)       # fmt None | 'psm' | 'spm'; cut (i, j) char positions
        .parts(text) -> (prefix, middle, suffix) | None
    class FimTransform(tokenizer, *, rate=0.9, spm_rate=0.5, fim_tokens=None, bos=True,
        eos=True, spm_joint=True, max_tokens=None)
        .draw(rng, n_chars) -> (fmt, i, j)            # the random decision alone
        __call__(text, rng) -> FimSample              # rng: np.random.Generator or int seed
        .for_record(text, seed, index) -> FimSample   # rng keyed on (seed, index)
    fim_transform(text, tokenizer, rng, **kw) -> FimSample
    encode_no_leading_space(tokenizer, text) -> list[int]
    infilling_prompt(prefix, suffix, tokenizer, fmt='psm', *, fim_tokens=None, bos=True)
        -> list[int]   # ends where the model generates the middle (up to <EOT>)
    split_infill_output(ids, fim_tokens, stop_ids=()) -> (middle_ids, finished)
    decode_middle(ids, tokenizer) -> str            # inverse of encode_no_leading_space
    infill_text(generated_ids, tokenizer, fim_tokens=None) -> (middle_text, finished)

A herd tokenizer gets the sentinels as user-defined pieces::

    train_tokenizer(files, vocab, path, user_defined_symbols=FIM_USER_DEFINED_SYMBOLS)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

FIM_PIECES = ("<PRE>", "<SUF>", "<MID>", "<EOT>")
# train_tokenizer's default user-defined symbols ('\n') plus the four sentinels.
FIM_USER_DEFINED_SYMBOLS = ("\n",) + FIM_PIECES
FORMATS = ("psm", "spm")
_SPM_SPACE = "\u2581"
# A character that starts no word, used to strip / restore SentencePiece's implicit leading
# space (Code Llama's reference tokenizer does the same trick).
_MARKER = "\u263a"


@dataclass(frozen=True)
class FimTokens:
    """The ids of the four FIM sentinels <PRE>, <SUF>, <MID>, <EOT>."""

    pre: int
    suf: int
    mid: int
    eot: int

    def __post_init__(self):
        ids = (self.pre, self.suf, self.mid, self.eot)
        if len(set(ids)) != 4 or min(ids) < 0:
            raise ValueError(f"FIM sentinel ids must be 4 distinct ids >= 0, got {ids}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.pre, self.suf, self.mid, self.eot)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> FimTokens:
        """The sentinels of ``tokenizer``: special / user-defined pieces named ``<PRE>`` ...
        (herd tokenizers trained with ``FIM_USER_DEFINED_SYMBOLS``, or a tiktoken tokenizer
        given them as special tokens) or ``\u2581<PRE>`` ... (Code Llama's SentencePiece
        model, ids 32007-32010). Raises ValueError naming the missing ones."""
        found: dict[str, int] = {}
        for name in FIM_PIECES:
            i = _lookup_piece(tokenizer, name)
            if i is not None:
                found[name] = i
        missing = [n for n in FIM_PIECES if n not in found]
        if missing:
            raise ValueError(
                f"tokenizer {tokenizer!r} has no FIM sentinel token(s) {', '.join(missing)}"
                " (neither as special / user-defined pieces nor as '\u2581'-prefixed pieces): "
                "infilling needs a tokenizer that has them, e.g. Code Llama 7B/13B/70B's "
                "(vocab 32016, ids 32007-32010) or one trained by herd.lm.tokenizer."
                "train_tokenizer(..., user_defined_symbols=herd.lm.fim.FIM_USER_DEFINED_SYMBOLS)"
            )
        ids = [found[n] for n in FIM_PIECES]
        for n, i in zip(FIM_PIECES, ids, strict=True):
            for other, oid in (("bos", "bos_id"), ("eos", "eos_id")):
                if i == getattr(tokenizer, oid, None):
                    raise ValueError(f"FIM sentinel {n} has the {other} id {i}")
        return cls(*ids)


CODE_LLAMA_FIM = FimTokens(pre=32007, suf=32008, mid=32009, eot=32010)


def _lookup_piece(tokenizer, name: str) -> int | None:
    vocab = getattr(tokenizer, "vocab_size", None)
    specials = getattr(tokenizer, "special_tokens", None) or {}
    for cand in (name, _SPM_SPACE + name):
        if cand in specials:
            return int(specials[cand])
    piece_to_id = getattr(tokenizer, "piece_to_id", None)
    id_to_piece = getattr(tokenizer, "id_to_piece", None)
    if piece_to_id is None or id_to_piece is None:
        return None
    for cand in (name, _SPM_SPACE + name):
        try:
            i = int(piece_to_id(cand))
            if vocab is not None and not 0 <= i < vocab:
                continue
            if i == getattr(tokenizer, "unk_id", None) or id_to_piece(i) != cand:
                continue  # SentencePiece answers unk for an unknown piece
        except (KeyError, ValueError, TypeError):  # tiktoken: not a single token
            continue
        return i
    return None


def _adds_leading_space(tokenizer) -> bool:
    """Whether ``tokenizer.encode`` prepends a space (SentencePiece's add_dummy_prefix)."""
    proto = getattr(tokenizer, "model_proto", None)
    if proto is None:
        return False
    return bool(proto.normalizer_spec.add_dummy_prefix)


def encode_no_leading_space(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` without the space a SentencePiece model with a dummy prefix
    adds in front (Code Llama encodes the middle and suffix this way). Other tokenizers (herd's,
    tiktoken) add none: plain ``encode``."""
    if not _adds_leading_space(tokenizer):
        return list(tokenizer.encode(text))
    if not text:
        return []
    head = list(tokenizer.encode(_MARKER))
    ids = list(tokenizer.encode(_MARKER + text))
    if ids[: len(head)] != head:
        raise ValueError(
            f"cannot encode {text[:40]!r} without the leading space: the marker {_MARKER!r} "
            "merged with the text"
        )
    return ids[len(head) :]


def decode_middle(ids: Sequence[int], tokenizer) -> str:
    """Decodes ids made by ``encode_no_leading_space`` (or generated after <MID>) without
    dropping a leading space (a SentencePiece model with a dummy prefix removes one when
    decoding from the start)."""
    ids = [int(i) for i in ids]
    if not _adds_leading_space(tokenizer):
        return tokenizer.decode(ids)
    if not ids:
        return ""
    head = list(tokenizer.encode(_MARKER))
    text = tokenizer.decode(head + ids)
    if not text.startswith(_MARKER):
        raise ValueError(f"decoding the middle lost the marker {_MARKER!r}: {text[:40]!r}")
    return text[len(_MARKER) :]


@dataclass(frozen=True)
class FimSample:
    """One transformed document: ``ids`` (with BOS/EOS as asked), ``fmt`` (None when left
    plain, else 'psm' / 'spm'), ``cut`` ((i, j) with prefix = text[:i], middle = text[i:j],
    suffix = text[j:]; None when plain)."""

    ids: list[int]
    fmt: str | None
    cut: tuple[int, int] | None

    def parts(self, text: str) -> tuple[str, str, str] | None:
        if self.cut is None:
            return None
        i, j = self.cut
        return text[:i], text[i:j], text[j:]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (bool, float, str)):
        raise TypeError(f"rng must be a numpy Generator or an int seed, got {rng!r}")
    return np.random.default_rng(rng)


class FimTransform:
    """Code Llama's document-level FIM transform (see the module docstring).

    ``rate``: probability a document is transformed (Code Llama 0.9); ``spm_rate``: probability
    a transformed document is in SPM rather than PSM order (0.5). ``max_tokens``: when set, a
    document whose transformed sequence would be longer stays plain (Code Llama transforms only
    documents that are not cut across model contexts); the random draws are the same either way.
    The output depends only on the text and the generator's state (deterministic).
    """

    def __init__(
        self,
        tokenizer,
        *,
        rate: float = 0.9,
        spm_rate: float = 0.5,
        fim_tokens: FimTokens | None = None,
        bos: bool = True,
        eos: bool = True,
        spm_joint: bool = True,
        max_tokens: int | None = None,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"FIM rate must be in [0, 1], got {rate}")
        if not 0.0 <= spm_rate <= 1.0:
            raise ValueError(f"FIM spm_rate must be in [0, 1], got {spm_rate}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be None or >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.tokens = fim_tokens if fim_tokens is not None else FimTokens.from_tokenizer(tokenizer)
        self.rate, self.spm_rate = float(rate), float(spm_rate)
        self.bos, self.eos = bool(bos), bool(eos)
        self.spm_joint = bool(spm_joint)
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        return (
            f"FimTransform(rate={self.rate}, spm_rate={self.spm_rate}, tokens={self.tokens}, "
            f"spm_joint={self.spm_joint}, max_tokens={self.max_tokens})"
        )

    def draw(self, rng, n_chars: int) -> tuple[str | None, int, int]:
        """The random part: (fmt or None, i, j) with 0 <= i <= j <= n_chars. Always consumes
        the same draws from ``rng`` (4 numbers), whatever the outcome."""
        rng = _as_rng(rng)
        u_fim, u_spm = rng.random(2)
        i, j = sorted(int(x) for x in rng.integers(0, n_chars + 1, size=2))
        if u_fim >= self.rate:
            return None, 0, 0
        return ("spm" if u_spm < self.spm_rate else "psm"), i, j

    def _wrap(self, body: list[int]) -> list[int]:
        tok = self.tokenizer
        return ([tok.bos_id] if self.bos else []) + body + ([tok.eos_id] if self.eos else [])

    def encode_fim(self, prefix: str, middle: str, suffix: str, fmt: str) -> list[int]:
        """The FIM sequence (with BOS/EOS as configured) of the given parts."""
        t, tok = self.tokens, self.tokenizer
        suf_ids = encode_no_leading_space(tok, suffix)
        if fmt == "psm":
            body = (
                [t.pre] + list(tok.encode(prefix)) + [t.suf] + suf_ids + [t.mid]
                + encode_no_leading_space(tok, middle) + [t.eot]
            )  # fmt: skip
        elif fmt == "spm":
            if self.spm_joint:
                pm = list(tok.encode(prefix + middle))
            else:
                pm = list(tok.encode(prefix)) + encode_no_leading_space(tok, middle)
            body = [t.pre, t.suf] + suf_ids + [t.mid] + pm + [t.eot]
        else:
            raise ValueError(f"FIM format must be one of {FORMATS}, got {fmt!r}")
        return self._wrap(body)

    def __call__(self, text: str, rng) -> FimSample:
        if not isinstance(text, str):
            raise TypeError(f"FIM transform expects str, got {type(text).__name__}")
        fmt, i, j = self.draw(rng, len(text))
        if fmt is not None:
            ids = self.encode_fim(text[:i], text[i:j], text[j:], fmt)
            if self.max_tokens is None or len(ids) <= self.max_tokens:
                return FimSample(ids, fmt, (i, j))
        return FimSample(list(self.tokenizer.encode(text, bos=self.bos, eos=self.eos)), None, None)

    def for_record(self, text: str, seed: int, index: int) -> FimSample:
        """The transform with a generator keyed on (seed, index): the same record gets the
        same split for the same seed, in any order and on any worker."""
        return self(text, np.random.default_rng([int(seed) % 2**63, int(index)]))


def fim_transform(text: str, tokenizer, rng, **kwargs) -> FimSample:
    """One-off ``FimTransform(tokenizer, **kwargs)(text, rng)``."""
    return FimTransform(tokenizer, **kwargs)(text, rng)


def infilling_prompt(
    prefix: str,
    suffix: str,
    tokenizer,
    fmt: str = "psm",
    *,
    fim_tokens: FimTokens | None = None,
    bos: bool = True,
) -> list[int]:
    """Token ids of Code Llama's infilling prompt; the model continues with the middle and
    ends it with <EOT>::

        psm: [BOS] <PRE> prefix <SUF> suffix <MID>
        spm: [BOS] <PRE> <SUF> suffix <MID> prefix

    The suffix is encoded without the implicit leading space; BOS only at the very start.
    """
    t = fim_tokens if fim_tokens is not None else FimTokens.from_tokenizer(tokenizer)
    head = [tokenizer.bos_id] if bos else []
    suf_ids = encode_no_leading_space(tokenizer, suffix)
    if fmt == "psm":
        return head + [t.pre] + list(tokenizer.encode(prefix)) + [t.suf] + suf_ids + [t.mid]
    if fmt == "spm":
        return head + [t.pre, t.suf] + suf_ids + [t.mid] + list(tokenizer.encode(prefix))
    raise ValueError(f"FIM format must be one of {FORMATS}, got {fmt!r}")


def split_infill_output(
    ids: Iterable[int], fim_tokens: FimTokens, stop_ids: Iterable[int] = ()
) -> tuple[list[int], bool]:
    """Generated ids (after the prompt) -> (middle ids before the first <EOT>, finished).

    ``finished`` is True when an <EOT> was found. Generation may also stop at another id in
    ``stop_ids`` (e.g. EOS): the middle ends there too but ``finished`` is False, as for a
    generation cut by its length limit.
    """
    stops = {int(s) for s in stop_ids}
    out: list[int] = []
    for i in ids:
        i = int(i)
        if i == fim_tokens.eot:
            return out, True
        if i in stops:
            return out, False
        out.append(i)
    return out, False


def infill_text(
    generated_ids: Iterable[int], tokenizer, fim_tokens: FimTokens | None = None
) -> tuple[str, bool]:
    """The middle's text from generated ids (stopping at <EOT>, or at EOS unfinished)."""
    t = fim_tokens if fim_tokens is not None else FimTokens.from_tokenizer(tokenizer)
    stops = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", -1) >= 0 else []
    ids, finished = split_infill_output(generated_ids, t, stops)
    return decode_middle(ids, tokenizer), finished


# --------------------------------------------------------------------------------------------
# Infilling evaluation: held-out single-line middles, exact match
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfillExample:
    """One infilling task: the model sees ``prefix`` (and ``suffix``) and must produce
    ``middle``; ``where`` names the document and line."""

    prefix: str
    middle: str
    suffix: str
    where: str = ""


def single_line_examples(
    documents: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    max_prefix_chars: int = 240,
    max_suffix_chars: int = 160,
    max_line_chars: int = 80,
    names: Sequence[str] | None = None,
) -> list[InfillExample]:
    """``n`` single-line infilling tasks cut from ``documents`` (e.g. held-out files' text).

    Lines are drawn without replacement, uniformly over all non-blank lines of at most
    ``max_line_chars`` characters (longer ones are left out: a tiny model's generation
    budget), with ``np.random.default_rng(seed)``. For a line ``text[a:b]`` (``b`` at its
    newline): middle = the line without its newline (indentation included), prefix = the
    text before ``a``, suffix = the text from ``b`` on (it starts with the newline). The
    prefix keeps at most ``max_prefix_chars`` characters before the line and starts at a
    line start; the suffix keeps at most ``max_suffix_chars`` and ends at a line end, so a
    prompt never starts or ends inside a line (the context limit of a small model). Raises
    ValueError when fewer than ``n`` lines qualify.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for key, value in (
        ("max_prefix_chars", max_prefix_chars),
        ("max_suffix_chars", max_suffix_chars),
        ("max_line_chars", max_line_chars),
    ):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    names = list(names) if names is not None else [f"document {k}" for k in range(len(documents))]
    if len(names) != len(documents):
        raise ValueError(f"{len(names)} names for {len(documents)} documents")
    candidates: list[tuple[int, int, int, int]] = []  # (doc, line number, start, end)
    for d, text in enumerate(documents):
        pos = 0
        for k, line in enumerate(text.splitlines(keepends=True)):
            body = line.rstrip("\r\n")
            if body.strip() and len(body) <= max_line_chars:
                candidates.append((d, k, pos, pos + len(body)))
            pos += len(line)
    if len(candidates) < n:
        raise ValueError(
            f"asked for {n} single-line examples but the documents have only "
            f"{len(candidates)} non-blank lines of <= {max_line_chars} characters"
        )
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(candidates), size=n, replace=False).tolist())
    out = []
    for c in chosen:
        d, k, a, b = candidates[c]
        text = documents[d]
        prefix = text[max(0, a - max_prefix_chars) : a]
        if a > max_prefix_chars and "\n" in prefix:  # start at a line start
            prefix = prefix[prefix.index("\n") + 1 :]
        elif a > max_prefix_chars:
            prefix = ""
        suffix = text[b : b + max_suffix_chars]
        if b + max_suffix_chars < len(text):  # end at a line end
            suffix = suffix[: suffix.rfind("\n") + 1] if "\n" in suffix[1:] else suffix[:1]
        out.append(InfillExample(prefix, text[a:b], suffix, f"{names[d]}:{k + 1}"))
    return out


@dataclass(frozen=True)
class InfillResult:
    """Exact-match rate of infilled lines: ``exact`` of ``n`` examples; ``predictions``
    (the generated lines, in example order), ``mode``, and ``finished``: generations that
    ended within the token budget (with <EOT> after an infilling prompt, with a newline or
    EOS left to right)."""

    mode: str
    exact: int
    n: int
    predictions: tuple[str, ...]
    finished: int = 0

    @property
    def rate(self) -> float:
        return self.exact / self.n if self.n else 0.0


INFILL_MODES = ("psm", "spm", "left_to_right")


def infill_exact_match(
    model_config,
    params,
    tokenizer,
    examples: Sequence[InfillExample],
    *,
    mode: str = "psm",
    max_new_tokens: int = 48,
    fim_tokens: FimTokens | None = None,
    mesh=None,
) -> InfillResult:
    """Greedy infilling of single-line middles, scored by exact match.

    ``mode`` 'psm' / 'spm': Code Llama's infilling prompt (``infilling_prompt``) and
    generation until <EOT>, the middle cut at its first newline; 'left_to_right': what a
    model trained without FIM can do, BOS + prefix only, generation until a newline (or
    EOS). A prediction is exact when it equals the true line up to trailing whitespace. All
    prompts go through one batched ``herd.lm.generate.generate_tokens`` call.
    """
    from herd.lm.generate import generate_tokens

    if mode not in INFILL_MODES:
        raise ValueError(f"infill mode must be one of {INFILL_MODES}, got {mode!r}")
    if not examples:
        raise ValueError("no infilling examples")
    if mode == "left_to_right":
        stops = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", -1) >= 0 else []
        newline = list(tokenizer.encode("\n"))
        if len(newline) == 1:  # a line ends at its newline token (herd tokenizers: one piece)
            stops.append(newline[0])
        prompts = [list(tokenizer.encode(e.prefix, bos=True)) for e in examples]
    else:  # <EOT> alone ends a middle, so that `finished` counts the model's <EOT>s
        t = fim_tokens if fim_tokens is not None else FimTokens.from_tokenizer(tokenizer)
        stops = [t.eot]
        prompts = [
            infilling_prompt(e.prefix, e.suffix, tokenizer, mode, fim_tokens=t) for e in examples
        ]
    pad = getattr(tokenizer, "pad_id", 0)
    pad = pad if pad is not None and 0 <= pad < model_config.vocab_size else 0
    outs = generate_tokens(
        model_config,
        params,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_id=pad,
        mesh=mesh,
    )
    predictions, exact, finished = [], 0, 0
    for e, ids in zip(examples, outs, strict=True):
        finished += len(ids) < max_new_tokens
        line = decode_middle(ids, tokenizer).split("\n", 1)[0]
        predictions.append(line)
        exact += line.rstrip() == e.middle.rstrip()
    return InfillResult(mode, exact, len(examples), tuple(predictions), finished)


def _line_targets(tokenizer, e: InfillExample, mode: str, t: FimTokens | None):
    """(prompt ids, target ids): the line's tokens and the token that ends it (<EOT> after an
    infilling prompt, the newline left to right)."""
    middle = encode_no_leading_space(tokenizer, e.middle)
    if mode == "left_to_right":
        return list(tokenizer.encode(e.prefix, bos=True)), middle + list(tokenizer.encode("\n"))
    prompt = infilling_prompt(e.prefix, e.suffix, tokenizer, mode, fim_tokens=t)
    return prompt, middle + [t.eot]


def infill_line_logprob(
    model_config,
    params,
    tokenizer,
    examples: Sequence[InfillExample],
    *,
    mode: str = "psm",
    batch_size: int = 64,
    fim_tokens: FimTokens | None = None,
    with_end: bool = True,
) -> np.ndarray:
    """Teacher-forced log-probability (nats) of each true line and its end, one float per
    example: after the infilling prompt the line's tokens then <EOT> (``mode`` 'psm' /
    'spm'), left to right after BOS + prefix the line's tokens then the newline
    (``with_end=False``: the line's tokens alone). A finer measure than exact match for
    models too small to get whole lines right."""
    import jax
    import jax.numpy as jnp

    from herd.lm.generate import _unbox_params
    from herd.lm.model import Llama

    if mode not in INFILL_MODES:
        raise ValueError(f"infill mode must be one of {INFILL_MODES}, got {mode!r}")
    if not examples:
        raise ValueError("no infilling examples")
    t = None
    if mode != "left_to_right":
        t = fim_tokens if fim_tokens is not None else FimTokens.from_tokenizer(tokenizer)
    pairs = [_line_targets(tokenizer, e, mode, t) for e in examples]
    width = max(len(p) + len(q) for p, q in pairs)
    if width > model_config.max_seq_len:
        raise ValueError(
            f"an example needs {width} tokens, more than the model's max_seq_len "
            f"{model_config.max_seq_len}: use shorter prefixes / suffixes"
        )
    model = Llama(model_config)
    params = _unbox_params(params)

    @jax.jit
    def logprobs(tokens, segment_ids):
        logits = model.apply({"params": params}, tokens, segment_ids=segment_ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    out = np.zeros(len(pairs), np.float64)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        for r, (p, q) in enumerate(chunk):
            tokens[r, : len(p) + len(q)] = p + q
            segments[r, : len(p) + len(q)] = 1
        lp = np.asarray(logprobs(tokens, segments))
        for r, (p, q) in enumerate(chunk):
            n = len(q) if with_end else len(q) - 1
            out[s + r] = lp[r, len(p) - 1 : len(p) - 1 + n].sum()
    return out
