"""Language-model data: document sources -> tokens -> packed, checkpointable grain batches.

Public API (INTERFACES.md)::

    stdlib_files(split='train', eval_fraction=0.05, *, root=None) -> (list[str], sha256)
    make_lm_iterator(source, tokenizer, *, seq_len, batch_size, seed, shuffle=True,
        num_epochs=None, shard_index=None, shard_count=None, worker_count=0,
        add_bos=True, add_eos=True, packing='concat', vocab_size=None, read_threads=2)
        -> grain DatasetIterator yielding batch dicts (see below); shard_index/shard_count
        None mean jax.process_index()/jax.process_count().
    make_source(source) -> a random-access record source (len, [i], describe(i), kind, field)
    sample_texts(source, n=0) -> list[str]  # documents as text (corrupt ones skipped)
    PackedBatchIterator.counters  # docs, tokens, rows, skipped_* (corrupt records)...
    batch_stages(ramp, global_batch, seq_len) -> [BatchStage(start_step, global_batch, seq_len)]
    StagedIterator(make, stages)  # batches whose shape follows a batch-size ramp

Sources (``source`` argument): a list of paths/globs (text files, one document per file), or a
spec string: 'text:<glob>', 'jsonl:<glob>[:field]' (one JSON object per line, the document in
``field``, default 'text'; a list of ints there is taken as token ids), 'array_record:<glob>'
(each record raw UTF-8 text) or 'array_record:<glob>:<field>' (each record a JSON object),
'tfds:<name>[:split[:field]]' (``tfds.data_source``, no TensorFlow needed at read time; the
dataset must already be prepared in the tfds data dir, nothing is downloaded). A plain string
path/glob is a text source, or JSONL when it ends in '.jsonl'. A missing glob or an empty
corpus raises ValueError naming it.

Pipeline (grain): MapDataset.source(records) -> [shard_index::shard_count] (process sharding,
disjoint) -> shuffle(seed) (a new permutation every epoch) -> repeat(num_epochs) -> map
(decode + tokenize + BOS/EOS + vocabulary check; worker threads) -> to_iter_dataset ->
PackedBatchIterDataset (packing + batching) [-> mp_prefetch when worker_count > 0].

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

import dataclasses
import glob as globlib
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

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
# Record sources (random access; picklable for grain worker processes)
# --------------------------------------------------------------------------------------------


def _expand(patterns: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for pat in patterns:
        pat = os.fspath(pat)
        if globlib.has_magic(pat):
            found = sorted(p for p in globlib.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                raise ValueError(f"{what}: no files match {pat!r}")
            files.extend(found)
        elif os.path.isdir(pat):
            raise ValueError(f"{what}: {pat!r} is a directory; give a glob like '{pat}/**/*.py'")
        elif not os.path.isfile(pat):
            raise ValueError(f"{what}: file not found: {pat!r}")
        else:
            files.append(pat)
    if not files:
        raise ValueError(f"{what}: empty corpus (no files given)")
    return files


class TextFileSource:
    """One document per text file; records are the file bytes."""

    kind = "text"
    field = None

    def __init__(self, patterns: Sequence[str] | str):
        self.files = _expand(patterns, "text source")
        if isinstance(patterns, (str, os.PathLike)):
            self.name = f"text:{os.fspath(patterns)}"
        else:
            self.name = f"text:[{len(self.files)} files: {self.files[0]}, ...]"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> bytes:
        with open(self.files[i], "rb") as f:
            return f.read()

    def describe(self, i: int) -> str:
        return self.files[i]


class JsonlSource:
    """One record per non-blank line of JSONL files (line offsets indexed once, numpy)."""

    kind = "json"

    def __init__(self, patterns: Sequence[str] | str, field: str = "text"):
        self.files = _expand(patterns, "jsonl source")
        self.field = field
        self.name = f"jsonl:{patterns}:{field}"
        file_idx, starts, ends, lines = [], [], [], []
        for k, path in enumerate(self.files):
            data = np.fromfile(path, dtype=np.uint8)
            nl = np.flatnonzero(data == 10)
            s = np.concatenate([[0], nl + 1])
            e = np.concatenate([nl, [data.size]])
            # drop empty lines (also a lone '\r'); whitespace-only lines are counted as blank
            length = e - s
            keep = length > 0
            cr_only = length == 1
            if cr_only.any():
                keep &= ~(cr_only & (data[np.minimum(s, max(data.size - 1, 0))] == 13))
            s, e = s[keep], e[keep]
            file_idx.append(np.full(s.size, k, np.int32))
            starts.append(s.astype(np.int64))
            ends.append(e.astype(np.int64))
            lines.append(np.flatnonzero(keep).astype(np.int64) + 1)
        self._file = np.concatenate(file_idx)
        self._start = np.concatenate(starts)
        self._end = np.concatenate(ends)
        self._line = np.concatenate(lines)

    def __len__(self) -> int:
        return int(self._start.size)

    def __getitem__(self, i: int) -> bytes:
        with open(self.files[self._file[i]], "rb") as f:
            f.seek(int(self._start[i]))
            return f.read(int(self._end[i] - self._start[i]))

    def describe(self, i: int) -> str:
        return f"{self.files[self._file[i]]}:{int(self._line[i])}"


class ArrayRecordSource:
    """ArrayRecord files; each record is raw UTF-8 text, or a JSON object when ``field`` is set."""

    def __init__(self, patterns: Sequence[str] | str, field: str | None = None):
        self.files = _expand(patterns, "array_record source")
        self.field = field
        self.kind = "json" if field else "text"
        self.name = f"array_record:{patterns}" + (f":{field}" if field else "")
        self._source = grain.sources.ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[i]

    def describe(self, i: int) -> str:
        return f"{self.name} record {i}"


class TfdsSource:
    """A ``tfds.data_source(name, split=...)`` (random access, ArrayRecord-backed); records are
    dicts whose ``field`` holds the text (bytes or str). ``data_source_fn`` replaces
    ``tfds.data_source`` (tests; custom loaders)."""

    kind = "dict"

    def __init__(
        self,
        name: str,
        split: str = "train",
        field: str = "text",
        *,
        data_dir: str | None = None,
        data_source_fn=None,
    ):
        self.field = field
        self.name = f"tfds:{name}:{split}:{field}"
        if data_source_fn is None:
            import tensorflow_datasets as tfds

            data_source_fn = tfds.data_source
        kwargs = {"split": split}
        if data_dir:
            kwargs["data_dir"] = data_dir
        try:
            self._source = data_source_fn(name, download=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - tfds raises many kinds
            raise ValueError(f"cannot open tfds dataset {name!r} split {split!r}: {e}") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int):
        return self._source[i]

    def describe(self, i: int) -> str:
        return f"{self.name} record {i}"


def make_source(source, *, tfds_data_dir: str | None = None):
    """Builds a record source from a list of paths/globs or a spec string (module docstring)."""
    if hasattr(source, "__getitem__") and hasattr(source, "describe"):
        return source  # already a source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        kind, sep, rest = source.partition(":")
        if sep and kind == "text":
            src = TextFileSource(rest)
        elif sep and kind in ("jsonl", "array_record"):
            pattern, field = rest, None
            if ":" in rest:
                head, _, tail = rest.rpartition(":")
                if tail and "/" not in tail and not globlib.has_magic(tail):
                    pattern, field = head, tail
            if kind == "jsonl":
                src = JsonlSource(pattern, field or "text")
            else:
                src = ArrayRecordSource(pattern, field)
        elif sep and kind == "tfds":
            parts = rest.split(":")
            name = parts.pop(0)
            if parts and parts[0].replace(".", "").isdigit():  # 'c4/en:3.0.1:train'
                name += ":" + parts.pop(0)
            split = parts.pop(0) if parts else "train"
            field = parts.pop(0) if parts else "text"
            src = TfdsSource(name, split, field, data_dir=tfds_data_dir)
        elif source.endswith(".jsonl"):
            src = JsonlSource(source)
        else:
            src = TextFileSource(source)
    elif isinstance(source, Sequence) and not isinstance(source, bytes):
        if not source:
            raise ValueError("empty corpus: the list of files is empty")
        src = TextFileSource([os.fspath(s) for s in source])
    else:
        raise TypeError(f"unsupported source {source!r}")
    if len(src) == 0:
        raise ValueError(f"empty corpus: {src.name} has no records")
    return src


def record_text(src, index: int) -> str | Skipped:
    """The text of record ``index`` of a source, or a Skipped marker (bad UTF-8/JSON, ...)."""
    value = _Tokenize.extract(src, index)
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
# Tokenization (a grain map) and packing (a grain IterDataset)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record that was skipped; counted by the packer as ``skipped_<reason>``."""

    reason: str
    where: str
    detail: str = ""


