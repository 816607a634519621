"""Record sources, bad-record skipping and the staged iterator (herd.core.data), with no
tokenizer or model: records are read raw, stages are anything with a ``start_step``. The
LM pipeline over them (packing, ramps of token batches): tests/lm/test_data.py."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from herd.core import data as cd


def test_source_spec_parsing(tmp_path, monkeypatch):
    seen = {}

    class FakeTfds:
        def __init__(self, name, split, field, data_dir=None):
            seen.update(name=name, split=split, field=field)
            self.name = "fake"

        def __len__(self):
            return 1

    monkeypatch.setattr(cd, "TfdsSource", FakeTfds)
    cd.make_source("tfds:c4/en:3.0.1:validation:content")
    assert seen == {"name": "c4/en:3.0.1", "split": "validation", "field": "content"}
    cd.make_source("tfds:wikitext")
    assert seen == {"name": "wikitext", "split": "train", "field": "text"}
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": "b"}\n')
    assert cd.make_source(str(p)).field == "text"
    assert cd.make_source(f"jsonl:{p}:a").field == "a"
    t = tmp_path / "x.txt"
    t.write_text("hello")
    assert isinstance(cd.make_source(f"text:{t}"), cd.TextFileSource)
    assert isinstance(cd.make_source(str(t)), cd.TextFileSource)


def test_read_record_skips_bad_records_and_counts_them(tmp_path, caplog):
    p = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',
        json.dumps({"content": "wrong field"}).encode(),
        json.dumps({"text": 5}).encode(),
        b"   ",
        b"",  # a blank line is no record at all
        b'{"text": "bad utf8 \xff\xfe"}',
        json.dumps({"text": [3, 4, 5]}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps([1, 2]).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\r\n")
    src = cd.make_source(f"jsonl:{p}")
    assert isinstance(src, cd.JsonlSource) and len(src) == 9
    assert src.describe(1) == f"{p}:2" and src.describe(5) == f"{p}:7"
    values = [cd.read_record(src, i) for i in range(len(src))]
    assert values[0] == "good one" and values[6] == [3, 4, 5]
    counters = {}
    with caplog.at_level(logging.WARNING, logger="herd.core.data"):
        for v in values:
            if isinstance(v, cd.Skipped):
                cd.count_skip(counters, v)
    assert counters == {
        "skipped_bad_json": 2,  # truncated object, invalid utf-8 inside JSON
        "skipped_missing_field": 3,  # wrong key, non-string value, not an object
        "skipped_blank": 1,
        "skipped_empty": 1,
    }
    assert f"{p}:2" in caplog.text and "bad_json" in caplog.text
    assert cd.skip_summary({"docs": 3, **counters}).startswith("skipped_bad_json=2, ")
    # raw files: one record per file, its bytes; bad UTF-8 is skipped, not raised
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("hello \u00e9", encoding="utf-8")
    bad.write_bytes(b"\xff\xfe")
    files = cd.make_source([str(good), str(bad)])
    assert isinstance(files, cd.TextFileSource) and files[1] == b"\xff\xfe"
    assert cd.read_record(files, 0) == "hello \u00e9"
    assert cd.read_record(files, 1).reason == "bad_utf8"


def test_log_first_few_then_every_thousandth(caplog):
    counters = {}
    with caplog.at_level(logging.WARNING, logger="herd.core.data"):
        for i in range(2000):
            cd.count_skip(counters, cd.Skipped("bad_json", f"rec {i}"))
    assert counters == {"skipped_bad_json": 2000}
    assert len(caplog.records) == 5 + 2  # the first five, then the 1000th and the 2000th


def test_missing_or_empty_sources_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="nothing_here"):
        cd.make_source(f"text:{tmp_path}/nothing_here/*.txt")
    with pytest.raises(ValueError, match="missing.txt"):
        cd.make_source([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="empty"):
        cd.make_source([])
    with pytest.raises(ValueError, match="directory"):
        cd.make_source([str(tmp_path)])
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="e.jsonl"):
        cd.make_source(f"jsonl:{empty}")
    with pytest.raises(TypeError, match="unsupported source"):
        cd.make_source(3)


# --------------------------------------------------------------------------------------------
# the staged iterator, on a stream of integers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WidthStage:
    start_step: int
    width: int


class Counting:
    """Batches of ``width`` consecutive integers from one stream; the state is the position."""

    closed = 0

    def __init__(self, width):
        self.width, self.pos = width, 0

    def __next__(self):
        out = np.arange(self.pos, self.pos + self.width)
        self.pos += self.width
        return out

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]

    def close(self):
        Counting.closed += 1


STAGES = [WidthStage(0, 2), WidthStage(3, 5), WidthStage(5, 1)]


def test_stage_at_takes_any_stage_with_a_start_step():
    assert [cd.stage_at(STAGES, i).width for i in range(8)] == [2, 2, 2, 5, 5, 1, 1, 1]


def test_staged_iterator_hands_the_stream_over_and_resumes_in_the_right_stage():
    made = []

    def make(stage):
        made.append(stage)
        return Counting(stage.width)

    it = cd.StagedIterator(make, STAGES)
    states, batches = [], []
    for _ in range(8):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    assert [b.size for b in batches] == [2, 2, 2, 5, 5, 1, 1, 1]
    # one stream: nothing skipped or repeated at a switch
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(2 * 3 + 5 * 2 + 3))
    assert made == STAGES  # built lazily, once per stage
    closed = Counting.closed
    # restored before, exactly at and after a switch (after progress the restore discards)
    for at in (2, 3, 4, 5, 7):
        again = cd.StagedIterator(make, STAGES)
        next(again)
        again.set_state(states[at])
        for want in batches[at:]:
            np.testing.assert_array_equal(next(again), want)
    assert Counting.closed > closed  # a replaced iterator is closed
    with pytest.raises(ValueError, match="saved without the ramp: it has no batch count"):
        cd.StagedIterator(make, STAGES, stages_name="the ramp").set_state({"pos": 3})
