"""Language-model data: document sources -> tokens -> packed, checkpointable grain batches.

Public API::

    stdlib_files(split='train', eval_fraction=0.05, *, root=None) -> (list[str], sha256)
    make_lm_iterator(source, tokenizer, *, seq_len, batch_size, seed, shuffle=True,
        num_epochs=None, shard_index=None, shard_count=None, worker_count=0,
        add_bos=True, add_eos=True, packing='concat', vocab_size=None, read_threads=2,
        fim_rate=0.0, fim_spm_rate=0.5, max_doc_chars=0)
        -> grain DatasetIterator yielding batch dicts (see below); shard_index/shard_count
        None mean jax.process_index()/jax.process_count().
    sample_texts(source, n=0) -> list[str]  # documents as text (corrupt ones skipped)
    split_code_document(text, max_chars) -> list[str]  # cut at top-level statements
    CodeDocumentSource(source, max_chars)   # a record source of those pieces
    code_documents(source, max_chars) -> list[str]
    herd.lm.packing.PackedBatchIterator.counters  # docs, tokens, rows, skipped_* ...
    StagedIterator(make, stages)  # batches whose shape follows a batch-size ramp
                                  # (stages: herd.lm.ramp.batch_stages)

Record sources (make_source), bad-record skipping (Skipped) and the staged iterator are
herd.core.data's; this module adds the text corpus, tokenization and the token-based ramp.

Sources (``source`` argument): anything ``herd.core.data.make_source`` takes: a list of
paths/globs (text files, one document per file), or a spec string: 'text:<glob>',
'jsonl:<glob>[:field]' (one JSON object per line, the document in ``field``, default 'text';
a list of ints there is taken as token ids), 'array_record:<glob>' (each record raw UTF-8 text)
or 'array_record:<glob>:<field>' (each record a JSON object), 'tfds:<name>[:split[:field]]'.
A missing glob or an empty corpus raises ValueError naming it.

Pipeline (grain): MapDataset.source(records) -> [shard_index::shard_count] (process sharding,
disjoint) -> shuffle(seed) (a new permutation every epoch) -> repeat(num_epochs) -> map
(decode + tokenize + BOS/EOS + vocabulary check; worker threads) -> to_iter_dataset ->
PackedBatchIterDataset (herd.lm.packing: packing + batching) [-> mp_prefetch when
worker_count > 0].

Documents: one per record; with ``max_doc_chars`` > 0 each text record is first cut into
documents of at most that many characters before top-level statements
(``split_code_document``, ``CodeDocumentSource``; the shuffle then mixes the pieces), the
small-scale stand-in for Code Llama's long contexts that lets FIM reach most code documents
in short rows. It applies to text with and without FIM alike.

Fill-in-the-middle (Code Llama, herd.lm.fim): with ``fim_rate`` > 0 each text document goes
through ``FimTransform(tokenizer, rate=fim_rate, spm_rate=fim_spm_rate, max_tokens=seq_len)``
(PSM / SPM / left plain; one whose FIM sequence would exceed seq_len stays plain), with a
generator keyed on (seed, epoch, record index): the map sees its stream position
(map_with_index after repeat), so the decisions differ between epochs, do not depend on
threads, and a restored iterator re-makes exactly the same sequences. The tokenizer must have
the sentinels (else FimTokens' ValueError); token-id records pass through unchanged.
``counters`` then also has fim_psm, fim_spm, fim_none, fim_skipped_token_records.

Each document of tokens t (with BOS and EOS) becomes the (input, target) pairs (t[i], t[i+1]),
i.e. len(t) - 1 predictions, none of which crosses a document boundary; those pairs are packed
into rows of ``seq_len``:
  packing='concat' (default): rows are filled completely; a document that does not fit in the
      rest of a row continues at the start of the next row (as a new segment).
  packing='pad': a document that fits in a row is never split (the row is padded instead); one
      longer than seq_len is cut into chunks of seq_len.
Either way no prediction is dropped: every target of every document appears exactly once with
loss_mask 1 (tests check this). A piece of a document is its own segment: positions restart at 0
and attention (segment_ids) stays inside it. With num_epochs set, the last batch is padded with
empty rows (fixed shapes) and iteration then stops.

Batch (numpy, [batch_size, seq_len]): 'inputs' int32, 'targets' int32 (next token of the same
document), 'positions' int32 (0.. within each segment), 'segment_ids' int32 (1, 2, ... per
segment in the row, 0 = padding), 'loss_mask' float32 (1 exactly where targets is a real next
token; 0 on padding). Padding uses tokenizer.pad_id for inputs/targets.

Corrupt records (bad UTF-8, bad JSON, missing/non-text field) and empty documents are skipped,
counted in ``iterator.counters`` (restored with the iterator state) and logged (the first few of
each kind, then every 1000th). Token ids outside [0, vocab_size) raise ValueError naming the id
and the record. Iterator state (get_state/set_state) is a small JSON-able dict; restoring it
continues with exactly the same batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from collections.abc import Sequence

import grain
import numpy as np

from herd.core import data as core_data
from herd.core.data import Skipped, make_source, read_record
from herd.lm.packing import PackedBatchIterDataset
from herd.lm.ramp import BatchStage

log = logging.getLogger(__name__)

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# --------------------------------------------------------------------------------------------
# The standard-library corpus
# --------------------------------------------------------------------------------------------


def stdlib_files(
    split: str = "train", eval_fraction: float = 0.05, *, root: str | None = None
) -> tuple[list[str], str]:
    """The running interpreter's standard-library sources: ``(sorted paths, sha256)``.

    All ``*.py`` under ``sysconfig.get_paths()['stdlib']`` (or ``root``), recursively, not
    following symlinked directories, skipping site-packages / dist-packages (third-party code)
    and __pycache__; test directories are kept (real code). Files go to 'eval' when the sha256 of
    their path relative to the root falls below ``eval_fraction`` (stable across machines and
    independent of which other files exist), else to 'train'; 'all' returns both.
    The sha256 covers the relative paths and contents of the returned files, so it tells apart
    corpora of different Python builds; train.py logs it.
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise ValueError(f"stdlib directory not found: {root!r}")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    rels.append(os.path.relpath(full, root))
    rels.sort()
    threshold = int(eval_fraction * 2**64)

    def is_eval(rel: str) -> bool:
        h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
        return h < threshold

    if split == "train":
        rels = [r for r in rels if not is_eval(r)]
    elif split == "eval":
        rels = [r for r in rels if is_eval(r)]
    if not rels:
        raise ValueError(f"no {split!r} *.py files under {root!r} (eval_fraction={eval_fraction})")
    digest = hashlib.sha256()
    for rel in rels:
        with open(os.path.join(root, rel), "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        digest.update(f"{rel}\0{content}\n".encode())
    return [os.path.join(root, r) for r in rels], digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Code files -> documents of at most max_doc_chars characters
# --------------------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _blocks(lines: list[str], depth: int) -> list[list[str]]:
    """``lines`` cut before each line that starts a statement at indentation ``depth``. A
    decorator or comment line at that indentation stays with the statement after it, and
    a line that closes a bracket (``)``, ``]``, ``}``) never starts a block."""
    blocks: list[list[str]] = [[lines[0]]]

    def glues(line: str) -> bool:  # a decorator / comment: belongs to what follows
        return _indent(line) == depth and line.strip()[:1] in ("@", "#")

    prev_glues = bool(lines[0].strip()) and glues(lines[0])
    for ln in lines[1:]:
        stripped = ln.strip()
        starts = bool(stripped) and _indent(ln) == depth and stripped[0] not in ")]}"
        if starts and not prev_glues:
            blocks.append([ln])
        else:
            blocks[-1].append(ln)
        if stripped:
            prev_glues = glues(ln)
    return blocks


def _statements(lines: list[str]) -> list[list[str]]:
    """``lines`` cut before the statements of the outermost indentation that cuts them at
    all (top level first, then e.g. a class's methods, then a body's lines), else into
    single lines."""
    for depth in sorted({_indent(ln) for ln in lines[1:] if ln.strip()}):
        blocks = _blocks(lines, depth)
        if len(blocks) > 1:
            return blocks
    return [[ln] for ln in lines]


def _pack(lines: list[str], max_chars: int) -> list[str]:
    text = "".join(lines)
    if len(text) <= max_chars:
        return [text]
    if len(lines) == 1:  # one over-long line: cut it into pieces of max_chars characters
        return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    units: list[str] = []  # statements, an over-long one replaced by its own pieces
    for block in _statements(lines):
        piece = "".join(block)
        units.extend(_pack(block, max_chars) if len(piece) > max_chars else [piece])
    out: list[str] = []
    current = ""
    for unit in units:  # as many consecutive units per document as fit
        if current and len(current) + len(unit) > max_chars:
            out.append(current)
            current = ""
        current += unit
    if current:
        out.append(current)
    return out


def split_code_document(text: str, max_chars: int) -> list[str]:
    """A source file cut into consecutive documents of at most ``max_chars`` characters,
    ``"".join(pieces) == text``.

    Cuts fall before top-level statements (column 0: ``def``, ``class``, imports,
    assignments; a decorator or comment stays with what follows it), as many whole
    statements per document as fit; a statement longer than ``max_chars`` is cut before
    the statements at its next indentation level (a class's methods, a function's body
    lines), recursively, and a single line longer than ``max_chars`` into pieces of
    ``max_chars`` characters. Line-based (not a parser): a string literal with lines at
    column 0 may be cut.

    Why: Code Llama's FIM transform acts on whole documents that fit one training context
    (4096 tokens at pre-training, 16384 for long-context fine-tuning; Roziere et al. 2023
    sec. 2.3, 2.4). At the tiny scale of configs/lm/tiny_fim.py (rows of 256 tokens) most
    standard-library files are far longer, so they would stay plain; cutting them into
    top-level units is the small-scale stand-in that lets FIM reach most documents, applied
    identically with and without FIM so that both see the same text.
    """
    if not isinstance(max_chars, (int, np.integer)) or isinstance(max_chars, bool):
        raise TypeError(f"max_chars must be an int, got {max_chars!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if not text:
        return []
    return [p for p in _pack(text.splitlines(keepends=True), int(max_chars)) if p]


class CodeDocumentSource:
    """A record source whose records are ``split_code_document(text, max_chars)`` pieces of
    the text records of ``inner`` (a herd.core.data record source), in order.

    Built by reading every record once (the piece counts); a record is re-read and re-split
    when one of its pieces is asked for. Records that are not text (token ids, corrupt
    bytes, missing fields) pass through as one record each, so the pipeline skips / counts
    them as before.
    """

    kind = "text"
    field = None

    def __init__(self, inner, max_chars: int):
        split_code_document("x", max_chars)  # TypeError / ValueError naming a bad max_chars
        self.inner = inner
        self.max_chars = int(max_chars)
        self.name = f"{inner.name} in documents of <= {self.max_chars} chars"
        record, piece = [], []
        for i in range(len(inner)):
            value = read_record(inner, i)
            n = len(split_code_document(value, self.max_chars)) if isinstance(value, str) else 1
            record.extend([i] * max(n, 1))
            piece.extend(range(max(n, 1)))
        self._record = np.asarray(record, np.int64)
        self._piece = np.asarray(piece, np.int64)

    def __len__(self) -> int:
        return int(self._record.size)

    def _locate(self, i: int) -> tuple[int, int]:
        return int(self._record[i]), int(self._piece[i])

    def __getitem__(self, i: int):
        r, p = self._locate(i)
        value = read_record(self.inner, r)
        if not isinstance(value, str):
            return self.inner[r]  # the raw record: read_record reports it again
        pieces = split_code_document(value, self.max_chars)
        return pieces[p] if pieces else value

    def describe(self, i: int) -> str:
        r, p = self._locate(i)
        return f"{self.inner.describe(r)} (document {p})"


def code_documents(source, max_chars: int) -> list[str]:
    """The text documents of a source (list of files, spec, or record source) cut by
    ``split_code_document`` (corrupt / non-text records skipped)."""
    src = make_source(source)
    out: list[str] = []
    for i in range(len(src)):
        value = read_record(src, i)
        if isinstance(value, str):
            out.extend(split_code_document(value, max_chars))
    return out


# --------------------------------------------------------------------------------------------
# Records as text (sources: herd.core.data.make_source)
# --------------------------------------------------------------------------------------------


def record_text(src, index: int) -> str | Skipped:
    """The text of record ``index`` of a source, or a Skipped marker (bad UTF-8/JSON, ...)."""
    value = read_record(src, index)
    if isinstance(value, (Skipped, str)):
        return value
    return Skipped("bad_tokens", src.describe(index), "record holds token ids, not text")


def sample_texts(source, n: int = 0) -> list[str]:
    """Up to ``n`` documents (evenly spread; 0 = all) of a source (spec or record source) as
    text, skipping corrupt/empty records: e.g. a corpus for ``train_tokenizer(...,
    input_kind='texts')``."""
    src = make_source(source)
    count = len(src)
    idx = range(count) if not n or count <= n else [int(i * count / n) for i in range(n)]
    out = []
    for i in idx:
        value = record_text(src, i)
        if isinstance(value, str) and value:
            out.append(value)
    return out


# --------------------------------------------------------------------------------------------
# Tokenization (a grain map); packing is herd.lm.packing
# --------------------------------------------------------------------------------------------


class _Tokenize:
    """record index -> np.int32 tokens (BOS + text + EOS), or Skipped.

    With ``fim`` (a herd.lm.fim.FimTransform) text records go through Code Llama's FIM
    transform instead (``at``: the stream position gives the epoch), and the result is
    ``(tokens, counter name)`` so that the packer counts fim_psm / fim_spm / fim_none /
    fim_skipped_token_records.
    """

    def __init__(
        self,
        source,
        tokenizer,
        add_bos: bool,
        add_eos: bool,
        vocab_size: int,
        *,
        fim=None,
        fim_seed: int = 0,
        epoch_len: int = 1,
    ):
        self.source = source
        self.tokenizer = tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = vocab_size
        self.fim, self.fim_seed, self.epoch_len = fim, int(fim_seed), int(epoch_len)

    def at(self, position: int, index: int):
        """The record ``index`` read at stream ``position`` (grain map_with_index): the FIM
        decision is keyed on (seed, epoch, record), so it is the same on a resume and in any
        thread, and a new one each epoch."""
        return self(index, position // self.epoch_len)

    def __call__(self, index: int, epoch: int = 0):
        src = self.source
        value = read_record(src, index)
        if isinstance(value, Skipped):
            return value
        tag = None
        if isinstance(value, (list, np.ndarray)):
            arr = np.asarray(value)
            if arr.size == 0:
                return Skipped("empty", src.describe(index))
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                return Skipped("bad_tokens", src.describe(index), f"dtype {arr.dtype}")
            ids = arr.astype(np.int64).tolist()
            ids = ([self.tokenizer.bos_id] if self.add_bos else []) + ids
            ids += [self.tokenizer.eos_id] if self.add_eos else []
            if self.fim is not None:
                tag = "fim_skipped_token_records"  # already tokens: no characters to cut
        elif self.fim is not None:
            rng = np.random.default_rng([self.fim_seed % 2**63, int(epoch), int(index)])
            sample = self.fim(value, rng)
            ids, tag = sample.ids, f"fim_{sample.fmt or 'none'}"
        else:
            ids = self.tokenizer.encode(value, bos=self.add_bos, eos=self.add_eos)
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0]
            raise ValueError(
                f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})"
                f" in {src.describe(index)}"
            )
        if tokens.size < 2:
            return Skipped("too_short", src.describe(index), f"{tokens.size} token(s)")
        tokens = tokens.astype(np.int32)
        return tokens if tag is None else (tokens, tag)


