from __future__ import annotations

import json
import re

import pytest

from summarizer.config import DataConfig
from summarizer.data import load, split
from summarizer.errors import UserError
from tests.conftest import SAMPLE_EN, SAMPLE_KO


def cfg(path, **kw) -> DataConfig:
    return DataConfig(name="t", path=str(path), **kw)


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def test_loads_the_korean_sample():
    rows = load(cfg(SAMPLE_KO))
    assert len(rows) == 160 and rows[0].id == "dev_0"
    assert rows[0].dialogue.startswith("#Person1#:") and rows[0].summary and rows[0].topic


def test_loads_jsonl_and_json(tmp_path):
    rows = load(cfg(SAMPLE_EN))
    assert len(rows) == 160 and "#Person1#" in rows[0].dialogue
    p = write(tmp_path, "d.json", json.dumps([{"fname": "a", "dialogue": "x", "summary": "y"}]))
    assert load(cfg(p))[0].summary == "y"


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.csv", None, "not found"),
        ("empty.csv", "", "empty"),
        ("header.csv", "fname,dialogue,summary\n", "header only"),
        ("bad.csv", b"fname,dialogue,summary\na,\xff\xfe,b\n", "not UTF-8"),
        ("cols.csv", "id,text\n1,hello\n", "missing column"),
        ("dup.csv", "fname,dialogue,summary\na,x,y\na,x,y\n", "duplicate id 'a'"),
        ("emptyd.csv", "fname,dialogue,summary\na,x,y\nb,,y\n", "row 2 (id 'b'): empty 'dialogue'"),
        ("emptys.csv", "fname,dialogue,summary\na,x, \n", "empty 'summary'"),
        ("bad.jsonl", '{"fname": "a"}\n{broken\n', "bad.jsonl:2: invalid JSON"),
        ("bad.txt", "hello", "unsupported data format"),
        ("obj.json", '{"a": 1}', "expected a JSON list"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load(cfg(path))
    assert "\n" not in str(err.value) and name in str(err.value)


def test_skip_invalid_rows_when_asked(tmp_path):
    p = write(tmp_path, "d.csv", "fname,dialogue,summary\na,x,y\nb,,y\n")
    assert [r.id for r in load(cfg(p, skip_invalid_rows=True))] == ["a"]


def test_test_rows_need_no_summary(tmp_path):
    p = write(tmp_path, "t.csv", "fname,dialogue\nt1,hello\n")
    assert load(cfg(p), require_summary=False)[0].summary is None


def test_split_is_seeded_disjoint_and_order_free():
    rows = load(cfg(SAMPLE_KO))
    train, val = split(rows, 0.2, 42)
    assert len(val) == 32 and len(train) == 128
    assert not {r.id for r in train} & {r.id for r in val}
    _, val2 = split(list(reversed(rows)), 0.2, 42)
    assert {r.id for r in val2} == {r.id for r in val}
    assert {r.id for r in split(rows, 0.2, 7)[1]} != {r.id for r in val}
    assert len(split(rows, 10, 42)[1]) == 10


def test_split_needs_both_sides():
    rows = load(cfg(SAMPLE_KO))[:3]
    with pytest.raises(UserError, match="val_size"):
        split(rows, 0.1, 1)  # rounds to no validation row
    with pytest.raises(UserError, match="val_size"):
        split(rows, 3, 1)  # no training row


def test_val_size_zero_trains_on_every_row():
    rows = load(cfg(SAMPLE_KO))
    train, val = split(rows, 0, 42)
    assert val == [] and train == rows