class _Tokenize:
    """record index -> np.int32 tokens (BOS + text + EOS), or Skipped."""

    def __init__(self, source, tokenizer, add_bos: bool, add_eos: bool, vocab_size: int):
        self.source = source
        self.tokenizer = tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = vocab_size

    @staticmethod
    def extract(src, index: int):
        """The record's text (str), token ids (list/array), or Skipped."""
        record = src[index]
        kind, field = src.kind, src.field
        value: Any = record
        if kind in ("json", "dict"):
            if kind == "json":
                if not record.strip():
                    return Skipped("blank", src.describe(index))
                try:
                    value = json.loads(record)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    return Skipped("bad_json", src.describe(index), str(e)[:100])
            if not isinstance(value, dict) or field not in value:
                keys = list(value)[:10] if isinstance(value, dict) else type(value).__name__
                return Skipped("missing_field", src.describe(index), f"no {field!r} in {keys}")
            value = value[field]
            if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0:
                value = value.item()
        if isinstance(value, (list, np.ndarray)):
            return value
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                return Skipped("bad_utf8", src.describe(index), str(e)[:100])
        if not isinstance(value, str):
            return Skipped("missing_field", src.describe(index), f"{type(value).__name__}")
        if not value:
            return Skipped("empty", src.describe(index))
        return value

    def __call__(self, index: int):
        src = self.source
        value = self.extract(src, index)
        if isinstance(value, Skipped):
            return value
        if isinstance(value, (list, np.ndarray)):
            arr = np.asarray(value)
            if arr.size == 0:
                return Skipped("empty", src.describe(index))
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                return Skipped("bad_tokens", src.describe(index), f"dtype {arr.dtype}")
            ids = arr.astype(np.int64).tolist()
            ids = ([self.tokenizer.bos_id] if self.add_bos else []) + ids
            ids += [self.tokenizer.eos_id] if self.add_eos else []
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
        return tokens.astype(np.int32)


