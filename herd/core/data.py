"""Record sources and the staged, resumable iterator: the data plumbing every trainer shares.

Sources are random-access record sequences (picklable, so grain worker processes can hold
them)::

    len(src), src[i] -> the raw record, src.describe(i) -> where it is (for messages),
    src.kind ('text': raw bytes, 'json': a JSON object per record, 'dict': a mapping),
    src.field (the key of the value in a JSON/dict record, else None), src.name

``make_source(source)`` builds one from a list of paths/globs (one record per file), or a
spec string: 'text:<glob>' (one record per file), 'jsonl:<glob>[:field]' (one JSON object per
non-blank line, the value in ``field``, default 'text'), 'array_record:<glob>' (each record
raw bytes) or 'array_record:<glob>:<field>' (each record a JSON object),
'tfds:<name>[:split[:field]]' (``tfds.data_source``, no TensorFlow needed at read time; the
dataset must already be prepared in the tfds data dir, nothing is downloaded). A plain string
path/glob is a 'text:' source, or JSONL when it ends in '.jsonl'. A missing glob or an empty
source raises ValueError naming it.

Bad records are skipped and counted, never dropped silently: ``read_record(src, i)`` returns
the record's value or a :class:`Skipped` marker (bad UTF-8, bad JSON, missing field, blank or
empty); ``count_skip(counters, skipped)`` counts it as ``counters['skipped_<reason>']`` and
logs the first few of each reason, then every 1000th.

``StagedIterator(make, stages)``: one checkpointable stream of batches whose iterator is
rebuilt at each stage's ``start_step`` (e.g. a batch-size ramp) and handed the previous
iterator's state, so the stream continues across a switch and a restore lands in the right
stage. ``stage_at(stages, step)`` is the stage a step belongs to.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np

log = logging.getLogger(__name__)


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
    """One record per file: the file's bytes."""

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
    """ArrayRecord files; each record is raw bytes, or a JSON object when ``field`` is set."""

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
    dicts whose ``field`` holds the value (bytes or str). ``data_source_fn`` replaces
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


# --------------------------------------------------------------------------------------------
# Reading records; skipping and counting bad ones
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record that was skipped; counted as ``skipped_<reason>`` (count_skip)."""

    reason: str
    where: str
    detail: str = ""


def read_record(src, index: int):
    """The value of record ``index``: a str (UTF-8 decoded; for 'json'/'dict' records the
    value in ``src.field``), a list/array held in that field (as it is), or Skipped."""
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


_LOG_FIRST = 5


def count_skip(counters: dict[str, int], item: Skipped) -> int:
    """Counts a skipped record in ``counters['skipped_<reason>']`` (returned) and logs it:
    the first few of each reason, then every 1000th."""
    key = f"skipped_{item.reason}"
    n = counters[key] = counters.get(key, 0) + 1
    if n <= _LOG_FIRST or n % 1000 == 0:
        log.warning(
            "data: skipped %s (%s%s): %d %s so far",
            item.where,
            item.reason,
            f": {item.detail}" if item.detail else "",
            n,
            key,
        )
    return n


def skip_summary(counters: dict[str, int]) -> str:
    """'skipped_<reason>=<n>, ...' of the skip counts in ``counters``."""
    return ", ".join(f"{k}={v}" for k, v in counters.items() if k.startswith("skipped"))


# --------------------------------------------------------------------------------------------
# Stages (e.g. a batch-size ramp) and the staged iterator
# --------------------------------------------------------------------------------------------


class Stage(Protocol):
    """What StagedIterator needs of a stage: the (0-based) step it starts at."""

    start_step: int


def stage_at(stages: Sequence[Stage], step: int):
    """The stage that step ``step`` (0-based) trains in: the last one started by then."""
    current = stages[0]
    for stage in stages[1:]:
        if stage.start_step <= step:
            current = stage
    return current


class StagedIterator:
    """Batches from one stream whose iterator follows stages; checkpointable like it.

    ``stages``: anything with a ``start_step`` (the first starts at 0), in order.
    ``make(stage)`` builds this process's iterator for a stage (with get_state/set_state;
    close() if it has one). At a stage's first step the iterator is rebuilt for the new stage
    and given the old one's state: when that state is a position in the stream, not a shape
    (as a packer's is), nothing is skipped or seen twice at the switch. The state also holds
    the number of batches yielded, which picks the stage on restore. ``stages_name`` names
    the stages in the error raised for a state saved without them.
    """

    def __init__(
        self, make: Callable[[Any], Any], stages: Sequence[Stage], *, stages_name="stages"
    ):
        self._make, self._stages = make, list(stages)
        self._stages_name = stages_name
        self._step = 0
        self._stage = self._stages[0]
        self._it = None  # built on first use, so a restore builds one iterator, not two

    def __iter__(self):
        return self

    def _current(self):
        if self._it is None:
            self._it = self._make(self._stage)
        return self._it

    def _switch(self, stage, stream_state) -> None:
        self.close()
        self._stage = stage
        self._current().set_state(stream_state)

    def __next__(self):
        stage = stage_at(self._stages, self._step)
        if stage != self._stage:
            self._switch(stage, self._current().get_state())
            log.info("data: step %d: %s from now on", self._step, stage)
        batch = next(self._current())
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"batches": self._step, "stream": self._current().get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"batches", "stream"}:
            raise ValueError(
                f"this data state was saved without {self._stages_name}: it has no batch "
                "count to place the stages at; resume with the stages the run started with"
            )
        self._step = int(state["batches"])
        self._switch(stage_at(self._stages, self._step), state["stream"])

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None
