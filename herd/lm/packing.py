"""Packing tokenized documents into fixed-shape, checkpointable LM batches (a grain IterDataset).

The parent yields one np.int32 token array per document (with BOS/EOS), or a
``herd.core.data.Skipped`` marker for a bad record (counted in ``counters`` as
``skipped_<reason>``), or ``(tokens, counter name)``: the document, counted also under that
name (herd.lm.data's FIM counters). Each document of tokens t becomes the (input, target) pairs
(t[i], t[i+1]); the pairs are packed into rows of ``seq_len`` as herd.lm.data's docstring
describes ('concat' or 'pad'), every piece of a document its own segment.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from herd.core.data import Skipped, count_skip, skip_summary

log = logging.getLogger(__name__)


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
            if isinstance(item, tuple):
                item, tag = item
                self.counters[tag] = self.counters.get(tag, 0) + 1
            self._doc_parent_state = state
            self._doc, self._offset = item, 0
            self.counters["docs"] += 1
            return True

    def _count_skip(self, item: Skipped) -> None:
        count_skip(self.counters, item)
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.max_skips:
            raise ValueError(
                f"no usable document in {self.source_name}: the last {self._skips_in_a_row}"
                f" records were all skipped ({self._skip_summary()})"
            )

    def _skip_summary(self) -> str:
        return skip_summary(self.counters)

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
            if isinstance(item, tuple):  # (tokens, counter): counted before the state was taken
                item = item[0]
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