_LOG_FIRST = 5


class PackedBatchIterator(grain.DatasetIterator):
    """Packs (input, target) pairs of documents into [batch_size, seq_len] batches.

    State: the parent's state *before* the document being packed, the offset reached in that
    document, and the counters; restoring re-reads (re-tokenizes) that one document.
    """

    def __init__(self, parent, *, seq_len, batch_size, pad_id, packing, max_skips, source_name):
        super().__init__(parent)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.pad_id, self.packing = pad_id, packing
        self.max_skips, self.source_name = max_skips, source_name
        self._doc: np.ndarray | None = None
        self._offset = 0
        self._doc_parent_state = None
        self._exhausted = False
        self.counters: dict[str, int] = {"docs": 0, "tokens": 0, "rows": 0, "batches": 0}
        self._skips_in_a_row = 0
        self._logged_end = False

    # -- documents ---------------------------------------------------------------------------
    def _next_doc(self) -> bool:
        """Loads the next usable document into self._doc; False at the end of the data."""
        while True:
            state = self._parent.get_state()
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return False
            if isinstance(item, Skipped):
                self._count_skip(item)
                continue
            self._skips_in_a_row = 0
            self._doc_parent_state = state
            self._doc, self._offset = item, 0
            self.counters["docs"] += 1
            return True

    def _count_skip(self, item: Skipped) -> None:
        key = f"skipped_{item.reason}"
        n = self.counters[key] = self.counters.get(key, 0) + 1
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning(
                "data: skipped %s (%s%s): %d %s so far",
                item.where,
                item.reason,
                f": {item.detail}" if item.detail else "",
                n,
                key,
            )
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.max_skips:
            raise ValueError(
                f"no usable document in {self.source_name}: the last {self._skips_in_a_row}"
                f" records were all skipped ({self._skip_summary()})"
            )

    def _skip_summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.counters.items() if k.startswith("skipped"))

    # -- rows / batches ----------------------------------------------------------------------
    def _fill_row(self, b: int, out: dict[str, np.ndarray]) -> bool:
        """Fills row b; returns False if it got no token (end of data)."""
        L = self.seq_len
        pos, seg = 0, 0
        while pos < L:
            if self._doc is None and (self._exhausted or not self._next_doc()):
                break
            doc = self._doc
            remaining = doc.size - 1 - self._offset  # pairs left in this document
            space = L - pos
            if remaining > space and self.packing == "pad" and pos > 0 and remaining <= L:
                break  # keep short documents whole: start it in the next row
            n = min(remaining, space)
            o = self._offset
            seg += 1
            out["inputs"][b, pos : pos + n] = doc[o : o + n]
            out["targets"][b, pos : pos + n] = doc[o + 1 : o + n + 1]
            out["positions"][b, pos : pos + n] = np.arange(n, dtype=np.int32)
            out["segment_ids"][b, pos : pos + n] = seg
            out["loss_mask"][b, pos : pos + n] = 1.0
            pos += n
            self.counters["tokens"] += n
            if n < remaining:
                self._offset += n
                if o == 0:
                    self.counters["split_docs"] = self.counters.get("split_docs", 0) + 1
            else:
                self._doc = None
        if pos:
            self.counters["rows"] += 1
        return pos > 0

    def __next__(self) -> dict[str, np.ndarray]:
        B, L = self.batch_size, self.seq_len
        out = {
            "inputs": np.full((B, L), self.pad_id, np.int32),
            "targets": np.full((B, L), self.pad_id, np.int32),
            "positions": np.zeros((B, L), np.int32),
            "segment_ids": np.zeros((B, L), np.int32),
            "loss_mask": np.zeros((B, L), np.float32),
        }
        got = False
        for b in range(B):
            if not self._fill_row(b, out):
                break
            got = True
        if not got:
            if self.counters["docs"] == 0:
                raise ValueError(
                    f"no usable document in {self.source_name} ({self._skip_summary()})"
                )
            if not self._logged_end:
                self._logged_end = True
                log.info("data: end of %s: %s", self.source_name, self.counters)
            raise StopIteration
        self.counters["batches"] += 1
        return out

    # -- checkpointing -----------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        has_doc = self._doc is not None
        return {
            "parent": self._doc_parent_state if has_doc else self._parent.get_state(),
            "has_doc": has_doc,
            "offset": int(self._offset) if has_doc else 0,
            "exhausted": self._exhausted,
            "counters": dict(self.counters),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._offset = None, 0
        self._exhausted = bool(state.get("exhausted", False))
        self.counters = dict(state["counters"])
        self._skips_in_a_row = 0
        if state["has_doc"]:
            item = next(self._parent)
            if isinstance(item, Skipped):
                raise ValueError(f"iterator state points at a skipped record ({item.where})")
            self._doc, self._offset = item, int(state["offset"])
            self._doc_parent_state = state["parent"]

    @property
    def epoch(self) -> float:
        """Epochs of this shard's records read so far (fractional)."""
        st = self._parent.get_state()
        return st.get("next_index", 0) / self.max_skips if isinstance(st, dict) else 0.0


class PackedBatchIterDataset(grain.IterDataset):
    def __init__(self, parent, *, seq_len, batch_size, pad_id, packing, max_skips, source_name):
        super().__init__(parent)
        self._kw = dict(
            seq_len=seq_len,
            batch_size=batch_size,
            pad_id=pad_id,
            packing=packing,
            max_skips=max_skips,
            source_name=source_name,
        )

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), **self._kw)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset({self._kw})"


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
) -> grain.IterDataset:
    """The grain IterDataset behind make_lm_iterator (same arguments)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if packing not in ("concat", "pad"):
        raise ValueError(f"packing must be 'concat' or 'pad', got {packing!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
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
    ds = grain.MapDataset.range(len(src))[shard_index::shard_count]
    n = len(ds)
    if n == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} of {src.name} is empty ({len(src)} records)"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Tokenize(src, tokenizer, add_bos, add_eos, vocab_size))
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
        )
    )


# --------------------------------------------------------------------------------------------
# Batch-size ramp (Llama 3, sec. 3.4.1)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchStage:
    """From step ``start_step`` on, global batches of ``global_batch`` x ``seq_len`` tokens."""

    start_step: int
    global_batch: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def batch_stages(ramp: str, global_batch: int, seq_len: int) -> list[BatchStage]:
    """The stages of a batch-size ramp, each with the step it starts at.

    The first stage is ``global_batch`` x ``seq_len`` from step 0. ``ramp`` lists the later
    ones as 'TOKENS:BATCHxSEQ,...': once TOKENS training tokens have been seen (batch x
    seq_len token slots per step, the paper's unit), batches become BATCH sequences of SEQ
    tokens, from the first step boundary at or past TOKENS. '' means no ramp.

    Llama 3 405B (sec. 3.4.1): 4M-token batches of 4,096-token sequences for the first
    252M tokens, then 8M of 8,192, then 16M after 2.87T tokens:
    ``batch_stages('252e6:1024x8192,2.87e12:2048x8192', 1024, 4096)``.
    """
    stages = [BatchStage(0, int(global_batch), int(seq_len))]
    if not ramp or not ramp.strip():
        return stages
    seen = 0  # tokens seen when the last stage starts
    for part in ramp.split(","):
        try:
            tokens_text, shape = part.strip().split(":")
            batch_text, seq_text = shape.lower().split("x")
            tokens, batch, seq = float(tokens_text), int(batch_text), int(seq_text)
        except ValueError:
            raise ValueError(
                f"batch ramp stage {part.strip()!r} is not TOKENS:BATCHxSEQ "
                "(e.g. '252e6:1024x8192')"
            ) from None
        if batch < 1 or seq < 1:
            raise ValueError(f"batch ramp stage {part.strip()!r}: batch and seq must be >= 1")
        prev = stages[-1]
        if not tokens > seen:
            raise ValueError(
                f"batch ramp stage {part.strip()!r} starts at {tokens:.4g} tokens, but "
                f"{seen} tokens are already seen when the stage before it starts (step "
                f"{prev.start_step}): stages must start at increasing token counts"
            )
        steps = -(-(int(tokens) - seen) // prev.tokens_per_step)  # ceil
        stages.append(BatchStage(prev.start_step + steps, batch, seq))
        seen += steps * prev.tokens_per_step
    return stages


def stage_at(stages: Sequence[BatchStage], step: int) -> BatchStage:
    """The stage that step ``step`` (0-based) trains in."""
    current = stages[0]
    for stage in stages[1:]:
        if stage.start_step <= step:
            current = stage
    return current


def steps_for_tokens(stages: Sequence[BatchStage], tokens: float) -> int:
    """Steps until ``tokens`` training tokens are seen (the last one may overshoot)."""
    seen = 0  # tokens seen when `stage` starts
    for stage, following in zip(stages, [*stages[1:], None], strict=True):
        if following is not None:
            in_stage = (following.start_step - stage.start_step) * stage.tokens_per_step
            if seen + in_stage < tokens:
                seen += in_stage
                continue
        return stage.start_step + max(0, -(-(int(tokens) - seen) // stage.tokens_per_step))
    raise ValueError("no batch stages")


class StagedIterator:
    """Packed batches whose shape follows batch stages; checkpointable like the iterator.

    ``make(stage)`` builds this process's iterator for a stage. At a stage's first step the
    iterator is rebuilt with the new shape and given the old one's state: the packer's state
    is a position in the document stream (the parent's state and the offset in the current
    document), not a shape, so at the switch no token is skipped or seen twice. The state
    also holds the number of batches yielded, which picks the stage on restore.
    """

    def __init__(self, make, stages: Sequence[BatchStage]):
        self._make, self._stages = make, list(stages)
        self._step = 0
        self._stage = self._stages[0]
        self._it = None  # built on first use, so a restore builds one iterator, not two

    def __iter__(self):
        return self

    def _current(self):
        if self._it is None:
            self._it = self._make(self._stage)
        return self._it

    def _switch(self, stage: BatchStage, stream_state) -> None:
        self.close()
        self._stage = stage
        self._current().set_state(stream_state)

    def __next__(self):
        stage = stage_at(self._stages, self._step)
        if stage != self._stage:
            self._switch(stage, self._current().get_state())
            log.info(
                "data: step %d: batches of %d x %d tokens from now on",
                self._step,
                stage.global_batch,
                stage.seq_len,
            )
        batch = next(self._current())
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"batches": self._step, "stream": self._current().get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"batches", "stream"}:
            raise ValueError(
                "this data state was saved without a batch ramp (data.batch_ramp): it has no "
                "batch count to place the ramp at; resume with the ramp the run started with"
            )
        self._step = int(state["batches"])
        self._switch(stage_at(self._stages, self._step), state["stream"])

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None