def check_fim_rates(fim_rate: float, fim_spm_rate: float, prefix: str = "") -> None:
    """Raises ValueError naming the key unless both rates are in [0, 1]."""
    for key, value in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate)):
        try:
            ok = 0.0 <= float(value) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{prefix}{key} must be a number in [0, 1], got {value!r}")


def make_lm_dataset(
    source,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    add_bos: bool = True,
    add_eos: bool = True,
    packing: str = "concat",
    vocab_size: int | None = None,
    read_threads: int = 2,
    tfds_data_dir: str | None = None,
    fim_rate: float = 0.0,
    fim_spm_rate: float = 0.5,
    max_doc_chars: int = 0,
) -> grain.IterDataset:
    """The grain IterDataset behind make_lm_iterator (same arguments)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if packing not in ("concat", "pad"):
        raise ValueError(f"packing must be 'concat' or 'pad', got {packing!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    check_fim_rates(fim_rate, fim_spm_rate)
    if isinstance(max_doc_chars, bool) or not isinstance(max_doc_chars, (int, np.integer)):
        raise ValueError(f"max_doc_chars must be an int (0 = whole records), got {max_doc_chars!r}")
    if max_doc_chars < 0:
        raise ValueError(f"max_doc_chars must be >= 0 (0 = whole records), got {max_doc_chars}")
    fim = None
    if fim_rate > 0:
        from herd.lm.fim import FimTransform

        # raises the FimTokens error when the tokenizer has no sentinels; a document whose
        # FIM sequence would not fit in one row stays plain (Code Llama)
        fim = FimTransform(
            tokenizer,
            rate=fim_rate,
            spm_rate=fim_spm_rate,
            bos=add_bos,
            eos=add_eos,
            max_tokens=seq_len,
        )
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
    if tokenizer.vocab_size > vocab_size:
        log.warning(
            "tokenizer vocab %d > model vocab %d: ids above it will raise",
            tokenizer.vocab_size,
            vocab_size,
        )
    if not 0 <= tokenizer.pad_id < vocab_size:
        raise ValueError(f"pad id {tokenizer.pad_id} outside the vocabulary [0, {vocab_size})")
    src = make_source(source, tfds_data_dir=tfds_data_dir)
    if max_doc_chars:  # before FIM: both see the same documents
        src = CodeDocumentSource(src, int(max_doc_chars))
    ds = grain.MapDataset.range(len(src))[shard_index::shard_count]
    n = len(ds)
    if n == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} of {src.name} is empty ({len(src)} records)"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(num_epochs)
    if fim is None:
        ds = ds.map(_Tokenize(src, tokenizer, add_bos, add_eos, vocab_size))
    else:  # the stream position gives the epoch: FIM decisions per (seed, epoch, record)
        tok = _Tokenize(
            src, tokenizer, add_bos, add_eos, vocab_size, fim=fim, fim_seed=seed, epoch_len=n
        )
        ds = ds.map_with_index(tok.at)
    read = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(4, 4 * read_threads)
    )
    it_ds = ds.to_iter_dataset(read)
    packed = PackedBatchIterDataset(
        it_ds,
        seq_len=seq_len,
        batch_size=batch_size,
        pad_id=int(tokenizer.pad_id),
        packing=packing,
        max_skips=n,  # records in this shard (one epoch)
        source_name=src.name,
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        return packed.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return packed


def make_lm_iterator(
    source,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    add_bos: bool = True,
    add_eos: bool = True,
    packing: str = "concat",
    vocab_size: int | None = None,
    read_threads: int = 2,
    tfds_data_dir: str | None = None,
    fim_rate: float = 0.0,
    fim_spm_rate: float = 0.5,
    max_doc_chars: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable iterator of packed LM batches (see the module docstring).

    Keyword arguments: seq_len, batch_size (per process), seed, shuffle=True, num_epochs=None
    (forever), shard_index/shard_count (None: this JAX process of all), worker_count=0 (grain
    worker processes; 0 = in this process with ``read_threads`` tokenizing threads),
    add_bos/add_eos=True, packing='concat'|'pad', vocab_size (None: the tokenizer's; the model's
    vocab when smaller ids must raise), tfds_data_dir.
    With worker_count=0 the iterator is a PackedBatchIterator: ``.counters`` has docs, tokens,
    rows, batches, split_docs and skipped_<reason> counts. With worker_count=N > 0 each grain
    worker packs its own slice of the documents (all tokens still seen exactly once per epoch,
    tested), so the batch order differs from worker_count=0: resume with the same worker_count;
    the counters then live only in the (per-worker) state; call ``close()`` when done.
    fim_rate / fim_spm_rate: Code Llama's FIM (module docstring); max_doc_chars (0 = off):
    text records cut into documents of at most that many characters first.
    """
    return iter(
        make_lm_dataset(
            source,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            worker_count=worker_count,
            add_bos=add_bos,
            add_eos=add_eos,
            packing=packing,
            vocab_size=vocab_size,
            read_threads=read_threads,
            tfds_data_dir=tfds_data_dir,
            fim_rate=fim_rate,
            fim_spm_rate=fim_spm_rate,
            max_doc_chars=max_doc_chars,
        )
    )


class StagedIterator(core_data.StagedIterator):
    """Packed batches whose shape follows batch stages (herd.core.data.StagedIterator).

    ``make(stage)`` builds this process's iterator for a BatchStage. The packer's state is a
    position in the document stream (the parent's state and the offset in the current
    document), not a shape, so at a switch no token is skipped or seen twice.
    """

    def __init__(self, make, stages: Sequence[BatchStage]):
        super().__init__(make, stages, stages_name="a batch ramp (data.batch_ramp)")
